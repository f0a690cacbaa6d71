//go:build !linux || loopctl_stub

package uevent

import (
	"context"
	"errors"
	"time"

	"github.com/loopctl/loopctl"
)

// A Monitor reports changes of loop devices; on this platform none can
// be opened.
type Monitor struct{}

// Open is not supported on this platform.
func Open() (*Monitor, error) { return nil, newError("monitor", "", errors.ErrUnsupported) }

// Next is not supported on this platform.
func (m *Monitor) Next(ctx context.Context) (Event, error) {
	return Event{}, newError("monitor", "", errors.ErrUnsupported)
}

// Close does nothing on this platform.
func (m *Monitor) Close() error { return nil }

// Polling is false on this platform.
func (m *Monitor) Polling() bool { return false }

// SetPollInterval does nothing on this platform.
func (m *Monitor) SetPollInterval(d time.Duration) {}

// WaitUdev is not supported on this platform.
func WaitUdev(ctx context.Context, d *loopctl.Device) error {
	path := ""
	if d != nil {
		path = d.Path()
	}
	return newError("wait udev", path, errors.ErrUnsupported)
}
