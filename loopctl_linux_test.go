package loopctl

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"slices"
	"strings"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/kerneltest"
)

func TestRequestNumbers(t *testing.T) {
	for got, want := range map[uint]uint{
		reqSetFD: unix.LOOP_SET_FD, reqClearFD: unix.LOOP_CLR_FD,
		reqSetStatus64: unix.LOOP_SET_STATUS64, reqGetStatus64: unix.LOOP_GET_STATUS64,
		reqSetCapacity: unix.LOOP_SET_CAPACITY, reqSetDirectIO: unix.LOOP_SET_DIRECT_IO,
		reqSetBlockSize: unix.LOOP_SET_BLOCK_SIZE, reqConfigure: unix.LOOP_CONFIGURE,
		reqCtlAdd: unix.LOOP_CTL_ADD, reqCtlRemove: unix.LOOP_CTL_REMOVE, reqCtlGetFree: unix.LOOP_CTL_GET_FREE,
	} {
		if got != want {
			t.Errorf("request %#x, x/sys says %#x", got, want)
		}
	}
	// x/sys lacks LOOP_CHANGE_FD (0x4C06); the integration tests use it.
	for f, want := range map[Flags]int{FlagReadOnly: unix.LO_FLAGS_READ_ONLY, FlagAutoClear: unix.LO_FLAGS_AUTOCLEAR,
		FlagPartScan: unix.LO_FLAGS_PARTSCAN, FlagDirectIO: unix.LO_FLAGS_DIRECT_IO} {
		if int(f) != want {
			t.Errorf("%v = %#x, x/sys says %#x", f, uint32(f), want)
		}
	}
}

