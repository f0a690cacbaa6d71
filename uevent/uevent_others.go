//go:build !linux

package uevent

import (
	"context"
	"errors"

	"github.com/loopctl/loopctl"
)

// Loop devices exist only on Linux: elsewhere no Monitor opens, and
// WaitUdev has nothing to wait for.

type monitorState struct{}

func openHost() (*Monitor, error) { return nil, newError("monitor", "", errors.ErrUnsupported) }

func (m *Monitor) next(context.Context) (Event, error) {
	_ = m.monitorState // none here: it holds what Linux keeps
	return Event{}, newError("monitor", "", errors.ErrUnsupported)
}

func waitUdev(_ context.Context, d *loopctl.Device) error {
	path := ""
	if d != nil {
		path = d.Path()
	}
	return newError("wait udev", path, errors.ErrUnsupported)
}
