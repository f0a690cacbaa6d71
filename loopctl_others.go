//go:build !linux || loopctl_stub

package loopctl

import (
	"errors"
	"os"
)

// Loop devices exist only on Linux. Elsewhere the package builds, and every
// call fails with an error matching errors.ErrUnsupported. The loopctl_stub
// build tag selects this file on Linux too, so that its test runs in CI.

var sys kernel = unsupportedKernel{}

type unsupportedKernel struct{}

func (unsupportedKernel) open(path string, _ int) (handle, error) {
	return nil, &os.PathError{Op: "open", Path: path, Err: errors.ErrUnsupported}
}

func loopNumber(path string) (int, uint64, error) {
	return -1, 0, newError("open", path, errors.ErrUnsupported)
}

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
