//go:build integration

package loopctl

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/loopctl/loopctl/internal/kerneltest"
	"golang.org/x/sys/unix"
)

// TestKernelLock: each LockMode, checked with flock from another
// descriptor of the device, as udev takes its locks: a shared lock without
// waiting before a probe, an exclusive one before re-reading a partition
// table. Device.Lock changes the lock, and does not wait for one that
// another holds.
func TestKernelLock(t *testing.T) {
	kerneltest.Require(t)
	f := kerneltest.TempFile(t, 1<<20)
	probe := func(d *Device) (shared, exclusive bool) {
		t.Helper()
		fd, err := unix.Open(d.Path(), unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Close(fd)
		for _, l := range []struct {
			how int
			ok  *bool
		}{{unix.LOCK_SH | unix.LOCK_NB, &shared}, {unix.LOCK_EX | unix.LOCK_NB, &exclusive}} {
			err := unix.Flock(fd, l.how)
			*l.ok = err == nil
			if err != nil && err != unix.EWOULDBLOCK {
				t.Fatal(err)
			}
			unix.Flock(fd, unix.LOCK_UN)
		}
		return shared, exclusive
	}
	// udev, where it runs, probes the device after each change under a
	// shared lock of its own, which conflicts with an exclusive one for a
	// few milliseconds: while the device is not held exclusively (when
	// udev waits), the test lets udev finish first (udevadm settle).
	idle := func(held LockMode) {
		if held != LockExclusive {
			kerneltest.SettleUdev(t)
		}
	}
	want := map[LockMode][2]bool{LockNone: {true, true}, LockShared: {true, false}, LockExclusive: {false, false}}
	for _, m := range []LockMode{LockNone, LockShared, LockExclusive} {
		d := attachT(t, f.Name(), Options{Lock: m, Flags: FlagReadOnly})
		idle(m)
		if sh, ex := probe(d); [2]bool{sh, ex} != want[m] {
			t.Errorf("Attach with %v: another descriptor's LOCK_SH %v, LOCK_EX %v; want %v", m, sh, ex, want[m])
		}
		held := m
		for _, to := range []LockMode{LockShared, LockExclusive, LockNone, LockExclusive} {
			idle(held)
			if err := d.Lock(to); err != nil {
				t.Fatalf("Lock(%v) after %v: %v", to, m, err)
			}
			held = to
			idle(held)
			if sh, ex := probe(d); [2]bool{sh, ex} != want[to] {
				t.Errorf("Lock(%v): another descriptor's LOCK_SH %v, LOCK_EX %v; want %v", to, sh, ex, want[to])
			}
		}
		d.Lock(LockNone)
		detach(t, d)
	}
	// Another holder's shared lock (udev probing the device): Lock does
	// not wait, and the Device keeps the lock it held.
	d := attachT(t, f.Name(), Options{Lock: LockShared})
	fd, err := unix.Open(d.Path(), unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Flock(fd, unix.LOCK_SH|unix.LOCK_NB); err != nil {
		t.Fatal(err)
	}
	if err := d.Lock(LockExclusive); !errors.Is(err, ErrBusy) || !errors.Is(err, unix.EWOULDBLOCK) {
		t.Fatalf("Lock(LockExclusive) beside another's shared lock = %v, want ErrBusy", err)
	}
	unix.Flock(fd, unix.LOCK_UN)
	if sh, ex := probe(d); sh != true || ex != false {
		t.Fatalf("after a refused Lock(LockExclusive): LOCK_SH %v, LOCK_EX %v; want the Device's shared lock kept", sh, ex)
	}
}

// TestKernelLockHoldsUdevOff: with udev running, LockExclusive holds off its
// probe of a newly bound file system (no by-label link, udev's queue not
// empty) until Lock(LockNone); then udev processes the device.
func TestKernelLockHoldsUdevOff(t *testing.T) {
	kerneltest.Require(t)
	if !kerneltest.UdevRunning() {
		t.Skip("udev is not running")
	}
	// Whatever ran before: udev idle, so that its later settle is this
	// test's device's.
	kerneltest.SettleUdev(t)
	f := kerneltest.TempFile(t, 16<<20)
	label := fmt.Sprintf("lck%d", time.Now().UnixNano()%1e9)
	kerneltest.MkfsExt4(t, f.Name(), "-L", label)
	link := "/dev/disk/by-label/" + label
	d := attachT(t, f.Name(), Options{Lock: LockExclusive, Flags: FlagReadOnly})
	// udev tries a locked device again about once a second for minutes:
	// three seconds of an unsettled queue and no link show it held off.
	out, err := exec.Command("udevadm", "settle", "--timeout=3").CombinedOutput()
	if err == nil {
		t.Fatalf("udevadm settle returned while the device was locked:\n%s", out)
	}
	if _, err := os.Lstat(link); err == nil {
		t.Fatalf("%s exists while the device is locked", link)
	}
	if err := d.Lock(LockNone); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("udevadm", "settle", "--timeout=60").CombinedOutput(); err != nil {
		t.Fatalf("udevadm settle after the lock was let go: %v\n%s", err, out)
	}
	if target, err := filepath.EvalSymlinks(link); err != nil || target != d.Path() {
		t.Fatalf("%s -> %q, %v; want %s once the lock is let go", link, target, err, d.Path())
	}
}
