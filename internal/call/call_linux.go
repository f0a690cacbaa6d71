// Package call is loopctl's one way into the kernel for what x/sys leaves
// to its callers: the one place EINTR is retried, and the one open.
//
// A signal that interrupts a slow call returns EINTR; the Go runtime
// sends its own (preemption, profiling), so every call that can block is
// retried here, and nowhere else.
package call

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// Retry calls fn until it returns something other than EINTR, and returns
// that.
func Retry(fn func() error) error {
	for {
		if err := fn(); err != unix.EINTR {
			return err
		}
	}
}

// RetryN is Retry for a call that returns a count.
func RetryN(fn func() (int, error)) (int, error) {
	for {
		n, err := fn()
		if err != unix.EINTR {
			return n, err
		}
	}
}

// OpenAt is openat(2) of the NUL-terminated path at p, relative to the
// directory open as dir (or unix.AT_FDCWD), with flags, O_CLOEXEC and
// O_LARGEFILE. O_LARGEFILE, which x/sys's Open adds too, is 0 on 64-bit
// systems; without it a 32-bit program's open of a file over 2 GiB fails
// with EOVERFLOW. It hands p to the kernel as it is, allocating nothing.
func OpenAt(dir int, p *byte, flags int) (int, unix.Errno) {
	for {
		r, _, errno := unix.Syscall6(unix.SYS_OPENAT, uintptr(dir), uintptr(unsafe.Pointer(p)),
			uintptr(flags|unix.O_CLOEXEC|unix.O_LARGEFILE), 0, 0, 0)
		if errno != unix.EINTR {
			return int(r), errno
		}
	}
}

// AccessAt is faccessat(2) of the NUL-terminated path at p relative to
// dir, for existence (F_OK). With inMemory, for a directory on sysfs
// whose lookups wait for nothing but short locks of a tree held in
// memory, it is made without the runtime's system-call bookkeeping
// (RawSyscall6), which on two cores cost a lookup of a few microseconds a
// fifth more; anywhere else a lookup can wait for a disk or a server.
func AccessAt(dir int, p *byte, inMemory bool) unix.Errno {
	call := unix.Syscall6
	if inMemory {
		call = unix.RawSyscall6
	}
	for {
		_, _, errno := call(unix.SYS_FACCESSAT, uintptr(dir), uintptr(unsafe.Pointer(p)), unix.F_OK, 0, 0, 0)
		if errno != unix.EINTR {
			return errno
		}
	}
}

// LinksAt returns the link count of the NUL-terminated path at p relative
// to dir, following symbolic links, with statx(2) asking for STATX_NLINK
// alone: one call of the same number on every architecture, allocating
// nothing.
func LinksAt(dir int, p *byte) (uint32, unix.Errno) {
	var st unix.Statx_t
	for {
		_, _, errno := unix.Syscall6(unix.SYS_STATX, uintptr(dir), uintptr(unsafe.Pointer(p)), 0,
			unix.STATX_NLINK, uintptr(unsafe.Pointer(&st)), 0)
		if errno == 0 && st.Mask&unix.STATX_NLINK == 0 {
			return 0, unix.ENODATA // a file system that keeps no link count
		}
		if errno != unix.EINTR {
			return st.Nlink, errno
		}
	}
}
