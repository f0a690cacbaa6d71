//go:build integration

package loopctl

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/kerneltest"
)

func TestKernelSetFD(t *testing.T) {
	c := openControl(t)
	d := newDevice(t, c)
	f := kerneltest.TempFile(t, 1<<20)
	if err := d.SetFD(f); err != nil {
		t.Fatal(err)
	}
	s, err := d.Status()
	if err != nil {
		t.Fatal(err)
	}
	dev, ino := fileID(t, f.Name())
	// LOOP_SET_FD writes no lo_file_name.
	want := Status{Number: d.Number(), BackingFile: f.Name(), BackingDevice: dev, BackingInode: ino, BlockSize: 512, Size: 1 << 20,
		DiskSeq: kerneltest.DiskSeq(t, d.Number())}
	if s != want {
		t.Fatalf("Status = %+v, want %+v", s, want)
	}
	if len(s.BackingFile) <= 64 {
		t.Fatalf("backing path %q is too short to test the sysfs name", s.BackingFile)
	}
	if l := losetup(t, d.Path()); l.BackFile != f.Name() || l.RO || l.Offset != 0 || l.SizeLimit != 0 {
		t.Fatalf("losetup sees %+v", l)
	}
	wantErrno(t, d.SetFD(f), unix.EBUSY, ErrBusy)
	// udev may still be probing the binding: a ClearFD then only marks
	// it, and a second one succeeds too. clearAlone clears it as its
	// only opener.
	clearAlone(t, d)
	wantErrno(t, d.ClearFD(), unix.ENXIO, ErrNotBound)
	_, err = d.Status()
	wantErrno(t, err, unix.ENXIO, ErrNotBound)
}

func TestKernelSetFDReadOnlyFile(t *testing.T) {
	c := openControl(t)
	d := newDevice(t, c)
	rw := kerneltest.TempFile(t, 1<<20)
	ro, err := os.Open(rw.Name())
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	if err := d.SetFD(ro); err != nil {
		t.Fatal(err)
	}
	if s, err := d.Status(); err != nil || s.Flags != FlagReadOnly {
		t.Fatalf("Status = %+v, %v; want read-only", s, err)
	}
}

func TestKernelConfigure(t *testing.T) {
	tests := []struct {
		name string
		o    Options
	}{
		{"defaults", Options{}},
		{"offset and size limit", Options{Offset: 64 << 10, SizeLimit: 512 << 10}},
		{"block size 4096", Options{BlockSize: 4096}},
		{"autoclear and partscan", Options{Flags: FlagAutoClear | FlagPartScan}},
		{"read-only", Options{Flags: FlagReadOnly}},
		{"direct I/O", Options{Flags: FlagDirectIO, BlockSize: 4096}},
		{"everything", Options{Offset: 4096, SizeLimit: 1 << 20, BlockSize: 1024, Flags: knownFlags}},
	}
	c := openControl(t)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			checkConfigure(t, c, tt.o)
		})
	}
}

func TestKernelConfigureBusy(t *testing.T) {
	c := openControl(t)
	d := newDevice(t, c)
	first, second := kerneltest.TempFile(t, 1<<20), kerneltest.TempFile(t, 1<<20)
	if err := d.Configure(first, Options{}); err != nil {
		t.Fatal(err)
	}
	wantErrno(t, d.Configure(second, Options{}), unix.EBUSY, ErrBusy)
	_, ino := fileID(t, first.Name())
	if s, err := d.Status(); err != nil || s.BackingInode != ino {
		t.Fatalf("binding changed: %+v, %v", s, err)
	}
}

