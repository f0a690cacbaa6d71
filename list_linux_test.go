//go:build !loopctl_stub

package loopctl

import (
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// bindFake binds a new temporary file to fake device n with o.
func bindFake(t *testing.T, k *fakeKernel, n int, o Options) (*Device, *os.File) {
	t.Helper()
	f := tempFile(t, 1<<20)
	d := fakeDevice(t, k, n)
	if err := d.Configure(f, o); err != nil {
		t.Fatal(err)
	}
	return d, f
}

func TestListFake(t *testing.T) {
	// With access to the devices, List asks them; without, it reads sysfs:
	// the same answers.
	for _, noAccess := range []bool{false, true} {
		k := useFake(t, 12)
		_, f2 := bindFake(t, k, 2, Options{Offset: 512, Flags: FlagAutoClear})
		_, f10 := bindFake(t, k, 10, Options{SizeLimit: 4096, Flags: FlagReadOnly | FlagPartScan | FlagDirectIO})
		_, f9 := bindFake(t, k, 9, Options{BlockSize: 4096})
		k.noAccess = noAccess
		before := len(k.calls(""))
		list, err := List()
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
		// Each device is opened once, asked, and closed.
		var wantLog []string
		for n := range 12 {
			dev := DevicePath(n)
			wantLog = append(wantLog, "open "+dev)
			if noAccess {
				continue
			}
			wantLog = append(wantLog, "LOOP_GET_STATUS64 "+dev)
			if n == 2 || n == 9 || n == 10 {
				wantLog = append(wantLog, "BLKSSZGET "+dev, "BLKGETSIZE64 "+dev, "BLKGETDISKSEQ "+dev)
			}
			wantLog = append(wantLog, "close "+dev)
		}
		if log := k.calls("")[before:]; !slices.Equal(log, wantLog) {
			t.Fatalf("List (no access: %t) made calls %q", noAccess, log)
		}

		link := filepath.Join(t.TempDir(), "link")
		if err := os.Link(f10.Name(), link); err != nil {
			t.Fatal(err)
		}
		for path, want := range map[string][]Status{f2.Name(): want[:1], link: want[2:], tempFile(t, 1).Name(): nil} {
			before := len(k.calls(""))
			got, err := FindByBackingFile(path)
			if err != nil || !slices.Equal(got, want) {
				t.Errorf("FindByBackingFile(%s) = %+v, %v; want %+v", path, got, err, want)
			}
			// Devices of other files are passed over at LOOP_GET_STATUS64.
			if n := len(filterFrom(k.calls(""), before, "BLKSSZGET")); !noAccess && n != len(want) {
				t.Errorf("FindByBackingFile(%s) read the block size of %d devices, want %d", path, n, len(want))
			}
		}
		if _, err := FindByBackingFile(filepath.Join(t.TempDir(), "missing")); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("FindByBackingFile(missing) = %v", err)
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
		list, err := List()
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
			list, err := List()
			if err != nil || len(list) != 1 || list[0].Number != 1 || list[0].BackingFile != f.Name() {
				t.Errorf("flat sysfs %t, no access %t: List = %+v, %v", flat, noAccess, list, err)
			}
		}
	}
}

// TestListMalformed: a sysfs value that does not parse is an error, from
// the sysfs reads of a process without access to the devices.
func TestListMalformed(t *testing.T) {
	k := useFake(t, 1)
	bindFake(t, k, 0, Options{})
	k.noAccess = true
	k.write(k.root+"/block/loop0/loop/offset", "12x\n")
	if _, err := List(); err == nil || !errors.As(err, new(*Error)) {
		t.Fatalf("List with a malformed offset = %v", err)
	}
}

// TestListUnboundDuringRead: a device unbound while List reads it is left
// out, without error, on both paths.
func TestListUnboundDuringRead(t *testing.T) {
	k := useFake(t, 1)
	bindFake(t, k, 0, Options{})
	k.noAccess = true
	// backing_file is there, the rest already gone.
	os.Remove(k.root + "/block/loop0/loop/dio")
	if list, err := List(); err != nil || len(list) != 0 {
		t.Fatalf("List = %+v, %v; want none", list, err)
	}

	// Unbound after LOOP_GET_STATUS64: sysfs has no backing_file then.
	k = useFake(t, 1)
	bindFake(t, k, 0, Options{})
	k.actAt("BLKSSZGET", 1, func(k *fakeKernel) { k.devs[0].bound = false; k.sync(0) }, nil)
	if list, err := List(); err != nil || len(list) != 0 {
		t.Fatalf("List = %+v, %v; want none", list, err)
	}
}

