//go:build !linux || loopctl_stub

package loopctl

import (
	"context"
	"errors"
	"os"
)

// Loop devices exist only on Linux. Elsewhere the package builds, and every
// call fails with an error matching errors.ErrUnsupported. The loopctl_stub
// build tag selects this file on Linux too, so that its test runs in CI.

// kernel opens handles; here it never can.
type kernel interface {
	open(path string, mode int) (handle, error)
}

// A system is what the package works against; here, a kernel that opens
// nothing.
type system struct{ k kernel }

// host is this machine.
var host = &system{k: unsupportedKernel{}}

type unsupportedKernel struct{}

func (unsupportedKernel) open(path string, _ int) (handle, error) {
	return nil, &os.PathError{Op: "open", Path: path, Err: errors.ErrUnsupported}
}

func (s *system) loopNumber(path string) (int, uint64, error) {
	return -1, 0, newError("open", path, errors.ErrUnsupported)
}

// addAny is never reached here: no control device can be opened.
func (c *Control) addAny() (int, error) {
	return -1, newError("add", ControlPath, errors.ErrUnsupported)
}

// remove is Remove of a valid number; here no Control can be open.
func (c *Control) remove(n int) error {
	_, err := c.ioctl("remove", DevicePath(n), reqCtlRemove, uintptr(n))
	return err
}

// checkBackingFile is never reached here: no Device can be opened.
func checkBackingFile(fd uintptr, name string, o Options) error { return nil }

// setUp binds at once here: no device keeps partitions.
func (d *Device) setUp(_ handle, bind func() error) error { return bind() }

// openGranted has no udev to wait for here.
func (s *system) openGranted(_ context.Context, n, mode int) (*Device, error) {
	return s.openDeviceMode(n, mode)
}

// explainRefused has nothing to add here.
func explainRefused(_ string, err error, _ string) error { return err }

// holdersOf knows of no holder here.
func (s *system) holdersOf(n, m int) []string { return nil }

// missingNode has nothing to add to an open's error here.
func (s *system) missingNode(n int, err error) error { return err }

// ioctl is never reached here: no handle can be opened.
func ioctl(h handle, req uint, arg uintptr) (int, error) { return h.rawIoctl(req, arg) }

// unsupported returns the error of a Device method on this platform: no
// Device can be opened here, so a Device is a zero or closed one.
func (d *Device) unsupported(op string) error {
	if _, err := d.handle(op); err != nil {
		return err
	}
	return newError(op, d.path, errors.ErrUnsupported)
}

// Status is not supported on this platform.
func (d *Device) Status() (Status, error) { return Status{}, d.unsupported("status") }

// Configure is not supported on this platform.
func (d *Device) Configure(f *os.File, o Options) error { return d.unsupported("configure") }

// Attach is not supported on this platform.
func Attach(ctx context.Context, path string, o Options) (*Device, error) {
	return nil, newError("attach", path, errors.ErrUnsupported)
}

// AttachFile is not supported on this platform.
func AttachFile(ctx context.Context, f *os.File, o Options) (*Device, error) {
	name := ""
	if f != nil {
		name = f.Name()
	}
	return nil, newError("attach", name, errors.ErrUnsupported)
}

// List is not supported on this platform.
func List() ([]Status, error) { return nil, newError("list", "/sys/block", errors.ErrUnsupported) }

// FindByBackingFile is not supported on this platform.
func FindByBackingFile(path string) ([]Status, error) {
	return nil, newError("find", path, errors.ErrUnsupported)
}

// SetStatus is not supported on this platform.
func (d *Device) SetStatus(s Status) error { return d.unsupported("set status") }

// SetBlockSize is not supported on this platform.
func (d *Device) SetBlockSize(size uint32) error { return d.unsupported("set block size") }

// Partitions is not supported on this platform.
func (d *Device) Partitions() ([]Partition, error) { return nil, d.unsupported("partitions") }

// Rescan is not supported on this platform.
func (d *Device) Rescan() error { return d.unsupported("rescan") }

// MakeNode is not supported on this platform.
func MakeNode(n int) error { return newError("make node", DevicePath(n), errors.ErrUnsupported) }

// MakeNode is not supported on this platform.
func (p Partition) MakeNode() error { return newError("make node", p.Path, errors.ErrUnsupported) }

// ChangeFD is not supported on this platform.
func (d *Device) ChangeFD(f *os.File) error { return d.unsupported("change fd") }

// OpenBinding is not supported on this platform.
func OpenBinding(s Status) (*Device, error) {
	return nil, newError("open binding", DevicePath(s.Number), errors.ErrUnsupported)
}

// FindByRef is not supported on this platform.
func FindByRef(ref string) ([]Status, error) {
	return nil, newError("find", "", errors.ErrUnsupported)
}

// Sweep is not supported on this platform.
func Sweep(ctx context.Context, ref string) ([]Status, error) {
	return nil, newError("sweep", "", errors.ErrUnsupported)
}

// Detach is not supported on this platform.
func (d *Device) Detach(ctx context.Context) error { return d.unsupported("detach") }

// Lock is not supported on this platform: no device is locked here.
func (d *Device) Lock(m LockMode) error {
	d.lock = lockState{}
	return d.unsupported("lock")
}

// A lockState holds nothing on this platform, where no device is locked.
type lockState struct{}

// DiskSeq is not supported on this platform: no Device binds here, so
// the number it would remember is 0.
func (d *Device) DiskSeq() (uint64, error) { return d.seq.Load(), d.unsupported("disk seq") }

// explainLimits returns err: no call here opens anything.
func explainLimits(err error) error { return err }