func TestKernelConfigureRejected(t *testing.T) {
	c := openControl(t)
	d := newDevice(t, c)
	f := kerneltest.TempFile(t, 1<<20)
	closed := kerneltest.TempFile(t, 4096)
	closed.Close()
	for name, call := range map[string]func() error{
		"nil file":    func() error { return d.Configure(nil, Options{}) },
		"closed file": func() error { return d.Configure(closed, Options{}) },
		"flag 0x20":   func() error { return d.Configure(f, Options{Flags: 0x20}) },
		"block 256":   func() error { return d.Configure(f, Options{BlockSize: 256}) },
		"block 3":     func() error { return d.Configure(f, Options{BlockSize: 3}) },
		// A power of two beyond the kernel's limit: the kernel refuses it.
		"block 1<<20": func() error { return d.Configure(f, Options{BlockSize: 1 << 20}) },
	} {
		t.Run(name, func(t *testing.T) {
			if err := call(); !errors.Is(err, fs.ErrInvalid) {
				t.Fatalf("Configure = %v, want fs.ErrInvalid", err)
			}
			_, err := d.Status()
			wantErrno(t, err, unix.ENXIO, ErrNotBound)
		})
	}
	if !host.has(featConfigure) { // internal: what the package learnt of the kernel
		t.Fatal("an argument error was taken for a kernel without LOOP_CONFIGURE")
	}
	// The kernel itself refuses unknown flags, as validation assumes.
	cfg := unix.LoopConfig{Fd: uint32(mustFd(t, f)), Info: unix.LoopInfo64{Flags: 0x20}}
	if err := ioctlPtr(d.h, reqConfigure, unsafe.Pointer(&cfg)); err != unix.EINVAL {
		t.Fatalf("kernel LOOP_CONFIGURE with flag 0x20: %v, want EINVAL", err)
	}
	// What tells an argument error from a missing LOOP_CONFIGURE: a kernel
	// that has it answers EBADF for no file, and binds nothing.
	probe := unix.LoopConfig{Fd: ^uint32(0)}
	if err := ioctlPtr(d.h, reqConfigure, unsafe.Pointer(&probe)); err != unix.EBADF {
		t.Fatalf("kernel LOOP_CONFIGURE with no file: %v, want EBADF", err)
	}
	_, err := d.Status()
	wantErrno(t, err, unix.ENXIO, ErrNotBound)
}

func TestKernelConfigureFallback(t *testing.T) {
	for _, o := range []Options{
		{},
		{Offset: 8192, SizeLimit: 1 << 20, BlockSize: 4096, Flags: FlagAutoClear | FlagPartScan},
		{Flags: FlagReadOnly | FlagDirectIO, BlockSize: 4096},
	} {
		t.Run(o.Flags.String(), func(t *testing.T) {
			k := useForced(t, map[uint]error{reqConfigure: unix.ENOTTY})
			checkConfigure(t, openControlOn(t, k.sys), o)
			if k.sys.has(featConfigure) {
				t.Fatal("ENOTTY not remembered")
			}
			if !containsReq(k.seen, reqSetFD) {
				t.Fatal("no LOOP_SET_FD")
			}
		})
	}
	t.Run("pre-5.8 EINVAL", func(t *testing.T) {
		// Old kernels answer EINVAL to the request and to the probe.
		k := useForced(t, map[uint]error{reqConfigure: unix.EINVAL})
		checkConfigure(t, openControlOn(t, k.sys), Options{Offset: 512})
		if k.sys.has(featConfigure) {
			t.Fatal("EINVAL with an EINVAL probe not taken for a kernel without LOOP_CONFIGURE")
		}
	})
	t.Run("rollback", func(t *testing.T) {
		// The kernel itself refuses the block size after LOOP_SET_FD
		// bound the file: the binding must be undone.
		k := useForced(t, map[uint]error{reqConfigure: unix.ENOTTY})
		d := newDevice(t, openControlOn(t, k.sys))
		err := d.Configure(kerneltest.TempFile(t, 1<<20), Options{BlockSize: 1 << 20})
		if !errors.Is(err, unix.EINVAL) || !strings.Contains(err.Error(), "LOOP_SET_BLOCK_SIZE") {
			t.Fatalf("Configure = %v, want EINVAL from LOOP_SET_BLOCK_SIZE", err)
		}
		// The kernel lets the binding go at the device's last close
		// (since 6.11; at once before, when nobody else has it open), and
		// udev may be probing it, opened when LOOP_SET_FD bound it.
		n := d.Number()
		d.Close()
		kerneltest.WaitUnbound(t, n)
	})
}

