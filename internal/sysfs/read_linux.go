package sysfs

import (
	"os"

	"golang.org/x/sys/unix"
)

// BufSize is large enough for any sysfs attribute: the kernel formats each
// into one page.
const BufSize = 4096

// ReadFile reads the attribute at path into buf with open, read and close,
// and no other syscall: sysfs hands over an attribute whole in one read. It returns the bytes read; an error is an
// *os.PathError, matching fs.ErrNotExist when the attribute is gone (as
// loop/ is once a device is unbound).
func ReadFile(path string, buf []byte) ([]byte, error) {
	fd, err := retry(func() (int, error) { return unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0) })
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	defer unix.Close(fd)
	n, err := retry(func() (int, error) { return unix.Read(fd, buf) })
	if err != nil {
		return nil, &os.PathError{Op: "read", Path: path, Err: err}
	}
	return buf[:n], nil
}

func retry(fn func() (int, error)) (int, error) {
	for {
		n, err := fn()
		if err != unix.EINTR {
			return n, err
		}
	}
}
