//go:build integration && !loopctl_stub

package loopctl

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/kerneltest"
	"github.com/loopctl/loopctl/internal/sysfs"
)

func openControl(t *testing.T) *Control {
	t.Helper()
	kerneltest.Require(t)
	c, err := Open()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// newDevice adds a loop device of the test's own and opens it. Cleanup
// clears a binding left on it, closes it and removes it.
func newDevice(t *testing.T, c *Control) *Device {
	t.Helper()
	n, err := c.Add(AnyNumber)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Detached by the test, or by the cleanup below: gone once its
		// last opener, udev's probe maybe, closes it.
		kerneltest.WaitUnbound(t, n)
		if err := c.Remove(n); err != nil {
			t.Errorf("removing the test's device: %v", err)
		}
	})
	d, err := OpenDevice(n)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { detach(t, d) })
	return d
}

// detach clears d's binding if it still has one, and closes it.
func detach(t *testing.T, d *Device) {
	if err := d.ClearFD(); err != nil && !errors.Is(err, ErrNotBound) && !errors.Is(err, fs.ErrClosed) {
		t.Errorf("detaching %s: %v", d.Path(), err)
	}
	d.Close()
}

// clearAlone clears d as its only opener: the device is then torn down
// at once (since Linux 6.11: put in rundown until d's Close). Another
// process may have it open for a moment, udev probing it after its bind,
// and a ClearFD then only sets autoclear. So clearAlone takes the
// device's lock, which keeps udev from starting a probe and waits for one
// under way to end, and clears again until the device is no longer bound
// for d.
func clearAlone(t *testing.T, d *Device) {
	t.Helper()
	if err := d.h.flock(unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(time.Millisecond) {
		if err := d.ClearFD(); err != nil {
			t.Fatal(err)
		}
		_, err := d.Status()
		if errors.Is(err, ErrNotBound) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s still bound a minute after ClearFD (%v); held open by %s", d.Path(), err,
				strings.Join(kerneltest.Openers(d.Number()), ", "))
		}
	}
}

func fileID(t *testing.T, path string) (dev, ino uint64) {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return uint64(st.Dev), uint64(st.Ino)
}

func wantErrno(t *testing.T, err error, errno unix.Errno, sentinel error) {
	t.Helper()
	var e *Error
	if !errors.As(err, &e) || e.Op == "" || e.Path == "" {
		t.Fatalf("got %v, want an *Error naming op and path", err)
	}
	if !errors.Is(err, errno) || !errors.Is(err, sentinel) {
		t.Fatalf("got %v, want %s matching %v", err, unix.ErrnoName(errno), sentinel)
	}
}

// losetupDevice is one device of `losetup --json --list`.
type losetupDevice struct {
	Name      string `json:"name"`
	SizeLimit uint64 `json:"sizelimit"`
	Offset    uint64 `json:"offset"`
	AutoClear bool   `json:"autoclear"`
	RO        bool   `json:"ro"`
	BackFile  string `json:"back-file"`
	DIO       bool   `json:"dio"`
	LogSec    uint32 `json:"log-sec"`
}

func losetup(t *testing.T, dev string) losetupDevice {
	t.Helper()
	out, err := exec.Command("losetup", "--json", "--list", dev).Output()
	if err != nil {
		t.Fatalf("losetup --json --list %s: %v", dev, err)
	}
	var list struct {
		Devices []losetupDevice `json:"loopdevices"`
	}
	if err := json.Unmarshal(out, &list); err != nil || len(list.Devices) != 1 {
		t.Fatalf("losetup output %q: %v", out, err)
	}
	return list.Devices[0]
}

func readAttr(t *testing.T, n int, name string) string {
	t.Helper()
	var buf [sysfs.BufSize]byte
	b, err := sysfs.ReadFile(sysfs.LoopDir(sysfsRoot, n)+"/"+name, buf[:])
	if err != nil {
		t.Fatal(err)
	}
	return sysfs.Value(b)
}