func TestKernelOpenDevicePath(t *testing.T) {
	c := openControl(t)
	d := newDevice(t, c)
	f := kerneltest.TempFile(t, 4<<20)
	if err := d.Configure(f, Options{Flags: FlagPartScan}); err != nil {
		t.Fatal(err)
	}
	part := d.Path() + "p1"
	addPartition(t, d, 1, 2048, 4096)
	if fi, err := os.Stat(part); err != nil || fi.Mode()&fs.ModeDevice == 0 {
		t.Fatalf("partition node: %v", err)
	}
	dir := t.TempDir()
	link := func(name, target string) string {
		p := filepath.Join(dir, name)
		if err := os.Symlink(target, p); err != nil {
			t.Fatal(err)
		}
		return p
	}
	regular := kerneltest.TempFile(t, 4096).Name()

	for _, path := range []string{d.Path(), link("loop", d.Path()), link("loop2", filepath.Join(dir, "loop"))} {
		t.Run(path, func(t *testing.T) {
			od, err := OpenDevicePath(path)
			if err != nil {
				t.Fatal(err)
			}
			defer od.Close()
			if od.Number() != d.Number() || od.Path() != path {
				t.Fatalf("opened %d at %q", od.Number(), od.Path())
			}
			if s, err := od.Status(); err != nil || s.BackingFile != f.Name() {
				t.Fatalf("Status = %+v, %v", s, err)
			}
		})
	}
	for _, path := range []string{"/dev/null", ControlPath, regular, part, link("part", part), link("null", "/dev/null"), dir} {
		t.Run(path, func(t *testing.T) {
			_, err := OpenDevicePath(path)
			if !errors.Is(err, ErrNotLoop) {
				t.Fatalf("OpenDevicePath = %v, want ErrNotLoop", err)
			}
			if e, ok := err.(*Error); !ok || e.Path != path {
				t.Fatalf("error %#v does not name %q", err, path)
			}
		})
	}
	if _, err := OpenDevicePath(filepath.Join(dir, "missing")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("missing path: %v, want fs.ErrNotExist", err)
	}
	if _, err := OpenDevicePath(link("dangling", filepath.Join(dir, "missing"))); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("dangling link: %v, want fs.ErrNotExist", err)
	}
}

func TestKernelUnbound(t *testing.T) {
	c := openControl(t)
	d := newDevice(t, c)
	// An unbound device is still a loop device.
	od, err := OpenDevicePath(d.Path())
	if err != nil {
		t.Fatal(err)
	}
	od.Close()
	_, err = d.Status()
	wantErrno(t, err, unix.ENXIO, ErrNotBound)
	wantErrno(t, d.ClearFD(), unix.ENXIO, ErrNotBound)
}

func TestKernelENOTTY(t *testing.T) {
	kerneltest.Require(t)
	h, err := osKernel{}.open("/dev/null", readWrite)
	if err != nil {
		t.Fatal(err)
	}
	c := &Control{h: h, sys: host}
	defer c.Close()
	_, err = c.GetFree()
	wantErrno(t, err, unix.ENOTTY, errors.ErrUnsupported)
}

func TestKernelClosed(t *testing.T) {
	c := openControl(t)
	d := newDevice(t, c)
	c2, err := Open()
	if err != nil {
		t.Fatal(err)
	}
	if err := c2.Close(); err != nil {
		t.Fatal(err)
	}
	if err := c2.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := c2.GetFree(); !errors.Is(err, fs.ErrClosed) {
		t.Fatalf("GetFree after Close: %v", err)
	}
	d2, err := OpenDevice(d.Number())
	if err != nil {
		t.Fatal(err)
	}
	d2.Close()
	if err := d2.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := d2.Status(); !errors.Is(err, fs.ErrClosed) {
		t.Fatalf("Status after Close: %v", err)
	}
}

