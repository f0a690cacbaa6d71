//go:build integration

package uevent

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/loopctl/loopctl"
	"github.com/loopctl/loopctl/internal/kerneltest"
	"golang.org/x/sys/unix"
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
	if left := kerneltest.NewFDs(t, before); len(left) != 0 {
		t.Errorf("%s: descriptors %v left open", name, left)
	}
}

// openMonitor opens a Monitor for the test.
func openMonitor(t *testing.T) *Monitor {
	t.Helper()
	kerneltest.Require(t)
	m, err := Open()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// nextOf returns m's next event of device n, passing over the others',
// and fails the test after 30 s without one.
func nextOf(t *testing.T, m *Monitor, n int) Event {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for {
		e, err := m.Next(ctx)
		if err != nil {
			t.Fatalf("waiting for an event of loop%d: %v", n, err)
		}
		if e.Kind == EventLost {
			t.Fatalf("events lost")
		}
		if e.Number == n {
			return e
		}
	}
}

// readUntil hands m's events to f until f says it has what it waits for,
// and reports false after a minute without.
func readUntil(t *testing.T, m *Monitor, f func(Event) bool) bool {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for {
		e, err := m.Next(ctx)
		if errors.Is(err, context.DeadlineExceeded) {
			return false
		}
		if err != nil {
			t.Fatal(err)
		}
		if f(e) {
			return true
		}
	}
}

// readPastSentinel hands f m's events up to that of a device it adds
// (and removes after): the kernel sends its events in order, so every
// event of a change made before is among them.
func readPastSentinel(t *testing.T, m *Monitor, f func(Event)) {
	t.Helper()
	c := openControl(t)
	n, err := c.Add(loopctl.AnyNumber)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Remove(n)
	added := readUntil(t, m, func(e Event) bool {
		if e.Number == n && e.Kind == EventAdded {
			return true
		}
		f(e)
		return false
	})
	if !added {
		t.Fatalf("no EventAdded of the sentinel loop%d in a minute", n)
	}
}

// drainQueued hands f the events m holds and those the kernel has queued
// for it, waiting for no more: all that it will read, once nothing
// changes. The socket reads ready with a message queued, or an overflow
// (ENOBUFS) to report, which a poll leaves for the read.
func drainQueued(t *testing.T, m *Monitor, f func(Event)) {
	t.Helper()
	rc, err := m.f.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	for {
		m.mu.Lock()
		queued := len(m.pending)
		if queued == 0 {
			ready := false
			if err := rc.Control(func(fd uintptr) {
				pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
				n, perr := unix.Poll(pfd, 0)
				ready = perr == nil && n > 0
			}); err != nil {
				m.mu.Unlock()
				t.Fatal(err)
			}
			if !ready {
				m.mu.Unlock()
				return
			}
			if err := m.receive(context.Background()); err != nil {
				m.mu.Unlock()
				t.Fatal(err)
			}
			queued = len(m.pending)
		}
		m.mu.Unlock()
		for range queued {
			e, err := m.Next(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			f(e)
		}
	}
}

// expect checks that m's next events of device n are want, in order.
func expect(t *testing.T, m *Monitor, n int, what string, want ...Event) {
	t.Helper()
	for _, w := range want {
		e := nextOf(t, m, n)
		e.Seq = 0
		if e != w {
			t.Fatalf("%s: event %+v, want %+v", what, e, w)
		}
	}
}
