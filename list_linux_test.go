package loopctl

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/kerneltest"
)

// bindFake binds a new temporary file to fake device n with o.
func bindFake(t *testing.T, k *fakeKernel, n int, o Options) (*Device, *os.File) {
	t.Helper()
	f := kerneltest.TempFile(t, 1<<20)
	d := fakeDevice(t, k, n)
	if err := d.Configure(f, o); err != nil {
		t.Fatal(err)
	}
	return d, f
}

func TestListFake(t *testing.T) {
	t.Parallel()
	// With access to the devices, List asks them; without, it reads sysfs:
	// the same answers.
	for _, noAccess := range []bool{false, true} {
		k := useFake(t, 12)
		_, f2 := bindFake(t, k, 2, Options{Offset: 512, Flags: FlagAutoClear})
		_, f10 := bindFake(t, k, 10, Options{SizeLimit: 4096, Flags: FlagReadOnly | FlagPartScan | FlagDirectIO})
		_, f9 := bindFake(t, k, 9, Options{BlockSize: 4096})
		k.noAccess = noAccess
		before := len(k.calls(""))
		list, err := k.sys.List()
		if err != nil {
			t.Fatal(err)
		}
		id := func(f *os.File) (uint64, uint64) {
			var st unix.Stat_t
			if err := unix.Stat(f.Name(), &st); err != nil {
				t.Fatal(err)
			}
			return uint64(st.Dev), uint64(st.Ino)
		}
		d2, i2 := id(f2)
		d9, i9 := id(f9)
		d10, i10 := id(f10)
		// lo_file_name, asked of the device; sysfs does not show it.
		ref := func(f *os.File) string {
			if noAccess {
				return ""
			}
			return f.Name()[:63]
		}
		seq := func(n int) uint64 { return k.devs[n].diskSeq }
		want := []Status{
			{Number: 2, BackingFile: f2.Name(), BackingDevice: d2, BackingInode: i2, Offset: 512, Flags: FlagAutoClear,
				BlockSize: 512, Size: 1<<20 - 512, DiskSeq: seq(2), Ref: ref(f2)},
			{Number: 9, BackingFile: f9.Name(), BackingDevice: d9, BackingInode: i9, BlockSize: 4096, Size: 1 << 20,
				DiskSeq: seq(9), Ref: ref(f9)},
			{Number: 10, BackingFile: f10.Name(), BackingDevice: d10, BackingInode: i10, SizeLimit: 4096,
				Flags: FlagReadOnly | FlagPartScan | FlagDirectIO, BlockSize: 512, Size: 4096, DiskSeq: seq(10), Ref: ref(f10)},
		}
		if seq(2) == 0 || seq(2) == seq(9) || seq(9) == seq(10) {
			t.Fatalf("disk sequence numbers %d, %d, %d: want each its own", seq(2), seq(9), seq(10))
		}
		if !slices.Equal(list, want) {
			t.Fatalf("List (no access: %t):\n%+v\nwant:\n%+v", noAccess, list, want)
		}
		// Each bound device is opened once, asked, and closed; the
		// others, which sysfs shows unbound, are not opened. The devices
		// are read by more than one goroutine: each device's calls are in
		// order, the devices' in any.
		log := k.calls("")[before:]
		perDevice := map[string][]string{}
		for _, l := range log {
			_, dev, _ := strings.Cut(l, " ")
			perDevice[dev] = append(perDevice[dev], l)
		}
		if len(perDevice) != 3 {
			t.Fatalf("List (no access: %t) made calls %q; want those of loop2, loop9 and loop10", noAccess, log)
		}
		for _, n := range []int{2, 9, 10} {
			dev := DevicePath(n)
			want := []string{"open " + dev}
			if !noAccess {
				want = append(want, "LOOP_GET_STATUS64 "+dev, "BLKSSZGET "+dev, "BLKGETSIZE64 "+dev,
					"BLKGETDISKSEQ "+dev, "close "+dev)
			}
			if !slices.Equal(perDevice[dev], want) {
				t.Fatalf("List (no access: %t) made calls %q on %s; want %q", noAccess, perDevice[dev], dev, want)
			}
		}

		link := filepath.Join(t.TempDir(), "link")
		if err := os.Link(f10.Name(), link); err != nil {
			t.Fatal(err)
		}
		for path, want := range map[string][]Status{f2.Name(): want[:1], link: want[2:], kerneltest.TempFile(t, 1).Name(): nil} {
			before := len(k.calls(""))
			got, err := k.sys.FindByBackingFile(path)
			if err != nil || !slices.Equal(got, want) {
				t.Errorf("k.sys.FindByBackingFile(%s) = %+v, %v; want %+v", path, got, err, want)
			}
			// Devices of other files are passed over at LOOP_GET_STATUS64.
			if n := len(filterFrom(k.calls(""), before, "BLKSSZGET")); !noAccess && n != len(want) {
				t.Errorf("k.sys.FindByBackingFile(%s) read the block size of %d devices, want %d", path, n, len(want))
			}
		}
		if _, err := k.sys.FindByBackingFile(filepath.Join(t.TempDir(), "missing")); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("k.sys.FindByBackingFile(missing) = %v", err)
		}
		if n := k.deviceHandles(); n != 3 { // the test's own Devices
			t.Fatalf("%d device handles open", n)
		}
	}
}

