package main

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"sync/atomic"
	"unsafe"

	"github.com/containerd/containerd/v2/core/mount"
	losetup "github.com/freddierice/go-losetup"
	"github.com/u-root/u-root/pkg/mount/loop"
	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl"
)

// An op is one operation as one implementation does it in this process.
// setup prepares it for the backing file (cycle and find need one) and
// returns one run of it and what undoes the setup.
type op struct {
	setup func(file string) (run func() error, done func(), err error)
}

// ops are the in-process operations, by group and implementation; child
// processes (for strace and for the two-process rows) run them by name.
var ops = map[string]op{
	"getfree/go":         {setup: floorGetFree},
	"getfree/go-ref":     {setup: floorRefGetFree},
	"getfree/loopctl":    {setup: loopctlGetFree},
	"getfree/u-root":     {setup: urootGetFree},
	"getfree/go-losetup": {setup: nofile(func() error { _, err := losetup.GetFree(); return err })},
	"cycle/go":           {setup: floorCycle},
	"cycle/loopctl":      {setup: loopctlCycle},
	"cycle/u-root":       {setup: withName(urootCycle)},
	"cycle/containerd":   {setup: withName(containerdCycle)},
	"cycle/go-losetup":   {setup: withName(goLosetupCycle)},
	"scan/go":            {setup: nofile(func() error { _, err := floorScan(); return err })},
}

func nofile(run func() error) func(string) (func() error, func(), error) {
	return func(string) (func() error, func(), error) { return run, func() {}, nil }
}

func withName(cycle func(file string) error) func(string) (func() error, func(), error) {
	return func(file string) (func() error, func(), error) {
		return func() error { return cycle(file) }, func() {}, nil
	}
}

// atFDCWD is AT_FDCWD (-100) as a system call argument.
var atFDCWD = func() uintptr { fd := unix.AT_FDCWD; return uintptr(fd) }()

// The Go floor: bare unix.Syscall calls, the same ones loopctl makes, with
// nothing around them.

func openCtl() (int, error) { return unix.Open(loopctl.ControlPath, unix.O_RDWR|unix.O_CLOEXEC, 0) }

func floorGetFree(string) (func() error, func(), error) {
	c, err := openCtl()
	if err != nil {
		return nil, nil, err
	}
	run := func() error {
		if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(c), unix.LOOP_CTL_GET_FREE, 0); errno != 0 {
			return errno
		}
		return nil
	}
	return run, func() { unix.Close(c) }, nil
}

// floorRefGetFree is the floor with the reference loopctl holds on the
// descriptor during a call: a compare-and-swap to take it, an add to drop
// it.
func floorRefGetFree(string) (func() error, func(), error) {
	c, err := openCtl()
	if err != nil {
		return nil, nil, err
	}
	var refs atomic.Uint64
	refs.Store(1)
	const closed = 1 << 63
	run := func() error {
		r := refs.Load()
		if r&closed != 0 || !refs.CompareAndSwap(r, r+1) {
			return os.ErrClosed
		}
		_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(c), unix.LOOP_CTL_GET_FREE, 0)
		refs.Add(^uint64(0))
		if errno != 0 {
			return errno
		}
		return nil
	}
	return run, func() { unix.Close(c) }, nil
}

func loopctlGetFree(string) (func() error, func(), error) {
	c, err := loopctl.Open()
	if err != nil {
		return nil, nil, err
	}
	return func() error { _, err := c.GetFree(); return err }, func() { c.Close() }, nil
}

func urootGetFree(string) (func() error, func(), error) {
	f, err := os.OpenFile(loopctl.ControlPath, os.O_RDWR, 0)
	if err != nil {
		return nil, nil, err
	}
	fd := int(f.Fd())
	return func() error { _, err := loop.GetFree(fd); return err }, func() { f.Close() }, nil
}

