//go:build integration && !loopctl_stub

package uevent

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/loopctl/loopctl"
	"github.com/loopctl/loopctl/internal/kerneltest"
)

// openControl opens the control device for the test.
func openControl(t *testing.T) *loopctl.Control {
	t.Helper()
	kerneltest.Require(t)
	c, err := loopctl.Open()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// newDevice adds a loop device of the test's own and opens it. Cleanup
// clears a binding left on it, closes it and removes it.
func newDevice(t *testing.T, c *loopctl.Control) *loopctl.Device {
	t.Helper()
	n, err := c.Add(loopctl.AnyNumber)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		kerneltest.WaitUnbound(t, n)
		if err := c.Remove(n); err != nil {
			t.Errorf("removing the test's device: %v", err)
		}
	})
	d, err := loopctl.OpenDevice(n)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { detach(t, d) })
	return d
}

// detach clears d's binding if it still has one, and closes it.
func detach(t *testing.T, d *loopctl.Device) {
	if err := d.ClearFD(); err != nil && !errors.Is(err, loopctl.ErrNotBound) && !errors.Is(err, fs.ErrClosed) {
		t.Errorf("detaching %s: %v", d.Path(), err)
	}
	d.Close()
}

// attachT attaches path with o for the test; cleanup detaches and closes.
func attachT(t *testing.T, path string, o loopctl.Options) *loopctl.Device {
	t.Helper()
	kerneltest.Require(t)
	d, err := loopctl.Attach(context.Background(), path, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { detach(t, d) })
	return d
}

// addPartition adds partition num of d by hand (kerneltest.AddPartition).
func addPartition(t *testing.T, d *loopctl.Device, num, start, size int) (release func()) {
	t.Helper()
	return kerneltest.AddPartition(t, d.Path(), d.Path(), num, start, size)
}

// losetupChurn attaches and detaches a file of its own with util-linux
// losetup until deadline, as another program on the machine does, and
// returns how many bindings it made and how many losetup failed to make.
// losetup -f loses races of its own (GET_FREE's device bound by another
// before LOOP_CONFIGURE: ENXIO or EBUSY), which are counted, not failed.
func losetupChurn(t *testing.T, dir string, deadline time.Time) (made, refused int) {
	p := filepath.Join(dir, "losetup.img")
	if err := os.WriteFile(p, make([]byte, 256<<10), 0o644); err != nil {
		t.Error(err)
		return
	}
	for time.Now().Before(deadline) {
		out, err := exec.Command("losetup", "-f", "--show", p).CombinedOutput()
		if err != nil {
			refused++
			continue
		}
		made++
		dev := strings.TrimSpace(string(out))
		if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
			t.Errorf("losetup -d %s: %v: %s", dev, err, out)
			return
		}
	}
	return made, refused
}

// countDescriptors fails the test when run leaves the process's
// descriptors other than it found them.
func countDescriptors(t *testing.T, name string, run func() error) {
	t.Helper()
	before := kerneltest.OpenFDs(t)
	if err := run(); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	if after := kerneltest.OpenFDs(t); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Errorf("%s: descriptors %v after, %v before", name, after, before)
	}
}