func TestKernelControl(t *testing.T) {
	c := openControl(t)
	n, err := c.Add(AnyNumber)
	if err != nil || n < 0 {
		t.Fatalf("Add(AnyNumber) = %d, %v", n, err)
	}
	// The node appears at once.
	if fi, err := os.Stat(DevicePath(n)); err != nil || fi.Mode()&fs.ModeDevice == 0 {
		t.Fatalf("after Add: %v, %v", fi, err)
	}
	_, err = c.Add(n)
	wantErrno(t, err, unix.EEXIST, fs.ErrExist)
	if err.(*Error).Path != DevicePath(n) {
		t.Fatalf("EEXIST names %q", err.(*Error).Path)
	}
	if err := c.Remove(n); err != nil {
		t.Fatal(err)
	}
	wantErrno(t, c.Remove(n), unix.ENODEV, fs.ErrNotExist)
}

func TestKernelHighestNumber(t *testing.T) {
	c := openControl(t)
	n, err := c.Add(MaxNumber)
	if err != nil || n != MaxNumber {
		t.Fatalf("Add(MaxNumber) = %d, %v", n, err)
	}
	if err := c.Remove(MaxNumber); err != nil {
		t.Fatal(err)
	}
	// What Add and Remove refuse in Go, the kernel refuses too, since 6.1
	// at the latest. Not a probe to make on 5.10: it takes LOOP_CTL_ADD
	// 1<<20, making a device whose number overflows the minor range into
	// another major's, and LOOP_CTL_REMOVE -1, removing whatever unbound
	// device it finds first.
	if !kerneltest.AtLeast(t, 6, 1) {
		t.Logf("kernel %s: not probing LOOP_CTL_ADD %d and LOOP_CTL_REMOVE -1", kerneltest.Release(), MaxNumber+1)
		return
	}
	if _, err := ioctl(c.h, reqCtlAdd, MaxNumber+1); err != unix.EINVAL {
		t.Fatalf("kernel LOOP_CTL_ADD %d: %v, want EINVAL", MaxNumber+1, err)
	}
	minusOne := -1
	if _, err := ioctl(c.h, reqCtlRemove, uintptr(minusOne)); err != unix.EINVAL {
		t.Fatalf("kernel LOOP_CTL_REMOVE -1: %v, want EINVAL", err)
	}
}

func TestKernelRemoveBusy(t *testing.T) {
	c := openControl(t)
	d := newDevice(t, c)
	wantErrno(t, c.Remove(d.Number()), unix.EBUSY, ErrBusy) // open
	if err := d.SetFD(kerneltest.TempFile(t, 1<<20)); err != nil {
		t.Fatal(err)
	}
	wantErrno(t, c.Remove(d.Number()), unix.EBUSY, ErrBusy) // bound
}

func TestKernelGetFree(t *testing.T) {
	c := openControl(t)
	n, err := c.GetFree()
	if err != nil || n < 0 {
		t.Fatalf("GetFree = %d, %v", n, err)
	}
	d, err := OpenDevice(n)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	_, err = d.Status()
	wantErrno(t, err, unix.ENXIO, ErrNotBound)
}

func TestKernelGetFreeAllocatesNothing(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector's bookkeeping allocates")
	}
	c := openControl(t)
	if a := testing.AllocsPerRun(1000, func() {
		if _, err := c.GetFree(); err != nil {
			t.Fatal(err)
		}
	}); a != 0 {
		t.Fatalf("GetFree allocates %v times per call", a)
	}
}

// TestKernelLockAllocatesNothing: the four flocks of an Attach allocate
// nothing, as ioctls do.
func TestKernelLockAllocatesNothing(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector's bookkeeping allocates")
	}
	c := openControl(t)
	if a := testing.AllocsPerRun(1000, func() {
		if err := c.h.flock(unix.LOCK_EX | unix.LOCK_NB); err != nil {
			t.Fatal(err)
		}
		if err := c.h.flock(unix.LOCK_UN); err != nil {
			t.Fatal(err)
		}
	}); a != 0 {
		t.Fatalf("a flock and its release allocate %v times", a)
	}
}

