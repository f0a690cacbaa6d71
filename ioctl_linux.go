package loopctl

import (
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/call"
)

// ioctl makes request req on h with a value argument. With ioctlPtr, it is
// the one way this package makes an ioctl. EINTR is retried above the
// handle seam, so that tests see the retry work.
func ioctl(h handle, req uint, arg uintptr) (int, error) {
	r, err := call.RetryN(func() (int, error) { return h.rawIoctl(req, arg) })
	return r, explainReadOnly(h, req, err)
}

// ioctlPtr makes request req on h with a pointer to a kernel structure.
func ioctlPtr(h handle, req uint, arg unsafe.Pointer) error {
	return explainReadOnly(h, req, call.Retry(func() error { return h.rawIoctlPtr(req, arg) }))
}

// explainReadOnly explains EPERM from a request that changes a loop
// device, made through a descriptor open read-only: without CAP_SYS_ADMIN
// the kernel takes such requests only through a descriptor open for
// writing.
func explainReadOnly(h handle, req uint, err error) error {
	if err != unix.EPERM {
		return err
	}
	switch req {
	case reqSetFD, reqConfigure, reqChangeFD, reqClearFD, reqSetStatus64, reqSetCapacity, reqSetDirectIO, reqSetBlockSize:
	default:
		return err
	}
	if ro, ok := h.(readOnlyHandle); !ok || !ro.readOnly() {
		return err
	}
	return errReadOnlyDescriptor
}

// errReadOnlyDescriptor is why a change of a loop device open read-only
// was refused.
var errReadOnlyDescriptor error = explain("the device is open read-only (a read-only binding is), and without "+
	"CAP_SYS_ADMIN the kernel changes a loop device only through a descriptor open for writing: OpenDevice opens one", unix.EPERM, nil)

// result is a syscall's result as this package returns it.
func result(r uintptr, errno unix.Errno) (int, error) {
	if errno != 0 {
		return -1, errno
	}
	return int(r), nil
}

// errnoErr is errno as an error, nil for 0.
func errnoErr(errno unix.Errno) error {
	if errno != 0 {
		return errno
	}
	return nil
}

// rawIoctl and rawIoctlPtr are the one place this package enters the
// kernel with an ioctl. A pointer argument becomes a uintptr only in the
// call to Syscall itself, as package unsafe requires.
func (h fdHandle) rawIoctl(req uint, arg uintptr) (int, error) {
	r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(h), uintptr(req), arg)
	return result(r, errno)
}

func (h fdHandle) rawIoctlPtr(req uint, arg unsafe.Pointer) error {
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(h), uintptr(req), uintptr(arg))
	return errnoErr(errno)
}