func TestKernelSetStatus(t *testing.T) {
	f := kerneltest.TempFile(t, 2<<20)
	d := attachT(t, f.Name(), Options{})
	set := Status{Offset: 4096, SizeLimit: 1 << 20, Flags: FlagAutoClear | FlagPartScan}
	if err := d.SetStatus(set); err != nil {
		t.Fatal(err)
	}
	want := Options{Offset: set.Offset, SizeLimit: set.SizeLimit, Flags: set.Flags}
	checkBound(t, d, f.Name(), want)
	if got := readAttr(t, d.Number(), "size"); got != "2048" {
		t.Fatalf("size %s sectors, want 2048", got)
	}
	// lo_file_name survives.
	var info unix.LoopInfo64
	if err := ioctlPtr(d.h, reqGetStatus64, unsafe.Pointer(&info)); err != nil || unix.ByteSliceToString(info.File_name[:]) == "" {
		t.Fatalf("lo_file_name %q after SetStatus, %v", info.File_name, err)
	}

	// The kernel ignores, with success, a read-only or direct I/O flag
	// through LOOP_SET_STATUS64: that is why SetStatus refuses them.
	for _, flag := range []uint32{unix.LO_FLAGS_READ_ONLY, unix.LO_FLAGS_DIRECT_IO} {
		raw := info
		raw.Flags |= flag
		if err := ioctlPtr(d.h, reqSetStatus64, unsafe.Pointer(&raw)); err != nil {
			t.Fatalf("kernel LOOP_SET_STATUS64 with flag %#x: %v", flag, err)
		}
		checkBound(t, d, f.Name(), want)
	}
	raw := info
	raw.Flags &^= unix.LO_FLAGS_PARTSCAN // nor can partscan be cleared
	if err := ioctlPtr(d.h, reqSetStatus64, unsafe.Pointer(&raw)); err != nil {
		t.Fatalf("kernel LOOP_SET_STATUS64 clearing partscan: %v", err)
	}
	checkBound(t, d, f.Name(), want)

	// What the kernel would ignore is refused, and nothing changes.
	for name, s := range map[string]Status{
		"set read-only":   {Flags: set.Flags | FlagReadOnly},
		"set direct I/O":  {Flags: set.Flags | FlagDirectIO},
		"clear partscan":  {Flags: FlagAutoClear},
		"unknown flag":    {Flags: set.Flags | 0x20},
		"offset too big":  {Offset: 1 << 63, Flags: set.Flags},
		"size too big":    {SizeLimit: 1 << 63, Flags: set.Flags},
		"read-only alone": {Flags: FlagReadOnly},
	} {
		t.Run(name, func(t *testing.T) {
			if err := d.SetStatus(s); !errors.Is(err, fs.ErrInvalid) {
				t.Fatalf("SetStatus(%+v) = %v, want fs.ErrInvalid", s, err)
			}
			checkBound(t, d, f.Name(), want)
		})
	}

	// Autoclear can be cleared.
	set.Flags = FlagPartScan
	if err := d.SetStatus(set); err != nil {
		t.Fatal(err)
	}
	want.Flags = FlagPartScan
	checkBound(t, d, f.Name(), want)
}

func TestKernelSetCapacity(t *testing.T) {
	f := kerneltest.TempFile(t, 1<<20)
	d := attachT(t, f.Name(), Options{})
	if err := f.Truncate(2 << 20); err != nil {
		t.Fatal(err)
	}
	if got := readAttr(t, d.Number(), "size"); got != "2048" {
		t.Fatalf("size before SetCapacity %s, want 2048", got)
	}
	if err := d.SetCapacity(); err != nil {
		t.Fatal(err)
	}
	if got := readAttr(t, d.Number(), "size"); got != "4096" {
		t.Fatalf("size after SetCapacity %s, want 4096", got)
	}
	if s, err := d.Status(); err != nil || s.Size != 2<<20 {
		t.Fatalf("Status = %+v, %v; want size %d", s, err, 2<<20)
	}
}

