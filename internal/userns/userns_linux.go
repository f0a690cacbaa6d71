// Package userns tells whether a namespace belongs to the machine's own
// user namespace: the one check the module makes of user namespaces, for
// the uevent Monitor's choice to poll (kernel uevents reach only network
// namespaces the machine's user namespace owns) and for loopctl's
// explanation of a refused mknod.
package userns

import (
	"os"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/call"
)

// initialIno is the inode number of the machine's own user namespace
// (PROC_USER_INIT_INO).
const initialIno = 0xEFFFFFFD

// Initial tells whether the namespace at path, a /proc/self/ns file, is the
// machine's own user namespace, or, for a namespace of another kind, is
// owned by it (NS_GET_NSTYPE and NS_GET_USERNS, Linux 4.11). An error is
// an *os.PathError: no /proc, or a kernel without those ioctls.
func Initial(path string) (bool, error) {
	p, err := unix.BytePtrFromString(path)
	if err != nil {
		return false, &os.PathError{Op: "open", Path: path, Err: err}
	}
	ns, errno := call.OpenAt(unix.AT_FDCWD, p, unix.O_RDONLY)
	if errno != 0 {
		return false, &os.PathError{Op: "open", Path: path, Err: errno}
	}
	defer unix.Close(ns)
	// The namespace ioctls are not the loop driver's: x/sys's wrapper
	// makes them, as it makes any ioctl whose argument is no pointer.
	kind, err := unix.IoctlRetInt(ns, unix.NS_GET_NSTYPE)
	if err != nil {
		return false, &os.PathError{Op: "NS_GET_NSTYPE", Path: path, Err: err}
	}
	if kind != unix.CLONE_NEWUSER {
		owner, err := unix.IoctlRetInt(ns, unix.NS_GET_USERNS)
		if err != nil {
			return false, &os.PathError{Op: "NS_GET_USERNS", Path: path, Err: err}
		}
		defer unix.Close(owner)
		ns = owner
	}
	var st unix.Stat_t
	if err := call.Retry(func() error { return unix.Fstat(ns, &st) }); err != nil {
		return false, &os.PathError{Op: "fstat", Path: path, Err: err}
	}
	return st.Ino == initialIno, nil
}

// Inside tells whether the process is in a user namespace other than the
// machine's own; false where that cannot be told.
func Inside() bool {
	initial, err := Initial("/proc/self/ns/user")
	return err == nil && !initial
}

// EventsArrive tells whether this process's network namespace is owned by
// the machine's own user namespace, the only one kernel uevents reach.
// Where that cannot be told (no /proc, a kernel before 4.11), it assumes
// they do.
func EventsArrive() bool {
	initial, err := Initial("/proc/self/ns/net")
	return err != nil || initial
}
