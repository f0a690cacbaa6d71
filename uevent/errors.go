package uevent

import (
	"github.com/loopctl/loopctl"
)

// newError returns nil for a nil err, and otherwise a *loopctl.Error for
// op on path: the package follows loopctl's error convention, so that an
// errno maps onto the same sentinels whichever package returned it. Path
// is empty for the uevent socket, which has none.
func newError(op, path string, err error) error {
	if err == nil {
		return nil
	}
	return &loopctl.Error{Op: op, Path: path, Err: err}
}
