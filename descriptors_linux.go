package loopctl

import (
	"os"
	"runtime"
	"strings"
	"sync/atomic"
	"unsafe"

	"github.com/loopctl/loopctl/internal/call"
	"golang.org/x/sys/unix"
)

// kernel opens handles: the machine's (osKernel), or a test's fake.
type kernel interface {
	open(path string, mode int) (handle, error)
}

// osKernel opens real device nodes.
type osKernel struct{}

// open opens path with O_CLOEXEC: open(2) and nothing more. os.NewFile
// would add an fcntl, and os.OpenFile more fcntl calls and a poller
// registration that block devices refuse. A transient handle is the bare
// descriptor.
func (osKernel) open(path string, mode int) (handle, error) {
	flags := unix.O_RDWR
	if mode&readOnly != 0 {
		flags = unix.O_RDONLY
	}
	fd, err := openFD(path, flags)
	if err != nil {
		return nil, err
	}
	if mode&transient != 0 {
		return fdHandle(fd), nil
	}
	h := newFileHandle(fd)
	h.ro = mode&readOnly != 0
	return h, nil
}

// openFD opens path with flags and O_CLOEXEC, and nothing more: for a
// descriptor this package holds only for the length of a call. A short
// path is handed to the kernel from the stack, not copied to the heap as
// unix.Open copies it. An error is an *os.PathError.
func openFD(path string, flags int) (int, error) {
	var buf [64]byte
	var p *byte
	if len(path) < len(buf) && strings.IndexByte(path, 0) < 0 {
		copy(buf[:], path) // and its NUL
		p = &buf[0]
	} else {
		var err error
		if p, err = unix.BytePtrFromString(path); err != nil {
			return -1, &os.PathError{Op: "open", Path: path, Err: err}
		}
	}
	fd, errno := call.OpenAt(unix.AT_FDCWD, p, flags)
	if errno != 0 {
		return -1, &os.PathError{Op: "open", Path: path, Err: errno}
	}
	return fd, nil
}

// closeFD closes a descriptor from openFD.
func closeFD(fd int) { unix.Close(fd) }

// stat is stat(2), following symlinks.
func stat(path string) (unix.Stat_t, error) {
	var st unix.Stat_t
	err := call.Retry(func() error { return unix.Stat(path, &st) })
	return st, err
}

// fstat is fstat(2).
func fstat(fd uintptr) (unix.Stat_t, error) {
	var st unix.Stat_t
	err := call.Retry(func() error { return unix.Fstat(int(fd), &st) })
	return st, err
}

// A fileHandle is a descriptor of a Control or a Device, which callers may
// use from many goroutines and close at any moment. It counts the calls in
// flight, as os.File does, but with two atomic operations a call and no
// allocation: each call takes a reference before it enters the kernel and
// drops it after, Close drops the handle's own, and whoever drops the last
// closes the descriptor. Once closed, a handle gives no new references, so
// no call can reach the descriptor number after the kernel reuses it.
type fileHandle struct {
	fd int
	ro bool // opened read-only
	// refs is the count of references, the handle's own included, with
	// handleClosed set once Close has begun.
	refs    atomic.Uint64
	cleanup runtime.Cleanup
}

const handleClosed = 1 << 63

// newFileHandle owns fd. A handle dropped without Close closes fd when the
// garbage collector finds it, as an *os.File does.
func newFileHandle(fd int) *fileHandle {
	h := &fileHandle{fd: fd}
	h.refs.Store(1)
	h.cleanup = runtime.AddCleanup(h, closeFD, fd)
	return h
}

// acquire takes a reference for a call, reporting false once the handle
// is closed.
func (h *fileHandle) acquire() bool {
	for {
		r := h.refs.Load()
		if r&handleClosed != 0 {
			return false
		}
		if h.refs.CompareAndSwap(r, r+1) {
			return true
		}
	}
}

// release drops a reference; the last one of a closed handle closes the
// descriptor and returns close's error.
func (h *fileHandle) release() error {
	if h.refs.Add(^uint64(0)) == handleClosed {
		return unix.Close(h.fd)
	}
	return nil
}

// Close closes the descriptor now, or, with calls in flight, when the
// last of them returns (its error is then lost, as os.File loses it).
func (h *fileHandle) Close() error {
	for {
		r := h.refs.Load()
		if r&handleClosed != 0 {
			return os.ErrClosed
		}
		if h.refs.CompareAndSwap(r, r|handleClosed) {
			break
		}
	}
	h.cleanup.Stop()
	return h.release()
}

// A readOnlyHandle tells whether its descriptor was opened read-only.
type readOnlyHandle interface{ readOnly() bool }

func (h *fileHandle) readOnly() bool { return h.ro }

func (h *fileHandle) rawIoctl(req uint, arg uintptr) (int, error) {
	if !h.acquire() {
		return -1, os.ErrClosed
	}
	defer h.release()
	return fdHandle(h.fd).rawIoctl(req, arg)
}

func (h *fileHandle) rawIoctlPtr(req uint, arg unsafe.Pointer) error {
	if !h.acquire() {
		return os.ErrClosed
	}
	defer h.release()
	return fdHandle(h.fd).rawIoctlPtr(req, arg)
}

// flock applies a BSD lock operation. A blocking LOCK_EX interrupted by a
// signal is made again.
func (h *fileHandle) flock(how int) error {
	if !h.acquire() {
		return os.ErrClosed
	}
	defer h.release()
	return fdHandle(h.fd).flock(how)
}

func (h *fileHandle) rdev() (uint64, error) {
	if !h.acquire() {
		return 0, os.ErrClosed
	}
	defer h.release()
	return fdHandle(h.fd).rdev()
}

// An fdHandle is a bare descriptor: one its opener alone uses, and closes,
// within one call, so that no concurrent Close can send a call to a reused
// number and it needs no reference count; and the descriptor of a
// fileHandle, whose calls come here once they have made sure of it.
type fdHandle int

func (h fdHandle) flock(how int) error {
	return call.Retry(func() error { return unix.Flock(int(h), how) })
}

func (h fdHandle) rdev() (uint64, error) { return blockRdev(int(h)) }

func (h fdHandle) Close() error { return unix.Close(int(h)) }

// blockRdev returns the device number of the block device open as fd.
func blockRdev(fd int) (uint64, error) {
	st, err := fstat(uintptr(fd))
	switch {
	case err != nil:
		return 0, err
	case st.Mode&unix.S_IFMT != unix.S_IFBLK:
		return 0, ErrNotLoop
	}
	return uint64(st.Rdev), nil
}