func TestKernelSetBlockSize(t *testing.T) {
	d := attachT(t, kerneltest.TempFile(t, 1<<20).Name(), Options{})
	for _, size := range []uint32{4096, 1024, 65536, 512} {
		err := d.SetBlockSize(size)
		if size > uint32(os.Getpagesize()) && !kerneltest.AtLeast(t, 6, 15) {
			// Block sizes above the page size came with Linux 6.15.
			if !errors.Is(err, unix.EINVAL) || !strings.Contains(err.Error(), "page size") {
				t.Fatalf("SetBlockSize(%d) on %s = %v, want EINVAL explained", size, kerneltest.Release(), err)
			}
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		if got := readAttr(t, d.Number(), "queue/logical_block_size"); got != strconv.Itoa(int(size)) {
			t.Fatalf("block size %s, want %d", got, size)
		}
		if s, err := d.Status(); err != nil || s.BlockSize != size {
			t.Fatalf("Status = %+v, %v; want block size %d", s, err, size)
		}
	}
	for _, size := range []uint32{0, 3, 256, 1000} {
		if err := d.SetBlockSize(size); !errors.Is(err, fs.ErrInvalid) || errors.Is(err, unix.EINVAL) {
			t.Fatalf("SetBlockSize(%d) = %v, want a refusal before the kernel", size, err)
		}
	}
	// A power of two beyond the kernel's limit is the kernel's to refuse.
	if err := d.SetBlockSize(1 << 20); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("SetBlockSize(1<<20) = %v, want the kernel's EINVAL", err)
	}
}

func TestKernelSetDirectIO(t *testing.T) {
	f := kerneltest.TempFile(t, 1<<20)
	d := attachT(t, f.Name(), Options{BlockSize: 4096})
	if !directIOOK(t, filepath.Dir(f.Name())) {
		if err := d.SetDirectIO(true); !errors.Is(err, ErrNoDirectIO) || !errors.Is(err, unix.EINVAL) {
			t.Fatalf("SetDirectIO(true) without O_DIRECT = %v, want ErrNoDirectIO", err)
		}
		if s, err := d.Status(); err != nil || s.Flags&FlagDirectIO != 0 {
			t.Fatalf("Status = %+v, %v", s, err)
		}
		return
	}
	for _, on := range []bool{true, false, true} {
		if err := d.SetDirectIO(on); err != nil {
			t.Fatal(err)
		}
		s, err := d.Status()
		if err != nil || (s.Flags&FlagDirectIO != 0) != on {
			t.Fatalf("direct I/O %v: %+v, %v", on, s, err)
		}
		want := map[bool]string{false: "0", true: "1"}[on]
		if got := readAttr(t, d.Number(), "loop/dio"); got != want {
			t.Fatalf("sysfs dio %s, want %s", got, want)
		}
	}
}

func TestKernelChangeFD(t *testing.T) {
	a := kerneltest.TempFile(t, 1<<20)
	d := attachT(t, a.Name(), Options{Flags: FlagReadOnly})
	b, err := os.Create(filepath.Join(t.TempDir(), "b-"+kerneltest.LongName))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if err := b.Truncate(1 << 20); err != nil {
		t.Fatal(err)
	}
	seq, err := d.DiskSeq()
	if err != nil {
		t.Fatal(err)
	}
	if err := d.ChangeFD(b); err != nil {
		t.Fatal(err)
	}
	// LOOP_CHANGE_FD leaves lo_file_name as the first bind wrote it, and
	// moves the disk sequence number on: checkBound compares sysfs's.
	checkBound(t, d, b.Name(), Options{Flags: FlagReadOnly, Ref: a.Name()[:63]})
	if after, err := d.DiskSeq(); err != nil || kerneltest.AtLeast(t, 5, 15) && after == seq {
		t.Fatalf("DiskSeq after ChangeFD = %d, %v; before %d", after, err, seq)
	}

	// Another size: the kernel refuses, and the error says why.
	c := kerneltest.TempFile(t, 2<<20)
	err = d.ChangeFD(c)
	if !errors.Is(err, unix.EINVAL) || !strings.Contains(err.Error(), "same size") {
		t.Fatalf("ChangeFD(other size) = %v, want EINVAL explained", err)
	}
	checkBound(t, d, b.Name(), Options{Flags: FlagReadOnly, Ref: a.Name()[:63]})

	// A read-write device: refused before the kernel.
	rw := attachT(t, c.Name(), Options{})
	if err := rw.ChangeFD(a); !errors.Is(err, fs.ErrInvalid) || errors.Is(err, unix.EINVAL) || !strings.Contains(err.Error(), "read-only") {
		t.Fatalf("ChangeFD on a read-write device = %v", err)
	}
	if err := d.ChangeFD(nil); !errors.Is(err, fs.ErrInvalid) {
		t.Fatalf("ChangeFD(nil) = %v", err)
	}
	dir, _ := os.Open(t.TempDir())
	defer dir.Close()
	if err := d.ChangeFD(dir); !errors.Is(err, fs.ErrInvalid) {
		t.Fatalf("ChangeFD(directory) = %v", err)
	}
}

