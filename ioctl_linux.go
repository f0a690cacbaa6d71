//go:build !loopctl_stub

package loopctl

import (
	"os"
	"strconv"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/sysfs"
)

// sys is the kernel in use; tests replace it with fakes.
var sys kernel = osKernel{}

// sysfsRoot is where sysfs is mounted; tests point it at a fake tree.
var sysfsRoot = "/sys"

// osKernel opens real device nodes.
type osKernel struct{}

// probe is an open mode, read-only, for a handle that its opener alone uses
// and closes within one call: a bare descriptor, without what an *os.File
// costs (an fcntl and a few allocations a device, which a look through
// hundreds of devices feels).
const probe = readOnly + 1

// open opens path with O_CLOEXEC. It calls open(2) itself and wraps the
// descriptor with os.NewFile, which costs one fcntl; os.OpenFile would add
// more fcntl calls and a poller registration that block devices refuse.
func (osKernel) open(path string, mode int) (handle, error) {
	if mode == probe {
		fd, err := openFD(path, unix.O_RDONLY)
		if err != nil {
			return nil, err
		}
		return fdHandle(fd), nil
	}
	flags := unix.O_RDWR
	if mode == readOnly {
		flags = unix.O_RDONLY
	}
	f, err := openFile(path, flags)
	if err != nil {
		return nil, err
	}
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	return &fileHandle{f: f, rc: rc}, nil
}

// openFile opens path with flags and O_CLOEXEC: open(2), then os.NewFile,
// which adds one fcntl(F_GETFL).
func openFile(path string, flags int) (*os.File, error) {
	fd, err := openFD(path, flags)
	if err != nil {
		return nil, err
	}
	return os.NewFile(uintptr(fd), path), nil
}

// openFD opens path with flags and O_CLOEXEC, and nothing more: for a
// descriptor this package holds only for the length of a call. An error is
// an *os.PathError.
func openFD(path string, flags int) (int, error) {
	var fd int
	err := ignoringEINTR(func() (err error) {
		fd, err = unix.Open(path, flags|unix.O_CLOEXEC, 0)
		return err
	})
	if err != nil {
		return -1, &os.PathError{Op: "open", Path: path, Err: err}
	}
	return fd, nil
}

// closeFD closes a descriptor from openFD.
func closeFD(fd int) { unix.Close(fd) }

// stat is stat(2), following symlinks.
func stat(path string) (unix.Stat_t, error) {
	var st unix.Stat_t
	err := ignoringEINTR(func() error { return unix.Stat(path, &st) })
	return st, err
}

// fstat is fstat(2).
func fstat(fd uintptr) (unix.Stat_t, error) {
	var st unix.Stat_t
	err := ignoringEINTR(func() error { return unix.Fstat(int(fd), &st) })
	return st, err
}

// A fileHandle runs every call through its file's RawConn, which holds a
// reference on the descriptor for the duration: a concurrent Close waits,
// so a call can never reach a reused descriptor number.
type fileHandle struct {
	f  *os.File
	rc syscall.RawConn
}

// ioctl makes request req on h with a value argument. With ioctlPtr, it is
// the one way this package makes an ioctl, and the one place it retries
// EINTR: the retry sits above the handle seam, so tests see it work.
func ioctl(h handle, req uint, arg uintptr) (int, error) {
	for {
		r, err := h.rawIoctl(req, arg)
		if err != unix.EINTR {
			return r, err
		}
	}
}

// ioctlPtr makes request req on h with a pointer to a kernel structure.
func ioctlPtr(h handle, req uint, arg unsafe.Pointer) error {
	for {
		if err := h.rawIoctlPtr(req, arg); err != unix.EINTR {
			return err
		}
	}
}

func (h *fileHandle) rawIoctl(req uint, arg uintptr) (int, error) {
	c := calls.Get().(*call)
	c.req, c.val, c.ptr = req, arg, nil
	r, err := c.on(h.rc)
	calls.Put(c)
	return r, err
}

func (h *fileHandle) rawIoctlPtr(req uint, arg unsafe.Pointer) error {
	c := calls.Get().(*call)
	c.req, c.ptr = req, arg
	_, err := c.on(h.rc)
	c.ptr = nil // do not keep the argument alive in the pool
	calls.Put(c)
	return err
}

// flock runs as a pooled call, as an ioctl does, so that the four of an
// Attach allocate nothing. A blocking LOCK_EX interrupted by a signal is
// made again.
func (h *fileHandle) flock(how int) error {
	c := calls.Get().(*call)
	c.req, c.val, c.ptr, c.flock = 0, uintptr(how), nil, true
	_, err := c.on(h.rc)
	for err == unix.EINTR {
		_, err = c.on(h.rc)
	}
	c.flock = false
	calls.Put(c)
	return err
}

func (h *fileHandle) rdev() (uint64, error) {
	var st unix.Stat_t
	var err error
	cerr := h.rc.Control(func(fd uintptr) { st, err = fstat(fd) })
	switch {
	case cerr != nil:
		return 0, os.ErrClosed
	case err != nil:
		return 0, err
	case st.Mode&unix.S_IFMT != unix.S_IFBLK:
		return 0, ErrNotLoop
	}
	return uint64(st.Rdev), nil
}

func (h *fileHandle) Close() error { return h.f.Close() }