func fakeDevice(t *testing.T, k *fakeKernel, n int) *Device {
	t.Helper()
	d, err := k.sys.OpenDevice(n)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

// TestRemoveBusy: LOOP_CTL_REMOVE of an unbound device that another
// process has open (udev probing it) is tried again until it is let go
// of, or the tries run out; a bound device is refused at once. Each
// EBUSY says which it is.
func TestRemoveBusy(t *testing.T) {
	t.Parallel()
	k := useFake(t, 3)
	c, err := k.sys.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	probed := fakeDevice(t, k, 1) // open, unbound: as udev holds it
	k.actAt("LOOP_CTL_REMOVE", 3, func(k *fakeKernel) { k.devs[1].opens = 0 }, nil)
	if err := c.Remove(1); err != nil {
		t.Fatalf("Remove of a device let go of after two tries: %v", err)
	}
	if n := k.counts["LOOP_CTL_REMOVE"]; n != 3 {
		t.Fatalf("%d tries, want 3", n)
	}
	probed.Close()

	held := fakeDevice(t, k, 0)
	err = c.Remove(0)
	if !errors.Is(err, ErrBusy) || !errors.Is(err, unix.EBUSY) || !strings.Contains(err.Error(), "device is open") {
		t.Fatalf("Remove of a device held open = %v, want EBUSY saying it is open", err)
	}
	if n := k.counts["LOOP_CTL_REMOVE"]; n != 3+againTries+1 {
		t.Fatalf("%d tries in all, want %d", n, 3+againTries+1)
	}
	held.Close()

	bindFake(t, k, 2, Options{})
	before := k.counts["LOOP_CTL_REMOVE"]
	err = c.Remove(2)
	if !errors.Is(err, ErrBusy) || !strings.Contains(err.Error(), "device is bound") {
		t.Fatalf("Remove of a bound device = %v, want EBUSY saying it is bound", err)
	}
	if n := k.counts["LOOP_CTL_REMOVE"] - before; n != 1 {
		t.Fatalf("%d tries for a bound device, want 1", n)
	}
}

func TestInvalidInputMakesNoIoctl(t *testing.T) {
	t.Parallel()
	k := useFake(t, 2)
	c, err := k.sys.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	d := fakeDevice(t, k, 0)
	closedFile := kerneltest.TempFile(t, 4096)
	closedFile.Close()
	good := kerneltest.TempFile(t, 4096)

	calls := map[string]func() error{
		"Add(-2)":                 func() error { _, err := c.Add(-2); return err },
		"Add(MaxNumber+1)":        func() error { _, err := c.Add(MaxNumber + 1); return err },
		"Remove(-1)":              func() error { return c.Remove(-1) },
		"Remove(MaxNumber+1)":     func() error { return c.Remove(MaxNumber + 1) },
		"k.sys.OpenDevice(-1)":    func() error { _, err := k.sys.OpenDevice(-1); return err },
		"k.sys.OpenDevice(1<<20)": func() error { _, err := k.sys.OpenDevice(1 << 20); return err },
		"SetFD(nil)":              func() error { return d.SetFD(nil) },
		"SetFD(closed)":           func() error { return d.SetFD(closedFile) },
		"Configure(nil)":          func() error { return d.Configure(nil, Options{}) },
		"Configure(closed)":       func() error { return d.Configure(closedFile, Options{}) },
		"Configure(flag 0x20)":    func() error { return d.Configure(good, Options{Flags: 0x20}) },
		"Configure(block 3)":      func() error { return d.Configure(good, Options{BlockSize: 3}) },
		"Configure(block 256)":    func() error { return d.Configure(good, Options{BlockSize: 256}) },
		"Configure(offset)":       func() error { return d.Configure(good, Options{Offset: 1 << 63}) },
	}
	for name, call := range calls {
		t.Run(name, func(t *testing.T) {
			before := len(k.calls(""))
			err := call()
			if !errors.Is(err, fs.ErrInvalid) {
				t.Fatalf("got %v, want an error matching fs.ErrInvalid", err)
			}
			var e *Error
			// A device number out of range names no path: no node has it.
			if !errors.As(err, &e) || e.Op == "" || e.Path == "" && !strings.HasPrefix(name, "k.sys.OpenDevice(") {
				t.Fatalf("got %#v, want an *Error naming op and path", err)
			}
			if log := k.calls("")[before:]; len(log) != 0 {
				t.Fatalf("calls reached the kernel: %q", log)
			}
			if b := k.bound(); len(b) != 0 {
				t.Fatalf("devices bound: %v", b)
			}
		})
	}
	if _, err := c.Add(-2); !errors.Is(err, fs.ErrInvalid) || err.(*Error).Path != ControlPath {
		t.Errorf("Add(-2) = %v, want the control path", err)
	}
	if err := c.Remove(MaxNumber + 1); err.(*Error).Path != ControlPath {
		t.Errorf("Remove(MaxNumber+1) = %v, want the control path", err)
	}
}

func TestClosedObjects(t *testing.T) {
	t.Parallel()
	k := useFake(t, 1)
	c, err := k.sys.Open()
	if err != nil {
		t.Fatal(err)
	}
	d := fakeDevice(t, k, 0)
	f := kerneltest.TempFile(t, 4096)
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("second Close = %v, want nil", err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatalf("second Close = %v, want nil", err)
	}
	if n := k.openHandles(); n != 0 {
		t.Fatalf("%d handles open after Close", n)
	}
	before := len(k.calls(""))
	for name, call := range map[string]func() error{
		"Add":       func() error { _, err := c.Add(AnyNumber); return err },
		"Remove":    func() error { return c.Remove(0) },
		"GetFree":   func() error { _, err := c.GetFree(); return err },
		"SetFD":     func() error { return d.SetFD(f) },
		"ClearFD":   func() error { return d.ClearFD() },
		"Status":    func() error { _, err := d.Status(); return err },
		"Configure": func() error { return d.Configure(f, Options{}) },
	} {
		if err := call(); !errors.Is(err, fs.ErrClosed) {
			t.Errorf("%s after Close = %v, want fs.ErrClosed", name, err)
		}
	}
	if log := k.calls("")[before:]; len(log) != 0 {
		t.Fatalf("calls after Close reached the kernel: %q", log)
	}
}

func TestConfigureFallback(t *testing.T) {
	t.Parallel()
	k := useFake(t, 2)
	k.noConfigure = true
	f := kerneltest.TempFile(t, 1<<20)
	d := fakeDevice(t, k, 0)
	o := Options{Offset: 512, SizeLimit: 4096, BlockSize: 4096, Flags: FlagAutoClear | FlagDirectIO}
	if err := d.Configure(f, o); err != nil {
		t.Fatal(err)
	}
	// The last: the check that direct I/O is on.
	want := []string{"LOOP_CONFIGURE", "LOOP_CONFIGURE", "LOOP_SET_FD", "LOOP_SET_STATUS64", "LOOP_SET_BLOCK_SIZE",
		"LOOP_SET_DIRECT_IO", "LOOP_GET_STATUS64"}
	if got := stepNames(k.calls("LOOP_")); !slices.Equal(got, want) {
		t.Fatalf("steps %q, want %q", got, want)
	}
	s, err := d.Status()
	if err != nil {
		t.Fatal(err)
	}
	if s.Offset != 512 || s.SizeLimit != 4096 || s.Flags != FlagAutoClear|FlagDirectIO || s.BackingFile != f.Name() {
		t.Fatalf("status %+v", s)
	}
	if dev := k.devs[0]; dev.blockSize != 4096 || !dev.directIO {
		t.Fatalf("block size %d, direct I/O %v", dev.blockSize, dev.directIO)
	}

	// Remembered: the next bind goes straight to LOOP_SET_FD.
	d1 := fakeDevice(t, k, 1)
	before := len(k.calls("LOOP_"))
	if err := d1.Configure(f, Options{}); err != nil {
		t.Fatal(err)
	}
	if got := stepNames(k.calls("LOOP_")[before:]); !slices.Equal(got, []string{"LOOP_SET_FD", "LOOP_SET_STATUS64"}) {
		t.Fatalf("second bind steps %q", got)
	}
}

func TestConfigureFallbackRollback(t *testing.T) {
	t.Parallel()
	for _, step := range []string{"LOOP_SET_STATUS64", "LOOP_SET_BLOCK_SIZE", "LOOP_SET_DIRECT_IO"} {
		for _, errno := range []unix.Errno{unix.EPERM, unix.EINVAL, unix.ENXIO, unix.EBUSY} {
			t.Run(step+"/"+unix.ErrnoName(errno), func(t *testing.T) {
				k := useFake(t, 1)
				k.sys.lacks(featConfigure)
				k.failAt(step, 1, errno)
				d := fakeDevice(t, k, 0)
				err := d.Configure(kerneltest.TempFile(t, 8192), Options{BlockSize: 4096, Flags: FlagDirectIO})
				if !errors.Is(err, errno) {
					t.Fatalf("Configure = %v, want %v", err, errno)
				}
				if _, err := d.Status(); !errors.Is(err, ErrNotBound) {
					t.Fatalf("Status after the rollback = %v, want ErrNotBound", err)
				}
				d.Close() // the rollback's LOOP_CLR_FD ends at the last close
				if b := k.bound(); len(b) != 0 {
					t.Fatalf("devices left bound: %v", b)
				}
				if got := k.calls("LOOP_CLR_FD"); len(got) != 1 {
					t.Fatalf("rollback calls %q, want one LOOP_CLR_FD", got)
				}
			})
		}
	}
}

func TestConfigureFallbackSetFDBusy(t *testing.T) {
	t.Parallel()
	k := useFake(t, 1)
	k.sys.lacks(featConfigure)
	k.failAt("LOOP_SET_FD", 1, unix.EBUSY)
	d := fakeDevice(t, k, 0)
	if err := d.Configure(kerneltest.TempFile(t, 4096), Options{}); !errors.Is(err, ErrBusy) {
		t.Fatalf("Configure = %v, want ErrBusy", err)
	}
	// The binding was not ours: it must not be cleared.
	if got := k.calls("LOOP_CLR_FD"); len(got) != 0 {
		t.Fatalf("cleared a binding it did not make: %q", got)
	}
}

func TestConfigureEAGAINRetried(t *testing.T) {
	t.Parallel()
	k := useFake(t, 1)
	k.sys.lacks(featConfigure)
	k.failAt("LOOP_SET_STATUS64", 1, unix.EAGAIN)
	k.failAt("LOOP_SET_STATUS64", 2, unix.EAGAIN)
	k.failAt("LOOP_SET_BLOCK_SIZE", 1, unix.EAGAIN)
	d := fakeDevice(t, k, 0)
	if err := d.Configure(kerneltest.TempFile(t, 8192), Options{BlockSize: 4096}); err != nil {
		t.Fatal(err)
	}
	if n, m := len(k.calls("LOOP_SET_STATUS64")), len(k.calls("LOOP_SET_BLOCK_SIZE")); n != 3 || m != 2 {
		t.Fatalf("SET_STATUS64 tried %d times, SET_BLOCK_SIZE %d", n, m)
	}
}

func TestConfigureEINVALIsNotFallback(t *testing.T) {
	t.Parallel()
	// A kernel with LOOP_CONFIGURE that refuses an argument answers the
	// probe with EBADF: the EINVAL is returned, with no fallback.
	k := useFake(t, 1)
	k.failAt("LOOP_CONFIGURE", 1, unix.EINVAL)
	d := fakeDevice(t, k, 0)
	err := d.Configure(kerneltest.TempFile(t, 4096), Options{BlockSize: 1 << 17})
	if !errors.Is(err, unix.EINVAL) || !errors.Is(err, fs.ErrInvalid) {
		t.Fatalf("Configure = %v, want EINVAL", err)
	}
	if !k.sys.has(featConfigure) || len(k.calls("LOOP_SET_FD")) != 0 {
		t.Fatal("fell back on an argument error")
	}
}

func TestStatusDecoding(t *testing.T) {
	info := unix.LoopInfo64{Device: 0xfe00, Inode: 12345, Offset: 4096, Sizelimit: 1 << 20, Number: 3, Flags: 12}
	copy(info.File_name[:], "/tmp/short.img")
	want := Status{Number: 3, BackingFile: "/tmp/short.img", BackingDevice: 0xfe00, BackingInode: 12345,
		Offset: 4096, SizeLimit: 1 << 20, Flags: FlagAutoClear | FlagPartScan, Ref: "/tmp/short.img"}
	if got := statusFromInfo(&info); got != want {
		t.Fatalf("statusFromInfo = %+v, want %+v", got, want)
	}
	// A name that fills lo_file_name with no terminator is cut at 64 bytes.
	for i := range info.File_name {
		info.File_name[i] = 'a'
	}
	if got := statusFromInfo(&info).BackingFile; len(got) != 64 {
		t.Fatalf("full lo_file_name decoded to %d bytes", len(got))
	}
	// loopInfo leaves room for the terminator.
	long := loopInfo(string(make([]byte, 100))+"x", Options{})
	if long.File_name[63] != 0 {
		t.Fatal("lo_file_name not terminated")
	}
}

func TestControlErrorsNameTheDevice(t *testing.T) {
	t.Parallel()
	k := useFake(t, 4)
	c, err := k.sys.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	d := fakeDevice(t, k, 3)
	err = c.Remove(3)
	var e *Error
	if !errors.As(err, &e) || e.Op != "remove" || e.Path != "/dev/loop3" || !errors.Is(err, ErrBusy) || !errors.Is(err, unix.EBUSY) {
		t.Fatalf("Remove of an open device = %v", err)
	}
	d.Close()
	if _, err := c.Add(3); !errors.Is(err, fs.ErrExist) || err.(*Error).Path != "/dev/loop3" {
		t.Fatalf("Add of an existing device = %v", err)
	}
	if err := c.Remove(3); err != nil {
		t.Fatal(err)
	}
	if err := c.Remove(3); !errors.Is(err, fs.ErrNotExist) || !errors.Is(err, unix.ENODEV) {
		t.Fatalf("Remove of a missing device = %v", err)
	}
	if n, err := c.Add(AnyNumber); err != nil || n != 3 {
		t.Fatalf("Add(AnyNumber) = %d, %v; want 3", n, err)
	}
}

// TestDirectIONotApplied: on a backing file system without O_DIRECT, older
// kernels bind with LOOP_CONFIGURE and leave direct I/O off without a word,
// and LOOP_SET_DIRECT_IO refuses it. Binding with FlagDirectIO fails
// instead, with ErrNoDirectIO, and clears its own binding; without the flag
// nothing changes.
func TestDirectIONotApplied(t *testing.T) {
	t.Parallel()
	for _, legacy := range []bool{false, true} {
		t.Run(fmt.Sprint("legacy=", legacy), func(t *testing.T) {
			k := useFake(t, 2)
			k.noDirectIO = true
			if legacy {
				k.sys.lacks(featConfigure)
			}
			f := kerneltest.TempFile(t, 1<<20)
			d := fakeDevice(t, k, 0)
			err := d.Configure(f, Options{Flags: FlagDirectIO})
			if !errors.Is(err, ErrNoDirectIO) || !errors.Is(err, unix.EINVAL) || !strings.Contains(err.Error(), "direct I/O") {
				t.Fatalf("Configure = %v, want ErrNoDirectIO", err)
			}
			if got := k.calls("LOOP_CLR_FD"); len(got) != 1 {
				t.Fatalf("rollback calls %q, want one LOOP_CLR_FD", got)
			}
			d.Close()
			if b := k.bound(); len(b) != 0 {
				t.Fatalf("left bound: %v", b)
			}
			_, err = k.sys.Attach(context.Background(), f.Name(), Options{Flags: FlagDirectIO})
			if !errors.Is(err, ErrNoDirectIO) {
				t.Fatalf("Attach = %v, want ErrNoDirectIO", err)
			}
			if b := k.bound(); len(b) != 0 {
				t.Fatalf("left bound: %v", b)
			}
			d, err = k.sys.Attach(context.Background(), f.Name(), Options{})
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			if err := d.SetDirectIO(true); !errors.Is(err, ErrNoDirectIO) || !errors.Is(err, unix.EINVAL) {
				t.Fatalf("SetDirectIO(true) = %v, want ErrNoDirectIO", err)
			}
			if err := d.SetDirectIO(false); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestAddAnyNumberOldKernel: before Linux 5.14, LOOP_CTL_ADD -1 answers
// EEXIST while an unbound device exists; Add picks the lowest number sysfs
// does not list, and the next one when another process takes that first,
// and once the kernel has answered so asks it no more.
func TestAddAnyNumberOldKernel(t *testing.T) {
	t.Parallel()
	k := useFake(t, 0)
	k.oldAdd = true
	for _, n := range []int{0, 1, 2, 5} {
		k.add(n)
	}
	c, err := k.sys.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if n, err := c.Add(AnyNumber); err != nil || n != 3 {
		t.Fatalf("Add(AnyNumber) = %d, %v; want 3, the lowest number not in use", n, err)
	}
	// Another process adds 4 between the sysfs read and LOOP_CTL_ADD. The
	// kernel's answer to -1 is known by now: it is not asked again.
	k.actAt("LOOP_CTL_ADD", 3, func(k *fakeKernel) { k.add(4) }, nil)
	if n, err := c.Add(AnyNumber); err != nil || n != 6 {
		t.Fatalf("Add(AnyNumber) = %d, %v; want 6", n, err)
	}
	if got := stepNames(k.calls("LOOP_CTL_ADD")); len(got) != 4 {
		t.Fatalf("LOOP_CTL_ADD calls %q: -1 and 3, then 4 and 6", got)
	}
}

func stepNames(log []string) []string {
	out := make([]string, len(log))
	for i, l := range log {
		out[i], _, _ = strings.Cut(l, " ")
	}
	return out
}

// FuzzStatusDecoding decodes LOOP_GET_STATUS64's structure from raw bytes:
// any name (with or without a terminator, any bytes), any flags. Every
// field must come through as the kernel gave it, the name up to its first
// NUL and never past lo_file_name's 64 bytes.
func FuzzStatusDecoding(f *testing.F) {
	var info unix.LoopInfo64
	raw := unsafe.Slice((*byte)(unsafe.Pointer(&info)), unsafe.Sizeof(info))
	f.Add(append([]byte(nil), raw...))
	info = unix.LoopInfo64{Device: 0xfe00, Inode: 12345, Offset: 4096, Sizelimit: 1 << 20, Number: 3, Flags: 0xffffffff}
	copy(info.File_name[:], strings.Repeat("n", 64)) // no terminator
	f.Add(append([]byte(nil), raw...))
	f.Add([]byte("short"))
	f.Fuzz(func(t *testing.T, b []byte) {
		var info unix.LoopInfo64
		copy(unsafe.Slice((*byte)(unsafe.Pointer(&info)), unsafe.Sizeof(info)), b)
		s := statusFromInfo(&info)
		name, _, _ := strings.Cut(string(info.File_name[:]), "\x00")
		if s.BackingFile != name || len(s.BackingFile) > unix.LO_NAME_SIZE || strings.ContainsRune(s.BackingFile, 0) {
			t.Fatalf("name %q from %q", s.BackingFile, info.File_name)
		}
		want := Status{Number: int(info.Number), BackingFile: name, BackingDevice: info.Device, BackingInode: info.Inode,
			Offset: info.Offset, SizeLimit: info.Sizelimit, Flags: Flags(info.Flags), Ref: name}
		if s != want {
			t.Fatalf("statusFromInfo = %+v, want %+v", s, want)
		}
		if s.Deleted() != strings.HasSuffix(name, " (deleted)") {
			t.Fatalf("Deleted() = %v for %q", s.Deleted(), name)
		}
		_ = s.Flags.String()
	})
}

// TestOpenErrors: an open that fails, of the control device or of a loop
// device by number, is an *Error of op "open" naming the node, and its
// errno maps onto the same sentinels as any other call's.
func TestOpenErrors(t *testing.T) {
	t.Parallel()
	opens := map[string]struct {
		path string
		open func(k *fakeKernel) error
	}{
		"Open":          {ControlPath, func(k *fakeKernel) error { _, err := k.sys.Open(); return err }},
		"OpenDevice(1)": {"/dev/loop1", func(k *fakeKernel) error { _, err := k.sys.OpenDevice(1); return err }},
	}
	errnos := []struct {
		errno unix.Errno
		is    error
	}{
		{unix.ENODEV, fs.ErrNotExist},
		{unix.ENOENT, fs.ErrNotExist},
		{unix.EBUSY, ErrBusy},
		{unix.ENXIO, ErrNotBound},
		{unix.EACCES, fs.ErrPermission},
		{unix.EPERM, fs.ErrPermission},
		{unix.EINVAL, fs.ErrInvalid},
	}
	for name, o := range opens {
		for _, tt := range errnos {
			t.Run(name+"/"+unix.ErrnoName(tt.errno), func(t *testing.T) {
				k := useFake(t, 2)
				k.failAt("open "+o.path, 1, tt.errno)
				err := o.open(k)
				var e *Error
				if !errors.As(err, &e) || e.Op != "open" || e.Path != o.path {
					t.Fatalf("%s = %#v, want an *Error of op open on %s", name, err, o.path)
				}
				if !errors.Is(err, tt.errno) || !errors.Is(err, tt.is) {
					t.Errorf("%s = %v, want it to match %v and %v", name, err, tt.errno, tt.is)
				}
			})
		}
	}
	t.Run("missing node", func(t *testing.T) {
		k := useFake(t, 2)
		k.noNode[1] = true
		_, err := k.sys.OpenDevice(1)
		var e *Error
		var missing *NodeMissingError
		if !errors.As(err, &e) || e.Op != "open" || e.Path != "/dev/loop1" || !errors.As(err, &missing) ||
			missing.Number != 1 || !errors.Is(err, fs.ErrNotExist) || !errors.Is(err, unix.ENOENT) {
			t.Fatalf("k.sys.OpenDevice(1) without its node = %#v, want an *Error of the open holding a *NodeMissingError", err)
		}
		if got := err.Error(); strings.Count(got, "/dev/loop1") != 1 {
			t.Errorf("message %q names the node more than once", got)
		}
	})
}