// TestKernelHeldExclusively changes a bound device's settings while
// another opener holds it exclusively: a mounted file system, or an open
// with O_EXCL. Since Linux 6.17 the kernel refuses LOOP_SET_BLOCK_SIZE
// then (and stable kernels took it: Debian's 6.12.118 refuses it too):
// the error must say what it means, name the mount, and match ErrBusy. LOOP_SET_STATUS64
// was to follow in 6.19, but neither 6.18 nor Debian's 7.3.4 refuses it,
// even to move the offset under a mounted file system; nor
// LOOP_SET_DIRECT_IO. A kernel that does not refuse makes the change.
func TestKernelHeldExclusively(t *testing.T) {
	for _, holder := range []string{"O_EXCL", "mount"} {
		t.Run(holder, func(t *testing.T) {
			f := kerneltest.TempFile(t, 16<<20)
			if holder == "mount" {
				kerneltest.MkfsExt4(t, f.Name())
			}
			d := attachT(t, f.Name(), Options{})
			// What the error names: the mount, where there is one.
			named := "mounted, or open with O_EXCL"
			switch holder {
			case "O_EXCL":
				fd, err := unix.Open(d.Path(), unix.O_RDONLY|unix.O_EXCL|unix.O_CLOEXEC, 0)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { unix.Close(fd) })
			case "mount":
				named = "a file system on " + d.Path() + " mounted at " + mountFrom(t, d.Path(), "ext4", 0)
			}
			s, err := d.Status()
			if err != nil {
				t.Fatal(err)
			}
			for _, change := range []struct {
				name         string
				major, minor int // the first kernel that refuses it
				do           func() error
			}{
				{"SetBlockSize", 6, 17, func() error { return d.SetBlockSize(512) }},
				// Refused by no kernel of the matrix (5.10 to 7.3).
				{"SetStatus", 99, 0, func() error { return d.SetStatus(s) }},
				{"SetDirectIO", 99, 0, func() error { return d.SetDirectIO(false) }},
			} {
				err := change.do()
				switch refused := errors.Is(err, unix.EBUSY); {
				case refused && (!errors.Is(err, ErrBusy) || !strings.Contains(err.Error(), "held exclusively ("+named+")") ||
					!strings.Contains(err.Error(), "Options at Attach")):
					t.Errorf("%s on %s, held by %s: %v; want ErrBusy, explained", change.name, kerneltest.Release(), holder, err)
				case !refused && kerneltest.AtLeast(t, change.major, change.minor):
					t.Errorf("%s on %s, held by %s: %v; want EBUSY from Linux %d.%d on", change.name, kerneltest.Release(),
						holder, err, change.major, change.minor)
				case !refused && err != nil:
					t.Errorf("%s on %s, held by %s: %v", change.name, kerneltest.Release(), holder, err)
				default:
					t.Logf("%s on %s, held by %s: %v", change.name, kerneltest.Release(), holder, err)
				}
			}
		})
	}
}