// A call is one ioctl, or flock, in flight. Calls are pooled, and each
// keeps its run method as a func value made once, so a call through
// RawConn.Control allocates nothing: a closure capturing the arguments
// would escape to the heap on every call.
type call struct {
	req   uint
	val   uintptr
	ptr   unsafe.Pointer
	flock bool // flock(2) with val as the operation, not an ioctl
	r     uintptr
	errno unix.Errno
	run   func(fd uintptr)
}

var calls = sync.Pool{New: func() any {
	c := new(call)
	c.run = c.do
	return c
}}

// on runs the call on rc's descriptor. A file closed under it reports
// os.ErrClosed.
func (c *call) on(rc syscall.RawConn) (int, error) {
	if err := rc.Control(c.run); err != nil {
		return -1, os.ErrClosed
	}
	return c.result()
}

func (c *call) result() (int, error) {
	if c.errno != 0 {
		return -1, c.errno
	}
	return int(c.r), nil
}

// An fdHandle is a bare descriptor opened for a probe: its opener alone
// uses it, and closes it, within one call, so no concurrent Close can send
// a call to a reused number, and it needs no RawConn.
type fdHandle int

func (h fdHandle) rawIoctl(req uint, arg uintptr) (int, error) {
	c := calls.Get().(*call)
	c.req, c.val, c.ptr = req, arg, nil
	c.run(uintptr(h))
	r, err := c.result()
	calls.Put(c)
	return r, err
}

func (h fdHandle) rawIoctlPtr(req uint, arg unsafe.Pointer) error {
	c := calls.Get().(*call)
	c.req, c.ptr = req, arg
	c.run(uintptr(h))
	_, err := c.result()
	c.ptr = nil
	calls.Put(c)
	return err
}

func (h fdHandle) flock(how int) error {
	return ignoringEINTR(func() error { return unix.Flock(int(h), how) })
}

func (h fdHandle) rdev() (uint64, error) {
	st, err := fstat(uintptr(h))
	if err != nil {
		return 0, err
	}
	return uint64(st.Rdev), nil
}

func (h fdHandle) Close() error { return unix.Close(int(h)) }

// do is the one place this package enters the kernel with an ioctl, or
// with a flock of a loop node.
func (c *call) do(fd uintptr) {
	switch {
	case c.flock:
		c.r, _, c.errno = unix.Syscall(unix.SYS_FLOCK, fd, c.val, 0)
	case c.ptr != nil:
		c.r, _, c.errno = unix.Syscall(unix.SYS_IOCTL, fd, uintptr(c.req), uintptr(c.ptr))
	default:
		c.r, _, c.errno = unix.Syscall(unix.SYS_IOCTL, fd, uintptr(c.req), c.val)
	}
}

// ignoringEINTR retries fn while it fails with EINTR.
func ignoringEINTR(fn func() error) error {
	for {
		if err := fn(); err != unix.EINTR {
			return err
		}
	}
}

// loopNumber checks, without opening it, that path (after symlinks) is a
// whole loop disk, and returns its number and device number. The sysfs
// loop/ directory exists only while a device is bound, so the test is where
// /sys/dev/block/MAJ:MIN leads: to .../block/loopN for a whole loop disk,
// to .../block/loopN/loopNpM for a partition.
func loopNumber(path string) (int, uint64, error) {
	st, err := stat(path)
	if err != nil {
		return -1, 0, &os.PathError{Op: "open", Path: path, Err: err}
	}
	if st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return -1, 0, newError("open", path, ErrNotLoop)
	}
	rdev := uint64(st.Rdev)
	target, err := os.Readlink(sysfs.DevBlockPath(sysfsRoot, unix.Major(rdev), unix.Minor(rdev)))
	if err != nil {
		return -1, 0, newError("open", path, ErrNotLoop)
	}
	n, ok := sysfs.WholeLoopDisk(target)
	if !ok || n > MaxNumber {
		return -1, 0, newError("open", path, ErrNotLoop)
	}
	return n, rdev, nil
}

// againDelays are the pauses between tries of an ioctl that answers EAGAIN
// (LOOP_SET_STATUS64 and LOOP_SET_BLOCK_SIZE while the kernel drains the
// queue): about a second in all, then the EAGAIN is returned. Tests shorten
// them.
var againDelays = []time.Duration{
	time.Millisecond, 2 * time.Millisecond, 5 * time.Millisecond, 10 * time.Millisecond,
	20 * time.Millisecond, 50 * time.Millisecond, 100 * time.Millisecond,
	200 * time.Millisecond, 250 * time.Millisecond, 250 * time.Millisecond,
}

// retryAgain runs fn, retrying with bounded backoff while it fails with
// EAGAIN. It is the one place EAGAIN is retried.
func retryAgain(fn func() error) error {
	for i := 0; ; i++ {
		err := fn()
		if err != unix.EAGAIN || i == len(againDelays) {
			return err
		}
		time.Sleep(againDelays[i])
	}
}

// reopenReadOnly returns a read-only descriptor of the file open as fd, and
// a function that releases it: fd itself when it is read-only already,
// otherwise a new open of /proc/self/fd/N.
func reopenReadOnly(fd uintptr) (uintptr, func(), error) {
	fl, err := unix.FcntlInt(fd, unix.F_GETFL, 0)
	if err != nil {
		return 0, nil, err
	}
	if fl&unix.O_ACCMODE == unix.O_RDONLY {
		return fd, func() {}, nil
	}
	ro, err := openFD("/proc/self/fd/"+strconv.Itoa(int(fd)), unix.O_RDONLY)
	if err != nil {
		return 0, nil, err
	}
	return uintptr(ro), func() { closeFD(ro) }, nil
}
