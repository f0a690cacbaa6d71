package loopctl

import (
	"errors"
	"io"
	"io/fs"
	"strconv"
	"sync/atomic"
	"syscall"
	"unsafe"
)

const (
	// ControlPath is the loop-control device.
	ControlPath = "/dev/loop-control"

	// MaxNumber is the highest device number the kernel accepts.
	MaxNumber = 1<<20 - 1

	// AnyNumber asks Add to let the kernel pick an unused number.
	AnyNumber = -1
)

// Loop ioctl request numbers from include/uapi/linux/loop.h. They carry no
// size or direction bits, so they are the same on every architecture; a
// test checks them against golang.org/x/sys/unix where it defines them.
const (
	reqSetFD        = 0x4C00
	reqClearFD      = 0x4C01
	reqSetStatus64  = 0x4C04
	reqGetStatus64  = 0x4C05
	reqChangeFD     = 0x4C06
	reqSetCapacity  = 0x4C07
	reqSetDirectIO  = 0x4C08
	reqSetBlockSize = 0x4C09
	reqConfigure    = 0x4C0A
	reqCtlAdd       = 0x4C80
	reqCtlRemove    = 0x4C81
	reqCtlGetFree   = 0x4C82
)

// DevicePath returns the path of loop device n: "/dev/loop" followed by n.
func DevicePath(n int) string { return "/dev/loop" + strconv.Itoa(n) }

// A Control is an open /dev/loop-control: it creates, removes and finds free
// loop devices. It is safe for concurrent use.
type Control struct {
	h      handle
	sys    *system
	closed atomic.Bool
}

var _ io.Closer = (*Control)(nil)

// Open opens ControlPath. Its error matches [fs.ErrNotExist] when the node
// is missing (no loop driver, or a container without it), and
// [fs.ErrPermission] when it is not accessible (not root).
func Open() (*Control, error) { return host.open() }

func (s *system) open() (*Control, error) {
	h, err := s.k.open(ControlPath, readWrite)
	if err != nil {
		err = nodeOpenError(ControlPath, err)
		if errors.Is(err, syscall.EACCES) {
			err = explainRefused(ControlPath, err, "udev, which gives it to the disk group (mode 0660) by its rules, is not running")
		}
		return nil, err
	}
	return &Control{h: h, sys: s}, nil
}

// Add creates loop device n with LOOP_CTL_ADD and returns its number, or
// with n == [AnyNumber] lets the kernel choose an unused number (on a
// kernel that cannot, the lowest that sysfs does not list: KERNELS.md). An
// existing device n is an error matching [fs.ErrExist]. On error the
// number is -1. A device made by Add stays until [Control.Remove]; GetFree
// also creates devices, which is the kernel's normal way and needs no
// Remove.
func (c *Control) Add(n int) (int, error) {
	if err := checkNumber("add", ControlPath, n, AnyNumber); err != nil {
		return -1, err
	}
	if n != AnyNumber {
		return c.ioctl("add", DevicePath(n), reqCtlAdd, uintptr(n))
	}
	return c.addAny()
}

// Remove deletes loop device n with LOOP_CTL_REMOVE. A bound or open device
// is an error matching [ErrBusy], which says which; a missing one matches
// [fs.ErrNotExist].
//
// An unbound device is open, mostly, because udev is probing it: udev
// opens every device that changes, for the milliseconds its probe takes,
// and on a busy machine its queue runs behind. Remove tries again while
// the device is unbound and open, with backoff, for about a second in
// all. A bound device is refused at once: detach it, and wait for its
// last opener to close it (see [Device.ClearFD]), first.
//
// Removal is slow (the kernel waits for the disk to go away, tens of
// milliseconds), and the node may linger for a moment after it returns.
func (c *Control) Remove(n int) error {
	if err := checkNumber("remove", ControlPath, n, 0); err != nil {
		return err
	}
	return c.remove(n)
}

// GetFree returns the number of the lowest unbound loop device with
// LOOP_CTL_GET_FREE; the kernel creates one when all are bound. Another
// process may bind the device before the caller does: [Attach] handles that
// race, and code that binds by hand must retry on [ErrBusy].
//
// GetFree makes one ioctl and allocates nothing. On error the number is -1.
func (c *Control) GetFree() (int, error) {
	return c.ioctl("get free", ControlPath, reqCtlGetFree, 0)
}

// Close closes the control device. Close is idempotent; every other method
// returns an error matching [fs.ErrClosed] after it.
func (c *Control) Close() error {
	if c == nil || c.h == nil || c.closed.Swap(true) {
		return nil
	}
	return newError("close", ControlPath, c.h.Close())
}

func (c *Control) ioctl(op, path string, req uint, arg uintptr) (int, error) {
	if c == nil || c.h == nil || c.closed.Load() {
		return -1, &Error{Op: op, Path: path, Err: fs.ErrClosed}
	}
	r, err := ioctl(c.h, req, arg)
	if err != nil {
		return -1, &Error{Op: op, Path: path, Err: err}
	}
	return r, nil
}

// A handle is one open node of the loop driver: /dev/loop-control or a
// /dev/loopN. It is the seam between this package and the kernel: the real
// one (ioctl_linux.go) holds a descriptor, and tests substitute fakes to fail
// any step without root.
type handle interface {
	// rawIoctl makes request req once with a value argument and returns
	// the kernel's non-negative result or its errno, EINTR included.
	// Callers go through the ioctl helper instead.
	rawIoctl(req uint, arg uintptr) (int, error)
	// rawIoctlPtr is rawIoctl with a pointer to a kernel structure.
	rawIoctlPtr(req uint, arg unsafe.Pointer) error
	// flock applies a BSD lock operation (LOCK_EX, LOCK_UN, ...).
	flock(how int) error
	// rdev returns the device number of the node, which must be a block
	// device.
	rdev() (uint64, error)
	// Close releases the node; the handle is unusable after it.
	Close() error
}

// The open modes a handle is asked for: readWrite or readOnly, with
// transient for a handle that its opener alone uses, and closes, within
// one call (a look at a device), which needs no reference count.
const (
	readWrite = 0
	readOnly  = 1 << 0
	transient = 1 << 1
)