// filterFrom returns the lines of log from index from on that start with
// prefix.
func filterFrom(log []string, from int, prefix string) []string {
	var out []string
	for _, l := range log[from:] {
		if strings.HasPrefix(l, prefix) {
			out = append(out, l)
		}
	}
	return out
}

func TestListDeletedFake(t *testing.T) {
	t.Parallel()
	for _, noAccess := range []bool{false, true} {
		k := useFake(t, 1)
		_, f := bindFake(t, k, 0, Options{})
		var st unix.Stat_t
		if err := unix.Stat(f.Name(), &st); err != nil {
			t.Fatal(err)
		}
		os.Remove(f.Name())
		// The kernel marks an unlinked backing file so.
		k.mu.Lock()
		k.devs[0].backing = f.Name() + " (deleted)"
		k.sync(0)
		k.mu.Unlock()
		k.noAccess = noAccess
		list, err := k.sys.List()
		if err != nil || len(list) != 1 {
			t.Fatalf("List = %+v, %v", list, err)
		}
		s := list[0]
		if !s.Deleted() || s.BackingFile != f.Name()+" (deleted)" {
			t.Fatalf("not shown deleted: %+v", s)
		}
		// The device knows the file; without access, nothing does.
		wantDev, wantIno := uint64(st.Dev), uint64(st.Ino)
		if noAccess {
			wantDev, wantIno = 0, 0
		}
		if s.BackingDevice != wantDev || s.BackingInode != wantIno {
			t.Fatalf("no access %t: ids %d:%d, want %d:%d", noAccess, s.BackingDevice, s.BackingInode, wantDev, wantIno)
		}
	}
}

// TestListSysfsLayout: List reads the devices from
// /sys/devices/virtual/block, where their directories are, not through
// /sys/block's symbolic links (which cost the kernel as much as the read);
// on a sysfs without that directory, from /sys/block.
func TestListSysfsLayout(t *testing.T) {
	t.Parallel()
	for _, flat := range []bool{false, true} {
		k := useFake(t, 0)
		k.flatSysfs = flat
		if flat {
			os.RemoveAll(k.root + "/devices")
		}
		for n := range 3 {
			k.add(n)
		}
		_, f := bindFake(t, k, 1, Options{})
		if !flat {
			// Without the links, only the real directories remain to be
			// found.
			for n := range 3 {
				os.Remove(fmt.Sprintf("%s/block/loop%d", k.root, n))
			}
		}
		for _, noAccess := range []bool{false, true} {
			k.noAccess = noAccess
			list, err := k.sys.List()
			if err != nil || len(list) != 1 || list[0].Number != 1 || list[0].BackingFile != f.Name() {
				t.Errorf("flat sysfs %t, no access %t: List = %+v, %v", flat, noAccess, list, err)
			}
		}
	}
}