// TestListIoctlError: a failure of the device's own answers is an error
// naming the device and the step.
func TestListIoctlError(t *testing.T) {
	k := useFake(t, 2)
	bindFake(t, k, 1, Options{})
	k.failAt("BLKGETSIZE64", 1, unix.EIO)
	_, err := List()
	var e *Error
	if !errors.As(err, &e) || e.Path != "/dev/loop1" || !errors.Is(err, unix.EIO) || !strings.Contains(err.Error(), "BLKGETSIZE64") {
		t.Fatalf("List = %v, want an *Error for /dev/loop1, BLKGETSIZE64, EIO", err)
	}
}

// TestListRundownFake: a device cleared by its only opener stays in sysfs
// until that opener closes it (Linux 6.11 and later); meanwhile nothing
// reports it bound.
func TestListRundownFake(t *testing.T) {
	k := useFake(t, 2)
	d, f := bindFake(t, k, 1, Options{})
	if err := d.ClearFD(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(k.root + "/block/loop1/loop/backing_file"); err != nil {
		t.Fatalf("the fake should keep sysfs until the last close: %v", err)
	}
	if list, err := List(); err != nil || len(list) != 0 {
		t.Fatalf("List = %+v, %v; want nothing", list, err)
	}
	if found, err := FindByBackingFile(f.Name()); err != nil || len(found) != 0 {
		t.Fatalf("FindByBackingFile = %+v, %v; want nothing", found, err)
	}
	if _, err := d.Status(); !errors.Is(err, ErrNotBound) {
		t.Fatalf("Status = %v, want ErrNotBound", err)
	}
	_, err := OpenDevice(1)
	var pe *os.PathError
	if !errors.Is(err, ErrNotBound) || !errors.Is(err, unix.ENXIO) || !errors.As(err, &pe) || pe.Path != "/dev/loop1" {
		t.Fatalf("OpenDevice = %v, want an *os.PathError matching ErrNotBound and ENXIO", err)
	}
	d.Close()
	if _, err := OpenDevice(1); err != nil {
		t.Fatalf("OpenDevice after the last close = %v", err)
	}
}

// TestListMidTeardown: the kernel empties backing_file before it removes
// the loop/ directory; such a device is left out, on both paths.
func TestListMidTeardown(t *testing.T) {
	for _, noAccess := range []bool{false, true} {
		k := useFake(t, 1)
		bindFake(t, k, 0, Options{})
		k.mu.Lock()
		k.devs[0].backing = ""
		k.sync(0)
		k.mu.Unlock()
		k.noAccess = noAccess
		if list, err := List(); err != nil || len(list) != 0 {
			t.Fatalf("no access %t: List = %+v, %v; want none", noAccess, list, err)
		}
	}
}

// TestStatusMidTeardown: a teardown that begins between LOOP_GET_STATUS64
// and the sysfs read empties backing_file; Status keeps lo_file_name.
func TestStatusMidTeardown(t *testing.T) {
	k := useFake(t, 1)
	d, f := bindFake(t, k, 0, Options{})
	k.mu.Lock()
	k.devs[0].backing = "" // what sysfs shows from the kernel's next sync on
	k.mu.Unlock()
	s, err := d.Status()
	if want := f.Name()[:unix.LO_NAME_SIZE-1]; err != nil || s.BackingFile != want {
		t.Fatalf("Status = %+v, %v; want lo_file_name %q", s, err, want)
	}
}

func TestPartitionsFake(t *testing.T) {
	k := useFake(t, 4)
	d, _ := bindFake(t, k, 3, Options{Flags: FlagPartScan})
	k.addPartition(3, 10, 100, 10)
	k.addPartition(3, 1, 2048, 4096)
	k.addPartition(3, 2, 8192, 2048)
	k.addPartition(3, 5, 1, 1)
	os.Remove(k.root + "/block/loop3/loop3p5/size") // removed while read
	if err := os.Mkdir(k.root+"/block/loop3/loop3p02", 0o755); err != nil {
		t.Fatal(err)
	}
	parts, err := d.Partitions()
	if err != nil {
		t.Fatal(err)
	}
	want := []Partition{
		{Number: 1, Path: "/dev/loop3p1", Start: 2048 * 512, Size: 4096 * 512},
		{Number: 2, Path: "/dev/loop3p2", Start: 8192 * 512, Size: 2048 * 512},
		{Number: 10, Path: "/dev/loop3p10", Start: 100 * 512, Size: 10 * 512},
	}
	if !slices.Equal(parts, want) {
		t.Fatalf("Partitions = %+v, want %+v", parts, want)
	}
	k.write(k.root+"/block/loop3/loop3p1/start", "x\n")
	if _, err := d.Partitions(); !errors.As(err, new(*Error)) {
		t.Fatalf("Partitions with a malformed start = %v", err)
	}
	d1 := fakeDevice(t, k, 1)
	if parts, err := d1.Partitions(); err != nil || len(parts) != 0 {
		t.Fatalf("Partitions of an unbound device = %+v, %v", parts, err)
	}
}

func TestRescanFake(t *testing.T) {
	k := useFake(t, 3)
	d, _ := bindFake(t, k, 0, Options{})
	if err := d.Rescan(); !errors.Is(err, fs.ErrInvalid) || !strings.Contains(err.Error(), "FlagPartScan") {
		t.Fatalf("Rescan without partscan = %v, want it refused", err)
	}
	if got := k.calls("BLKRRPART"); len(got) != 0 {
		t.Fatalf("asked the kernel: %q", got)
	}
	d2, _ := bindFake(t, k, 1, Options{Flags: FlagPartScan})
	if err := d2.Rescan(); err != nil {
		t.Fatal(err)
	}
	if got := k.calls("BLKRRPART"); len(got) != 1 {
		t.Fatalf("BLKRRPART calls %q", got)
	}
	if err := fakeDevice(t, k, 2).Rescan(); !errors.Is(err, ErrNotBound) {
		t.Fatalf("Rescan of an unbound device = %v", err)
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

func TestSetStatusFake(t *testing.T) {
	k := useFake(t, 1)
	d, _ := bindFake(t, k, 0, Options{Flags: FlagPartScan})
	before := len(k.calls("LOOP_SET_STATUS64"))
	for _, s := range []Status{
		{Flags: FlagPartScan | FlagReadOnly},
		{Flags: FlagPartScan | FlagDirectIO},
		{Flags: 0},
		{Flags: FlagPartScan | 0x80},
		{Flags: FlagPartScan, Offset: 1 << 63},
	} {
		if err := d.SetStatus(s); !errors.Is(err, fs.ErrInvalid) {
			t.Errorf("SetStatus(%+v) = %v, want fs.ErrInvalid", s, err)
		}
	}
	if n := len(k.calls("LOOP_SET_STATUS64")); n != before {
		t.Fatal("a refused SetStatus reached the kernel")
	}
	k.failAt("LOOP_SET_STATUS64", 1, unix.EAGAIN)
	if err := d.SetStatus(Status{Offset: 1024, SizeLimit: 2048, Flags: FlagPartScan | FlagAutoClear}); err != nil {
		t.Fatal(err)
	}
	s, err := d.Status()
	if err != nil || s.Offset != 1024 || s.SizeLimit != 2048 || s.Flags != FlagPartScan|FlagAutoClear {
		t.Fatalf("Status = %+v, %v", s, err)
	}
	if name := unix.ByteSliceToString(k.devs[0].info.File_name[:]); name == "" {
		t.Fatal("SetStatus erased lo_file_name")
	}
}

func TestDeviceSettersFake(t *testing.T) {
	k := useFake(t, 1)
	d, f := bindFake(t, k, 0, Options{})
	before := len(k.calls("LOOP_"))
	for _, size := range []uint32{0, 1, 511, 768, 4095} {
		if err := d.SetBlockSize(size); !errors.Is(err, fs.ErrInvalid) {
			t.Errorf("SetBlockSize(%d) = %v", size, err)
		}
	}
	if err := d.ChangeFD(f); !errors.Is(err, fs.ErrInvalid) { // read-write device
		t.Errorf("ChangeFD on a read-write device = %v", err)
	}
	if got := k.calls("LOOP_")[before:]; !slices.Equal(got, []string{"LOOP_GET_STATUS64 /dev/loop0"}) {
		t.Fatalf("refused calls reached the kernel: %q", got)
	}
	k.failAt("LOOP_SET_BLOCK_SIZE", 1, unix.EAGAIN)
	if err := d.SetBlockSize(4096); err != nil || k.devs[0].blockSize != 4096 {
		t.Fatalf("SetBlockSize(4096) = %v, size %d", err, k.devs[0].blockSize)
	}
	for _, on := range []bool{true, false} {
		if err := d.SetDirectIO(on); err != nil || k.devs[0].directIO != on {
			t.Fatalf("SetDirectIO(%v) = %v", on, err)
		}
	}
	if err := d.SetCapacity(); err != nil {
		t.Fatal(err)
	}
	d.ClearFD()
	for name, err := range map[string]error{
		"SetCapacity": d.SetCapacity(), "SetDirectIO": d.SetDirectIO(true),
		"SetBlockSize": d.SetBlockSize(512), "SetStatus": d.SetStatus(Status{}), "ChangeFD": d.ChangeFD(f),
	} {
		if !errors.Is(err, ErrNotBound) {
			t.Errorf("%s on an unbound device = %v, want ErrNotBound", name, err)
		}
	}
	d.Close()
	for name, err := range map[string]error{
		"SetCapacity": d.SetCapacity(), "SetDirectIO": d.SetDirectIO(true),
		"SetBlockSize": d.SetBlockSize(512), "SetStatus": d.SetStatus(Status{}), "ChangeFD": d.ChangeFD(f),
	} {
		if !errors.Is(err, fs.ErrClosed) {
			t.Errorf("%s after Close = %v, want fs.ErrClosed", name, err)
		}
	}
}

// TestHeldFilesEnd checks what a look's end does to the held descriptors:
// those of earlier bindings closed unless replaced since, the first
// descriptor opened for a device kept and a later one closed, those of
// devices no longer listed closed, all of them closed for another
// directory.
func TestHeldFilesEnd(t *testing.T) {
	open := func() int {
		fd, err := unix.Open(os.DevNull, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		return fd
	}
	isOpen := func(fd int) bool {
		_, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
		return err == nil
	}
	var c heldFiles
	t.Cleanup(func() {
		c.mu.Lock()
		c.closeIf(func(int) bool { return true })
		c.mu.Unlock()
	})
	dir := blockDir{path: "/sys/devices/virtual/block", sysfs: true}
	look := func(nums []int, changes ...heldChange) {
		t.Helper()
		l := c.begin(dir)
		sc := &scratch{look: l, changes: changes}
		for _, n := range nums {
			sc.lookUp(n)
		}
		c.end(l, nums, []*scratch{sc})
	}
	held := func(want map[int]int) {
		t.Helper()
		if !maps.Equal(c.fds, want) {
			t.Fatalf("held %v, want %v", c.fds, want)
		}
	}

	a, b := open(), open()
	look([]int{1, 2}, heldChange{n: 1, fd: a, put: true}, heldChange{n: 2, fd: b, put: true})
	held(map[int]int{1: a, 2: b})

	// Two readers opened device 1's attribute: the first is held.
	a2 := open()
	look([]int{1, 2}, heldChange{n: 1, fd: a}, heldChange{n: 1, fd: a2, put: true})
	held(map[int]int{1: a2, 2: b})
	if isOpen(a) {
		t.Fatalf("descriptor %d of an earlier binding left open", a)
	}
	a3 := open()
	look([]int{1, 2}, heldChange{n: 1, fd: a3, put: true})
	held(map[int]int{1: a2, 2: b})
	if isOpen(a3) {
		t.Fatalf("second descriptor %d of device 1 left open", a3)
	}

	// A stale drop, of a descriptor replaced since, closes nothing.
	look([]int{1, 2}, heldChange{n: 1, fd: a})
	held(map[int]int{1: a2, 2: b})

	// Device 2 removed.
	look([]int{1})
	held(map[int]int{1: a2})
	if isOpen(b) || !isOpen(a2) {
		t.Fatalf("removed device's descriptor open: %v; listed device's: %v", isOpen(b), isOpen(a2))
	}

	// Another directory: everything goes.
	dir = blockDir{path: "/sys/block", sysfs: true}
	look([]int{1})
	held(map[int]int{})
	if isOpen(a2) {
		t.Fatalf("descriptor %d of another directory left open", a2)
	}

	// Not sysfs: nothing is held, and a look costs no lock.
	if l := c.begin(blockDir{path: t.TempDir()}); l != nil {
		t.Fatalf("a look at a fake tree: %+v", l)
	}
}
