package loopctl

import (
	"errors"
	"os"
	"syscall"
)

// maxAddTries bounds addAny: each EEXIST means another process took the
// number between the sysfs read and LOOP_CTL_ADD.
const maxAddTries = 64

// addAny is Add(AnyNumber): LOOP_CTL_ADD -1, where the kernel picks an
// unused number (featAddAny); on a kernel that answers EEXIST while a
// device is unbound, the lowest number that sysfs does not list.
func (c *Control) addAny() (int, error) {
	if c.sys.has(featAddAny) {
		r, err := c.ioctl("add", ControlPath, reqCtlAdd, ^uintptr(0))
		if !errors.Is(err, syscall.EEXIST) {
			return r, err
		}
		c.sys.lacks(featAddAny)
	}
	var err error
	for range maxAddTries {
		var nums []int
		if nums, err = c.sys.loopNumbers(); err != nil {
			return -1, newError("add", c.sys.sysfs+"/block", err)
		}
		n := 0
		for _, m := range nums { // in order
			if m == n {
				n++
			}
		}
		if n > MaxNumber {
			return -1, newError("add", ControlPath, inStep("every device number is taken", syscall.ENOSPC))
		}
		var r int
		if r, err = c.ioctl("add", DevicePath(n), reqCtlAdd, uintptr(n)); !errors.Is(err, syscall.EEXIST) {
			return r, err
		}
	}
	return -1, err
}

// remove is Remove of a valid number: LOOP_CTL_REMOVE, tried again while
// the kernel refuses it for a device that is open but not bound.
func (c *Control) remove(n int) error {
	path := DevicePath(n)
	bound := false
	err := c.sys.retryWhile(func() error {
		_, err := c.ioctl("remove", path, reqCtlRemove, uintptr(n))
		return err
	}, func(err error) bool {
		if !errors.Is(err, syscall.EBUSY) {
			return false
		}
		_, serr := os.Lstat(c.sys.sysfsLoopAttr(n, ""))
		bound = serr == nil
		return !bound
	})
	if e, ok := err.(*Error); ok && e.Err == syscall.EBUSY {
		e.Err = errOpen
		if bound {
			e.Err = errBound
		}
	}
	return err
}

// Why LOOP_CTL_REMOVE answers EBUSY.
var (
	errBound error = explain("the device is bound: detach it, and let its last opener close it, first", syscall.EBUSY, ErrBusy)
	errOpen  error = explain("the device is open: udev probing it, or another process", syscall.EBUSY, ErrBusy)
)