// TestListMalformed: a sysfs value that does not parse is an error, from
// the sysfs reads of a process without access to the devices.
func TestListMalformed(t *testing.T) {
	t.Parallel()
	k := useFake(t, 1)
	bindFake(t, k, 0, Options{})
	k.noAccess = true
	k.write(k.root+"/block/loop0/loop/offset", "12x\n")
	if _, err := k.sys.List(); err == nil || !errors.As(err, new(*Error)) {
		t.Fatalf("List with a malformed offset = %v", err)
	}
}

// TestListUnboundDuringRead: a device unbound while List reads it is left
// out, without error, on both paths.
func TestListUnboundDuringRead(t *testing.T) {
	t.Parallel()
	k := useFake(t, 1)
	bindFake(t, k, 0, Options{})
	k.noAccess = true
	// backing_file is there, the rest already gone.
	os.Remove(k.root + "/block/loop0/loop/dio")
	if list, err := k.sys.List(); err != nil || len(list) != 0 {
		t.Fatalf("List = %+v, %v; want none", list, err)
	}

	// Unbound after LOOP_GET_STATUS64: sysfs has no backing_file then.
	k = useFake(t, 1)
	bindFake(t, k, 0, Options{})
	k.actAt("BLKSSZGET", 1, func(k *fakeKernel) { k.devs[0].bound = false; k.sync(0) }, nil)
	if list, err := k.sys.List(); err != nil || len(list) != 0 {
		t.Fatalf("List = %+v, %v; want none", list, err)
	}
}

// TestListIoctlError: a failure of the device's own answers is an error
// naming the device and the step.
func TestListIoctlError(t *testing.T) {
	t.Parallel()
	k := useFake(t, 2)
	bindFake(t, k, 1, Options{})
	k.failAt("BLKGETSIZE64", 1, unix.EIO)
	_, err := k.sys.List()
	var e *Error
	if !errors.As(err, &e) || e.Path != "/dev/loop1" || !errors.Is(err, unix.EIO) || !strings.Contains(err.Error(), "BLKGETSIZE64") {
		t.Fatalf("List = %v, want an *Error for /dev/loop1, BLKGETSIZE64, EIO", err)
	}
}

