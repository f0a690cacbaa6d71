//go:build !linux

package loopctl

import (
	"context"
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
	if _, err := Attach(context.Background(), "/tmp/img", Options{}); !errors.Is(err, errors.ErrUnsupported) {
		t.Errorf("Attach: %v, want errors.ErrUnsupported", err)
	}
	if _, err := AttachFile(context.Background(), nil, Options{}); !errors.Is(err, errors.ErrUnsupported) {
		t.Errorf("AttachFile: %v, want errors.ErrUnsupported", err)
	}
	if _, err := List(); !errors.Is(err, errors.ErrUnsupported) {
		t.Errorf("List: %v, want errors.ErrUnsupported", err)
	}
	if _, err := FindByBackingFile("/tmp/img"); !errors.Is(err, errors.ErrUnsupported) {
		t.Errorf("FindByBackingFile: %v, want errors.ErrUnsupported", err)
	}
	if _, err := FindByRef("ref"); !errors.Is(err, errors.ErrUnsupported) {
		t.Errorf("FindByRef: %v, want errors.ErrUnsupported", err)
	}
	if _, err := OpenBinding(Status{}); !errors.Is(err, errors.ErrUnsupported) {
		t.Errorf("OpenBinding: %v, want errors.ErrUnsupported", err)
	}
	if _, err := Sweep(context.Background(), "ref"); !errors.Is(err, errors.ErrUnsupported) {
		t.Errorf("Sweep: %v, want errors.ErrUnsupported", err)
	}
	if err := MakeNode(0); !errors.Is(err, errors.ErrUnsupported) {
		t.Errorf("MakeNode: %v, want errors.ErrUnsupported", err)
	}
	if err := (Partition{Number: 1, Path: "/dev/loop0p1"}).MakeNode(); !errors.Is(err, errors.ErrUnsupported) {
		t.Errorf("Partition.MakeNode: %v, want errors.ErrUnsupported", err)
	}
	// No Device can exist here; a zero one is closed.
	var d Device
	for name, err := range map[string]error{"SetStatus": d.SetStatus(Status{}), "SetBlockSize": d.SetBlockSize(512),
		"ChangeFD": d.ChangeFD(nil), "SetCapacity": d.SetCapacity(), "SetDirectIO": d.SetDirectIO(true),
		"Rescan": d.Rescan(), "Partitions": func() error { _, err := d.Partitions(); return err }(),
		"Detach": d.Detach(context.Background()), "DiskSeq": func() error { _, err := d.DiskSeq(); return err }(),
		"Lock": d.Lock(LockShared)} {
		if err == nil {
			t.Errorf("%s on a zero Device succeeded", name)
		}
	}
}
