//go:build !linux

package uevent

import (
	"context"
	"errors"
	"testing"
)

func TestUnsupported(t *testing.T) {
	if _, err := Open(); !errors.Is(err, errors.ErrUnsupported) {
		t.Errorf("Open: %v, want errors.ErrUnsupported", err)
	}
	if err := WaitUdev(context.Background(), nil); !errors.Is(err, errors.ErrUnsupported) {
		t.Errorf("WaitUdev: %v, want errors.ErrUnsupported", err)
	}
	var m Monitor
	if _, err := m.Next(context.Background()); !errors.Is(err, errors.ErrUnsupported) {
		t.Errorf("Next: %v, want errors.ErrUnsupported", err)
	}
}