// TestListRundownFake: a device cleared by its only opener stays in sysfs
// until that opener closes it (Linux 6.11 and later); meanwhile nothing
// reports it bound.
func TestListRundownFake(t *testing.T) {
	t.Parallel()
	k := useFake(t, 2)
	d, f := bindFake(t, k, 1, Options{})
	if err := d.ClearFD(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(k.root + "/block/loop1/loop/backing_file"); err != nil {
		t.Fatalf("the fake should keep sysfs until the last close: %v", err)
	}
	if list, err := k.sys.List(); err != nil || len(list) != 0 {
		t.Fatalf("List = %+v, %v; want nothing", list, err)
	}
	if found, err := k.sys.FindByBackingFile(f.Name()); err != nil || len(found) != 0 {
		t.Fatalf("FindByBackingFile = %+v, %v; want nothing", found, err)
	}
	if _, err := d.Status(); !errors.Is(err, ErrNotBound) {
		t.Fatalf("Status = %v, want ErrNotBound", err)
	}
	_, err := k.sys.OpenDevice(1)
	var e *Error
	if !errors.Is(err, ErrNotBound) || !errors.Is(err, unix.ENXIO) || !errors.As(err, &e) || e.Op != "open" || e.Path != "/dev/loop1" {
		t.Fatalf("OpenDevice = %v, want an *Error of the open matching ErrNotBound and ENXIO", err)
	}
	d.Close()
	if _, err := k.sys.OpenDevice(1); err != nil {
		t.Fatalf("OpenDevice after the last close = %v", err)
	}
}

// TestListMidTeardown: the kernel empties backing_file before it removes
// the loop/ directory; such a device is left out, on both paths.
func TestListMidTeardown(t *testing.T) {
	t.Parallel()
	for _, noAccess := range []bool{false, true} {
		k := useFake(t, 1)
		bindFake(t, k, 0, Options{})
		k.mu.Lock()
		k.devs[0].backing = ""
		k.sync(0)
		k.mu.Unlock()
		k.noAccess = noAccess
		if list, err := k.sys.List(); err != nil || len(list) != 0 {
			t.Fatalf("no access %t: List = %+v, %v; want none", noAccess, list, err)
		}
	}
}

func TestUnbinding(t *testing.T) {
	for _, tt := range []struct {
		err  error
		keep bool
	}{
		{nil, false},
		{&os.PathError{Op: "open", Path: "x", Err: unix.ENOENT}, false},
		{&os.PathError{Op: "read", Path: "x", Err: unix.ENODEV}, false}, // removed while open
		{&os.PathError{Op: "open", Path: "x", Err: unix.EACCES}, true},
		{&os.PathError{Op: "read", Path: "x", Err: unix.EIO}, true},
	} {
		if got := unbinding(tt.err); (got != nil) != tt.keep {
			t.Errorf("unbinding(%v) = %v", tt.err, got)
		}
	}
}

// openDescriptors returns the descriptors open in this process, found
// with fcntl, which opens none itself.
func openDescriptors(t *testing.T) []int {
	t.Helper()
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	var fds []int
	for fd := range int(min(lim.Cur, 1<<16)) {
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err == nil {
			fds = append(fds, fd)
		}
	}
	return fds
}

// openFiles maps each descriptor open in this process to the device and
// inode of its file.
type openFiles map[int][2]uint64

// filesOpen returns the descriptors open now and their files, found with
// fstat, which opens none itself.
func filesOpen(t *testing.T) openFiles {
	t.Helper()
	files := make(openFiles)
	for _, fd := range openDescriptors(t) {
		var st unix.Stat_t
		if unix.Fstat(fd, &st) == nil {
			files[fd] = [2]uint64{uint64(st.Dev), st.Ino}
		}
	}
	return files
}

// leftOpen returns the descriptors open now on a file that was not open
// on that descriptor before. A descriptor closed meanwhile is none of the
// lookup's: an *os.File that an earlier test dropped is closed by its
// finalizer, on the runtime's schedule. A number reused for another file
// counts as new.
func leftOpen(t *testing.T, before openFiles) []int {
	t.Helper()
	var left []int
	for fd, file := range filesOpen(t) {
		if was, ok := before[fd]; !ok || was != file {
			left = append(left, fd)
		}
	}
	slices.Sort(left)
	return left
}

// withDescriptors runs fn with the process allowed extra descriptors
// beyond those it has open: RLIMIT_NOFILE is lowered to the number below
// which exactly extra are free, and set back after.
func withDescriptors(t *testing.T, extra int, fn func()) {
	t.Helper()
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	open := openDescriptors(t)
	limit := 0
	for free := 0; ; limit++ {
		if !slices.Contains(open, limit) {
			if free == extra {
				break
			}
			free++
		}
	}
	low := lim
	low.Cur = uint64(limit)
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &low); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			t.Fatal(err)
		}
	}()
	fn()
}