// TestKernelControlClose: calls on a control device take no reference, so
// Close puts an eventfd in its descriptor's place: calls racing the Close
// end with fs.ErrClosed (never another errno, never another file), the
// control device is released at once, and the number is closed once the
// Control is unreachable.
func TestKernelControlClose(t *testing.T) {
	kerneltest.Require(t)
	c, err := Open()
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for {
				_, err := c.GetFree()
				if err == nil {
					continue
				}
				if !errors.Is(err, fs.ErrClosed) {
					t.Errorf("GetFree racing Close: %v", err)
				}
				return
			}
		})
	}
	fd := c.h.(*controlHandle).fd
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	target, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(fd))
	if err != nil || target != "anon_inode:[eventfd]" {
		t.Fatalf("descriptor %d after Close: %q, %v; want the eventfd", fd, target, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		t.Fatal(err)
	}
	c = nil
	for i := 0; ; i++ {
		runtime.GC()
		var now unix.Stat_t
		if err := unix.Fstat(fd, &now); err != nil || now.Ino != st.Ino || now.Dev != st.Dev {
			break // closed (and perhaps reused since)
		}
		if i == 100 {
			t.Fatalf("descriptor %d still the eventfd after 100 collections", fd)
		}
		runtime.Gosched()
	}
}

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

// checkConfigure binds a new device with o and checks what the kernel,
// sysfs and losetup report.
func checkConfigure(t *testing.T, c *Control, o Options) {
	t.Helper()
	d := newDevice(t, c)
	f := kerneltest.TempFile(t, 2<<20)
	err := d.Configure(f, o)
	if o.Flags&FlagDirectIO != 0 && !directIOOK(t, filepath.Dir(f.Name())) {
		wantNoDirectIO(t, err, f.Name())
		return
	}
	if err != nil {
		t.Fatal(err)
	}
	checkBound(t, d, f.Name(), o)
}

// deviceSize is the size of a device bound to the file at path with o: the
// file's size less the offset, at most the size limit, in whole sectors.
func deviceSize(t *testing.T, path string, o Options) uint64 {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	size := uint64(max(fi.Size()-int64(o.Offset), 0))
	if o.SizeLimit != 0 {
		size = min(size, o.SizeLimit)
	}
	return size &^ 511
}

// checkBound checks that d is bound to the file at path with o, as Status,
// List, FindByBackingFile, sysfs, losetup --json --list and losetup -j see
// it.
func checkBound(t *testing.T, d *Device, path string, o Options) {
	t.Helper()
	s, err := d.Status()
	if err != nil {
		t.Fatal(err)
	}
	dev, ino := fileID(t, path)
	want := Status{Number: d.Number(), BackingFile: path, BackingDevice: dev, BackingInode: ino,
		Offset: o.Offset, SizeLimit: o.SizeLimit, Flags: o.Flags, BlockSize: max(o.BlockSize, 512),
		Size: deviceSize(t, path, o), DiskSeq: kerneltest.DiskSeq(t, d.Number()), Ref: refOfBinding(path, o)}
	if s != want {
		t.Fatalf("Status = %+v, want %+v", s, want)
	}
	if seq, err := d.DiskSeq(); err != nil || seq != want.DiskSeq {
		t.Fatalf("DiskSeq = %d, %v; want sysfs's %d", seq, err, want.DiskSeq)
	}
	if got := readAttr(t, d.Number(), "size"); got != strconv.FormatUint(want.Size/512, 10) {
		t.Fatalf("sysfs size %s sectors, want %d bytes", got, want.Size)
	}
	list, err := List()
	if err != nil {
		t.Fatal(err)
	}
	if i := slices.IndexFunc(list, func(s Status) bool { return s.Number == d.Number() }); i < 0 || list[i] != want {
		t.Fatalf("List has %+v, want %+v", list, want)
	}
	found, err := FindByBackingFile(path)
	if err != nil || len(found) != 1 || found[0] != want {
		t.Fatalf("FindByBackingFile = %+v, %v; want [%+v]", found, err, want)
	}
	blockSize := o.BlockSize
	if blockSize == 0 {
		blockSize = 512
	}
	l := losetup(t, d.Path())
	wantL := losetupDevice{Name: d.Path(), SizeLimit: o.SizeLimit, Offset: o.Offset, AutoClear: o.Flags&FlagAutoClear != 0,
		RO: o.Flags&FlagReadOnly != 0, BackFile: path, DIO: o.Flags&FlagDirectIO != 0, LogSec: blockSize}
	if l != wantL {
		t.Fatalf("losetup = %+v, want %+v", l, wantL)
	}
	if j := losetupJ(t, path); !slices.Contains(j, fmt.Sprintf("%s: [%04d]:%d", d.Path(), dev, ino)) {
		t.Fatalf("losetup -j %s = %q, want %s with [%d]:%d", path, j, d.Path(), dev, ino)
	}
	if got := readAttr(t, d.Number(), "queue/logical_block_size"); got != strconv.Itoa(int(blockSize)) {
		t.Fatalf("logical block size %s, want %d", got, blockSize)
	}
}