// floorCycle is attach and detach as loopctl does them, in bare syscalls:
// fstat, fstatfs and F_GETFL of the file, the control device's flock,
// LOOP_CTL_GET_FREE, open, the device's flock, on kernels before 7.2 the
// statx of the disk's sysfs directory that tells partitions an earlier
// binding left, LOOP_CONFIGURE, BLKGETDISKSEQ, both unlocks, LOOP_CLR_FD,
// close.
func floorCycle(file string) (func() error, func(), error) {
	c, err := openCtl()
	if err != nil {
		return nil, nil, err
	}
	f, err := unix.Open(file, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		unix.Close(c)
		return nil, nil, err
	}
	var path, sys [32]byte
	var st unix.Stat_t
	var sf unix.Statfs_t
	var sx unix.Statx_t
	var seq uint64
	cfg := unix.LoopConfig{Fd: uint32(f)}
	keepsPartitions := keepsPartitions()
	attach := func() (int, error) {
		if err := unix.Fstat(f, &st); err != nil {
			return -1, err
		}
		if err := unix.Fstatfs(f, &sf); err != nil {
			return -1, err
		}
		if _, err := unix.FcntlInt(uintptr(f), unix.F_GETFL, 0); err != nil {
			return -1, err
		}
		if err := unix.Flock(c, unix.LOCK_EX|unix.LOCK_NB); err != nil {
			if err := unix.Flock(c, unix.LOCK_EX); err != nil {
				return -1, err
			}
		}
		defer unix.Flock(c, unix.LOCK_UN)
		n, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(c), unix.LOOP_CTL_GET_FREE, 0)
		if errno != 0 {
			return -1, errno
		}
		p := strconv.AppendInt(append(path[:0], "/dev/loop"...), int64(n), 10)
		p = append(p, 0)
		fd, _, errno := unix.Syscall6(unix.SYS_OPENAT, atFDCWD, uintptr(unsafe.Pointer(&p[0])),
			unix.O_RDWR|unix.O_CLOEXEC, 0, 0, 0)
		if errno != 0 {
			return 0, nil // lost a race: try again
		}
		d := int(fd)
		if err := unix.Flock(d, unix.LOCK_EX|unix.LOCK_NB); err != nil {
			unix.Close(d)
			return 0, nil
		}
		if keepsPartitions {
			p := strconv.AppendInt(append(sys[:0], "/sys/block/loop"...), int64(n), 10)
			p = append(p, 0)
			if _, _, errno := unix.Syscall6(unix.SYS_STATX, atFDCWD, uintptr(unsafe.Pointer(&p[0])), 0,
				unix.STATX_NLINK, uintptr(unsafe.Pointer(&sx)), 0); errno != 0 {
				unix.Close(d)
				return -1, errno
			}
		}
		if _, _, errno := unix.Syscall(unix.SYS_IOCTL, fd, unix.LOOP_CONFIGURE, uintptr(unsafe.Pointer(&cfg))); errno != 0 {
			unix.Close(d)
			if errno == unix.EBUSY {
				return 0, nil
			}
			return -1, errno
		}
		if _, _, errno := unix.Syscall(unix.SYS_IOCTL, fd, unix.BLKGETDISKSEQ, uintptr(unsafe.Pointer(&seq))); errno != 0 &&
			errno != unix.EINVAL && errno != unix.ENOTTY {
			unix.Close(d)
			return -1, errno
		}
		unix.Flock(d, unix.LOCK_UN)
		return d, nil
	}
	run := func() error {
		d, err := attach()
		for d == 0 && err == nil {
			d, err = attach()
		}
		if err != nil {
			return err
		}
		_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(d), unix.LOOP_CLR_FD, 0)
		unix.Close(d)
		if errno != 0 {
			return errno
		}
		return nil
	}
	return run, func() { unix.Close(f); unix.Close(c) }, nil
}

// keepsPartitions tells whether the kernel leaves partitions added by
// hand after a detach (before Linux 7.2), which loopctl then looks for
// before it binds.
func keepsPartitions() bool {
	var u unix.Utsname
	if unix.Uname(&u) != nil {
		return false
	}
	var major, minor int
	fmt.Sscanf(unix.ByteSliceToString(u.Release[:]), "%d.%d", &major, &minor)
	return major < 7 || major == 7 && minor < 2
}

func loopctlCycle(file string) (func() error, func(), error) {
	f, err := os.OpenFile(file, os.O_RDWR, 0)
	if err != nil {
		return nil, nil, err
	}
	run := func() error {
		d, err := loopctl.AttachFile(context.Background(), f, loopctl.Options{})
		if err != nil {
			return err
		}
		err = d.ClearFD()
		d.Close()
		return err
	}
	return run, func() { f.Close() }, nil
}

// urootCycle is u-root's way: FindDevice (which opens /dev/loop-control
// each time), SetFile (LOOP_SET_FD), ClearFile.
func urootCycle(file string) error {
	dev, err := loop.FindDevice()
	if err != nil {
		return err
	}
	if err := loop.SetFile(dev, file); err != nil {
		return err
	}
	return loop.ClearFile(dev)
}

func containerdCycle(file string) error {
	dev, err := mount.AttachLoopDevice(file)
	if err != nil {
		return err
	}
	return mount.DetachLoopDevice(dev)
}

// goLosetupCycle binds with LOOP_SET_FD and LOOP_SET_STATUS64, as
// go-losetup does.
func goLosetupCycle(file string) error {
	d, err := losetup.Attach(file, 0, false)
	if err != nil {
		return err
	}
	return d.Detach()
}

// floorScan finds a free device the way programs did before
// /dev/loop-control: open /dev/loop0, 1, 2... and ask LOOP_GET_STATUS64
// until a device answers ENXIO.
func floorScan() (int, error) {
	var info unix.LoopInfo64
	var path [32]byte
	for n := 0; ; n++ {
		p := append(strconv.AppendInt(append(path[:0], "/dev/loop"...), int64(n), 10), 0)
		fd, _, errno := unix.Syscall6(unix.SYS_OPENAT, atFDCWD, uintptr(unsafe.Pointer(&p[0])),
			unix.O_RDONLY|unix.O_CLOEXEC, 0, 0, 0)
		if errno != 0 {
			return -1, fmt.Errorf("open /dev/loop%d: %w", n, errno)
		}
		_, _, errno = unix.Syscall(unix.SYS_IOCTL, fd, unix.LOOP_GET_STATUS64, uintptr(unsafe.Pointer(&info)))
		unix.Close(int(fd))
		if errno == unix.ENXIO {
			return n, nil
		}
	}
}

// loopName parses a NUL-padded "loopN" directory entry name.
func loopName(b []byte) (int, bool) {
	if len(b) < 5 || string(b[:4]) != "loop" {
		return 0, false
	}
	n := 0
	for _, c := range b[4:] {
		if c == 0 {
			break
		}
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + int(c-'0')
	}
	return n, true
}