// TestLookupsOutOfDescriptors runs each lookup with ever more descriptors
// to spare, so that each open it makes in turn fails with EMFILE (the
// sysfs directory, the attributes; the device's open, which the fake
// kernel serves, through a fault): each such failure is an *Error that
// says what ran out and matches EMFILE, and leaves no descriptor open and
// no device bound. None is taken for a reason to read a device another
// way: a device whose open fails with EMFILE or ENFILE is never read from
// sysfs instead.
func TestLookupsOutOfDescriptors(t *testing.T) {
	for _, noAccess := range []bool{false, true} {
		k := useFake(t, 4)
		_, f1 := bindFake(t, k, 1, Options{Ref: "mine"})
		_, f3 := bindFake(t, k, 3, Options{})
		k.noAccess = noAccess
		lookups := []struct {
			name  string
			run   func() (int, error) // how many it found
			found int
			// opens is what the paths of the opens that fail must
			// include, by their ends: the devices' sysfs directory, and
			// the backing_file of a device read.
			opens []string
		}{
			{"List", func() (int, error) { s, err := k.sys.List(); return len(s), err }, 2, []string{"/block", "/loop/backing_file"}},
			{"FindByBackingFile", func() (int, error) { s, err := k.sys.FindByBackingFile(f3.Name()); return len(s), err }, 1,
				[]string{"/block", "/loop/backing_file"}},
			{"FindByRef", func() (int, error) { s, err := k.sys.FindByRef("mine"); return len(s), err }, 1,
				[]string{"/block", "/loop/backing_file"}},
			{"Attach with Reuse", func() (int, error) {
				d, err := k.sys.Attach(context.Background(), f1.Name(), Options{Ref: "mine", Reuse: true})
				if err != nil {
					return 0, err
				}
				defer d.Close()
				if !d.Shared() {
					t.Errorf("Attach with Reuse bound %s anew", d.Path())
				}
				return 1, nil
			}, 1, []string{f1.Name(), "/loop/backing_file"}},
			// A reference that matches nothing reads no backing_file.
			{"Sweep", func() (int, error) { s, err := k.sys.Sweep(context.Background(), "nobody's"); return len(s), err }, 0,
				[]string{"/block"}},
		}
		for _, l := range lookups {
			if noAccess && (l.name != "List" && l.name != "FindByBackingFile") {
				continue // the reference is only in the device
			}
			var failed []string // the paths whose open failed, in turn
			for extra := 0; ; extra++ {
				if extra == 8 {
					t.Fatalf("no access %t: %s failed with 8 descriptors to spare: %v", noAccess, l.name, failed)
				}
				before, bound := filesOpen(t), k.bound()
				var found int
				var err error
				withDescriptors(t, extra, func() { found, err = l.run() })
				if left := leftOpen(t, before); len(left) != 0 {
					t.Fatalf("no access %t: %s with %d to spare left descriptors %v open", noAccess, l.name, extra, left)
				}
				if now := k.bound(); !slices.Equal(now, bound) {
					t.Fatalf("no access %t: %s with %d to spare: bound %v, was %v", noAccess, l.name, extra, now, bound)
				}
				if err == nil {
					if found != l.found {
						t.Fatalf("no access %t: %s found %d, want %d", noAccess, l.name, found, l.found)
					}
					break
				}
				var e *Error
				var pe *os.PathError
				if !errors.As(err, &e) || !errors.Is(err, unix.EMFILE) || !errors.As(err, &pe) ||
					!strings.Contains(err.Error(), "no file descriptor left (its limit, RLIMIT_NOFILE, is ") {
					t.Fatalf("no access %t: %s with %d to spare = %v; want an *Error of an open, matching EMFILE, saying what ran out", noAccess, l.name, extra, err)
				}
				failed = append(failed, pe.Path)
			}
			for _, end := range l.opens {
				if !slices.ContainsFunc(failed, func(p string) bool { return strings.HasSuffix(p, end) }) {
					t.Errorf("no access %t: %s failed at the opens of %q; want one of ...%s among them", noAccess, l.name, failed, end)
				}
			}
		}

		// The device's own open.
		for _, errno := range []unix.Errno{unix.EMFILE, unix.ENFILE} {
			k.failAt("open /dev/loop3", k.counts["open /dev/loop3"]+1, errno)
			before := filesOpen(t)
			list, err := k.sys.List()
			var e *Error
			switch {
			case noAccess:
				// Without access the open fails with EACCES first: sysfs.
				continue
			case err == nil:
				t.Fatalf("List with %v from the open of loop3 = %+v; want the error, not sysfs's answer", errno, list)
			case !errors.As(err, &e) || e.Path != "/dev/loop3" || !errors.Is(err, errno) ||
				!strings.Contains(err.Error(), map[unix.Errno]string{unix.EMFILE: "no file descriptor left", unix.ENFILE: "no file left"}[errno]):
				t.Fatalf("List with %v from the open of loop3 = %v; want an *Error of /dev/loop3 saying what ran out", errno, err)
			}
			if left := leftOpen(t, before); len(left) != 0 {
				t.Fatalf("List left descriptors %v open", left)
			}
		}
	}
}