// refOfBinding is what the device's lo_file_name holds after a bind of
// path with o: o.Ref, or the path's first 63 bytes.
func refOfBinding(path string, o Options) string {
	if o.Ref != "" {
		return o.Ref
	}
	return path[:min(len(path), 63)]
}

// losetupJ returns `losetup -j path`, one "NAME: [DEV]:INO" per device.
func losetupJ(t *testing.T, path string) []string {
	t.Helper()
	out, err := exec.Command("losetup", "-j", path).Output()
	if err != nil {
		t.Fatalf("losetup -j %s: %v", path, err)
	}
	var devs []string
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if name, _, ok := strings.Cut(line, " ("); ok {
			devs = append(devs, name)
		}
	}
	return devs
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
	if noConfigure.Load() {
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

// mustFd returns f's descriptor number for a raw call; f stays open for
// the test.
func mustFd(t *testing.T, f *os.File) int {
	t.Helper()
	rc, err := f.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var fd int
	rc.Control(func(u uintptr) { fd = int(u) })
	return fd
}

// A forcedKernel is the real kernel with chosen requests failing, to drive
// fallbacks and rollbacks on a kernel that would not take them.
type forcedKernel struct {
	mu   sync.Mutex
	fail map[uint]error
	seen []uint
}

// useKernel puts k in place of the real kernel for the test, with a fresh
// shared control device opened through it.
func useKernel(t *testing.T, k opener) {
	t.Helper()
	kerneltest.Require(t)
	old := sys
	resetShared()
	sys = probingByOpen{k}
	t.Cleanup(func() { resetShared(); sys = old })
}

// An opener is a test's kernel: it changes what opens do.
type opener interface {
	open(path string, mode int) (handle, error)
}

// probingByOpen makes an opener a kernel whose probes are opens too, so
// that the test's opener sees them.
type probingByOpen struct{ opener }

func (k probingByOpen) probe(n int, _ *probeBuf) (handle, error) {
	return k.open(DevicePath(n), readOnly)
}

func useForced(t *testing.T, fail map[uint]error) *forcedKernel {
	k := &forcedKernel{fail: fail}
	useKernel(t, k)
	oldNo := noConfigure.Load()
	noConfigure.Store(false)
	t.Cleanup(func() { noConfigure.Store(oldNo) })
	return k
}

func (k *forcedKernel) open(path string, mode int) (handle, error) {
	h, err := osKernel{}.open(path, mode)
	if err != nil {
		return nil, err
	}
	return &forcedHandle{handle: h, k: k}, nil
}

type forcedHandle struct {
	handle
	k *forcedKernel
}

func (h *forcedHandle) check(req uint) error {
	h.k.mu.Lock()
	defer h.k.mu.Unlock()
	h.k.seen = append(h.k.seen, req)
	return h.k.fail[req]
}

func (h *forcedHandle) rawIoctl(req uint, arg uintptr) (int, error) {
	if err := h.check(req); err != nil {
		return -1, err
	}
	return h.handle.rawIoctl(req, arg)
}

func (h *forcedHandle) rawIoctlPtr(req uint, arg unsafe.Pointer) error {
	if err := h.check(req); err != nil {
		return err
	}
	return h.handle.rawIoctlPtr(req, arg)
}

func TestKernelConfigureFallback(t *testing.T) {
	c := openControl(t)
	for _, o := range []Options{
		{},
		{Offset: 8192, SizeLimit: 1 << 20, BlockSize: 4096, Flags: FlagAutoClear | FlagPartScan},
		{Flags: FlagReadOnly | FlagDirectIO, BlockSize: 4096},
	} {
		t.Run(o.Flags.String(), func(t *testing.T) {
			k := useForced(t, map[uint]error{reqConfigure: unix.ENOTTY})
			checkConfigure(t, c, o)
			if !noConfigure.Load() {
				t.Fatal("ENOTTY not remembered")
			}
			if !containsReq(k.seen, reqSetFD) {
				t.Fatal("no LOOP_SET_FD")
			}
		})
	}
	t.Run("pre-5.8 EINVAL", func(t *testing.T) {
		// Old kernels answer EINVAL to the request and to the probe.
		useForced(t, map[uint]error{reqConfigure: unix.EINVAL})
		checkConfigure(t, c, Options{Offset: 512})
		if !noConfigure.Load() {
			t.Fatal("EINVAL with an EINVAL probe not taken for a kernel without LOOP_CONFIGURE")
		}
	})
	t.Run("rollback", func(t *testing.T) {
		// The kernel itself refuses the block size after LOOP_SET_FD
		// bound the file: the binding must be undone.
		useForced(t, map[uint]error{reqConfigure: unix.ENOTTY})
		d := newDevice(t, c)
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

func containsReq(seen []uint, req uint) bool {
	for _, r := range seen {
		if r == req {
			return true
		}
	}
	return false
}

// addPartition adds partition num of d by hand (kerneltest.AddPartition),
// holding a shared lock of d's node until release, or the test's end.
func addPartition(t *testing.T, d *Device, num, start, size int) (release func()) {
	t.Helper()
	return kerneltest.AddPartition(t, d.Path(), d.Path(), num, start, size)
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
	h, err := sys.open("/dev/null", readWrite)
	if err != nil {
		t.Fatal(err)
	}
	c := &Control{h: h}
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

func TestKernelCloexecAndNoLeak(t *testing.T) {
	c := openControl(t)
	d := newDevice(t, c)
	f := kerneltest.TempFile(t, 1<<20)
	before := len(kerneltest.OpenFDs(t))

	c2, err := Open()
	if err != nil {
		t.Fatal(err)
	}
	d2, err := OpenDevicePath(d.Path())
	if err != nil {
		t.Fatal(err)
	}
	found := 0
	for fd, target := range kerneltest.OpenFDs(t) {
		if target != ControlPath && target != d.Path() {
			continue
		}
		info, err := os.ReadFile("/proc/self/fdinfo/" + strconv.Itoa(fd))
		if err != nil {
			t.Fatal(err)
		}
		var flags uint64
		for _, line := range strings.Split(string(info), "\n") {
			if v, ok := strings.CutPrefix(line, "flags:"); ok {
				flags, _ = strconv.ParseUint(strings.TrimSpace(v), 8, 64)
			}
		}
		if flags&unix.O_CLOEXEC == 0 {
			t.Errorf("fd %d (%s) lacks O_CLOEXEC: flags %o", fd, target, flags)
		}
		found++
	}
	if found < 3 { // c, c2 on loop-control; d, d2 on the device
		t.Fatalf("found %d loop fds", found)
	}

	// Successes and failures alike leave no descriptor behind.
	if err := d2.Configure(f, Options{}); err != nil {
		t.Fatal(err)
	}
	d2.Status()
	d2.Configure(f, Options{})
	d2.ClearFD()
	d2.ClearFD()
	c2.GetFree()
	c2.Remove(MaxNumber)
	c2.Close()
	d2.Close()
	OpenDevicePath("/dev/null")
	OpenDevicePath(f.Name())
	OpenDevice(MaxNumber)
	if after := len(kerneltest.OpenFDs(t)); after != before {
		t.Fatalf("%d descriptors before, %d after", before, after)
	}
}

// TestKernelListNames checks that List reads the binding of now (a file
// renamed or deleted since, another file bound since, the device unbound
// or removed), and holds no descriptor from one List to the next.
func TestKernelListNames(t *testing.T) {
	c := openControl(t)
	n, err := c.Add(AnyNumber)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if d, err := OpenDevice(n); err == nil {
			detach(t, d)
			kerneltest.WaitUnbound(t, n)
		}
		if err := c.Remove(n); err != nil && !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("removing the test's device: %v", err)
		}
	})
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	for _, p := range []string{a, b} {
		if err := os.WriteFile(p, make([]byte, 1<<20), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	listed := func(want string) {
		t.Helper()
		before := kerneltest.OpenFDs(t)
		list, err := List()
		if err != nil {
			t.Fatal(err)
		}
		i := slices.IndexFunc(list, func(s Status) bool { return s.Number == n })
		switch {
		case want == "" && i >= 0:
			t.Fatalf("List has %+v, want loop%d unbound", list[i], n)
		case want != "" && i < 0:
			t.Fatalf("List lacks loop%d, want it on %s", n, want)
		case want != "" && list[i].BackingFile != want:
			t.Fatalf("List has %+v, want loop%d on %s", list[i], n, want)
		}
		if after := kerneltest.OpenFDs(t); !maps.Equal(after, before) {
			t.Fatalf("descriptors %v after List, %v before", after, before)
		}
	}
	// Each step opens the device and closes it: a cleared device is torn
	// down at its last close.
	bind := func(path string) {
		t.Helper()
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		d, err := OpenDevice(n)
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		if err := d.Configure(f, Options{Flags: FlagReadOnly}); err != nil {
			t.Fatal(err)
		}
	}
	clear := func() {
		t.Helper()
		d, err := OpenDevice(n)
		if err != nil {
			t.Fatal(err)
		}
		if err := d.ClearFD(); err != nil {
			t.Fatal(err)
		}
		d.Close()
		kerneltest.WaitUnbound(t, n)
	}

	bind(a)
	listed(a)
	listed(a)
	renamed := a + "-renamed"
	if err := os.Rename(a, renamed); err != nil {
		t.Fatal(err)
	}
	listed(renamed)
	clear()
	bind(b)
	listed(b)
	if err := os.Remove(b); err != nil {
		t.Fatal(err)
	}
	listed(b + " (deleted)")
	clear()
	listed("")

	// A device removed is listed no more.
	bind(renamed)
	listed(renamed)
	clear()
	if err := c.Remove(n); err != nil {
		t.Fatal(err)
	}
	listed("")
}

func TestKernelConcurrent(t *testing.T) {
	c := openControl(t)
	d := newDevice(t, c)
	if err := d.Configure(kerneltest.TempFile(t, 1<<20), Options{}); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 200 {
				if _, err := c.GetFree(); err != nil {
					t.Error(err)
					return
				}
				if s, err := d.Status(); err != nil || s.Number != d.Number() {
					t.Error(s, err)
					return
				}
			}
		})
	}
	wg.Wait()

	// Close while calls are in flight: each call succeeds or reports
	// fs.ErrClosed, never another descriptor's answer.
	c2, err := Open()
	if err != nil {
		t.Fatal(err)
	}
	d2, err := OpenDevice(d.Number())
	if err != nil {
		t.Fatal(err)
	}
	start := make(chan struct{})
	for range 4 {
		wg.Go(func() {
			<-start
			for range 100000 {
				_, err1 := c2.GetFree()
				_, err2 := d2.Status()
				if err1 != nil && !errors.Is(err1, fs.ErrClosed) || err2 != nil && !errors.Is(err2, fs.ErrClosed) {
					t.Error(err1, err2)
					return
				}
				if err1 != nil && err2 != nil {
					return
				}
			}
			t.Error("calls did not see Close")
		})
	}
	close(start)
	c2.Close()
	d2.Close()
	wg.Wait()
}

// TestKernelNotRoot runs the package's calls as an unprivileged user.
func TestKernelNotRoot(t *testing.T) {
	if s := os.Getenv("LOOPCTL_AS_NOBODY"); s != "" {
		_, err := Open()
		if !errors.Is(err, fs.ErrPermission) {
			t.Fatalf("Open as nobody: %v, want fs.ErrPermission", err)
		}
		n, _ := strconv.Atoi(s)
		_, err = OpenDevice(n)
		if !errors.Is(err, fs.ErrPermission) {
			t.Fatalf("OpenDevice as nobody: %v, want fs.ErrPermission", err)
		}
		// List and FindByBackingFile read sysfs instead of the devices,
		// and give what root gets from the device itself, but for the
		// owner reference, which is only in the device.
		want := os.Getenv("LOOPCTL_AS_NOBODY_WANT")
		list, err := List()
		if err != nil {
			t.Fatalf("List as nobody: %v", err)
		}
		found, err := FindByBackingFile(os.Getenv("LOOPCTL_AS_NOBODY_FILE"))
		if err != nil || len(found) != 1 || fmt.Sprintf("%+v", found[0]) != want {
			t.Fatalf("FindByBackingFile as nobody = %+v, %v; want [%s]", found, err, want)
		}
		for _, s := range list {
			if s.Number == n {
				if got := fmt.Sprintf("%+v", s); got != want {
					t.Fatalf("List as nobody: %s, want (as root) %s", got, want)
				}
				return
			}
		}
		t.Fatalf("List as nobody lacks device %d: %+v", n, list)
	}
	d := newDevice(t, openControl(t)) // one that surely exists
	// Run this test binary again as nobody, from a place nobody can read.
	dir, err := os.MkdirTemp("", "loopctl-nobody")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	// Bind a file nobody may stat (for List's backing device and inode).
	file := filepath.Join(dir, "backing.img")
	if err := os.WriteFile(file, make([]byte, 1<<16), 0o644); err != nil {
		t.Fatal(err)
	}
	bf, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer bf.Close()
	if err := d.Configure(bf, Options{Offset: 512, SizeLimit: 8192, Flags: FlagReadOnly | FlagPartScan, BlockSize: 4096}); err != nil {
		t.Fatal(err)
	}
	defer d.ClearFD()
	var want string
	if found, err := FindByBackingFile(file); err != nil || len(found) != 1 {
		t.Fatalf("FindByBackingFile as root = %+v, %v", found, err)
	} else {
		found[0].Ref = ""
		want = fmt.Sprintf("%+v", found[0])
	}
	bin := filepath.Join(dir, "loopctl.test")
	exe, err := os.ReadFile("/proc/self/exe")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, exe, 0o755); err != nil || os.Chmod(dir, 0o755) != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-test.run=^TestKernelNotRoot$", "-test.v")
	cmd.Env = append(os.Environ(), "LOOPCTL_AS_NOBODY="+strconv.Itoa(d.Number()),
		"LOOPCTL_AS_NOBODY_WANT="+want, "LOOPCTL_AS_NOBODY_FILE="+file)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil || !strings.Contains(out.String(), "--- PASS: TestKernelNotRoot") {
		t.Fatalf("as nobody: %v\n%s", err, out.String())
	}
}
