//go:build !linux || loopctl_stub

package loopctl

import (
	"errors"
	"testing"
)

func TestUnsupported(t *testing.T) {
	if _, err := Open(); !errors.Is(err, errors.ErrUnsupported) {
		t.Errorf("Open: %v, want errors.ErrUnsupported", err)
	}
	if _, err := OpenDevice(0); !errors.Is(err, errors.ErrUnsupported) {
		t.Errorf("OpenDevice: %v, want errors.ErrUnsupported", err)
	}
	if _, err := OpenDevicePath("/dev/loop0"); !errors.Is(err, errors.ErrUnsupported) {
		t.Errorf("OpenDevicePath: %v, want errors.ErrUnsupported", err)
	}
}
