package loopctl

import (
	"context"
	"errors"
	"io/fs"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/loopctl/loopctl/internal/kerneltest"
	"golang.org/x/sys/unix"
)

// TestAttachWaitsForControlLock: another process holds /dev/loop-control's
// lock. Attach waits for it, honouring its context, and an Attach given up
// keeps this process's turn until the lock it was waiting for is released.
func TestAttachWaitsForControlLock(t *testing.T) {
	k := useFake(t, 2)
	k.ctlWait = make(chan struct{})
	release := sync.OnceFunc(func() { close(k.ctlWait) })
	t.Cleanup(release) // before useFake's cleanup, which waits for the turn
	k.failAt("ctl-lock", 1, unix.EWOULDBLOCK)
	f := kerneltest.TempFile(t, 1<<20)

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() {
		_, err := k.sys.Attach(ctx, f.Name(), Options{})
		done <- err
	}()
	for len(k.calls("ctl-lock-wait")) == 0 {
		runtime.Gosched()
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("Attach = %v, want context.Canceled", err)
	}

	// The abandoned wait still holds the turn: the next Attach waits for
	// it, and goes ahead once the other process has let go of the lock and
	// the abandoned wait has released it.
	go func() {
		d, err := k.sys.Attach(context.Background(), f.Name(), Options{Flags: FlagAutoClear})
		if err == nil {
			d.Close()
		}
		done <- err
	}()
	waitBlocked(t, "loopctl.(*system).lockAttach")
	release()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	log := k.calls("ctl-")
	want := []string{"ctl-lock", "ctl-lock-wait", "ctl-unlock", "ctl-lock", "ctl-unlock"}
	if got := stepNames(log); !slices.Equal(got, want) {
		t.Fatalf("control lock steps %q, want %q", got, want)
	}
	k.sys.lockWaiters.Wait()
	checkNothingLeft(t, k)
}

// TestAttachTurnHonoursContext: an Attach waiting for this process's turn
// gives up with its context.
func TestAttachTurnHonoursContext(t *testing.T) {
	k := useFake(t, 2)
	k.sys.turn <- struct{}{} // another attacher's turn
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() {
		_, err := k.sys.Attach(ctx, kerneltest.TempFile(t, 4096).Name(), Options{})
		done <- err
	}()
	waitBlocked(t, "loopctl.(*system).lockAttach")
	cancel()
	err := <-done
	<-k.sys.turn
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Attach = %v, want context.Canceled", err)
	}
	if log := k.calls(""); len(log) > 1 || len(log) == 1 && log[0] != "open "+ControlPath {
		t.Fatalf("calls while waiting for the turn: %q", log)
	}
}

// waitBlocked waits until a goroutine is blocked on a channel in fn.
func waitBlocked(t *testing.T, fn string) {
	t.Helper()
	buf := make([]byte, 1<<20)
	for end := time.Now().Add(10 * time.Second); time.Now().Before(end); runtime.Gosched() {
		for _, g := range strings.Split(string(buf[:runtime.Stack(buf, true)]), "\n\n") {
			if (strings.Contains(g, "[chan send") || strings.Contains(g, "[select")) && strings.Contains(g, fn+"(") {
				return
			}
		}
	}
	t.Fatalf("no goroutine blocked in %s", fn)
}

// TestAttachWaitsInline: with a context that cannot end, Attach waits for
// the control lock in the calling goroutine.
func TestAttachWaitsInline(t *testing.T) {
	t.Parallel()
	k := useFake(t, 2)
	k.ctlWait = make(chan struct{})
	k.failAt("ctl-lock", 1, unix.EWOULDBLOCK)
	f := kerneltest.TempFile(t, 1<<20)
	done := make(chan *Device)
	go func() {
		d, err := k.sys.Attach(context.Background(), f.Name(), Options{})
		if err != nil {
			t.Error(err)
		}
		done <- d
	}()
	for len(k.calls("ctl-lock-wait")) == 0 {
		runtime.Gosched()
	}
	close(k.ctlWait)
	if d := <-done; d != nil {
		checkAttached(t, k, d, f.Name())
	}
}

// TestAttachLock: the lock Attach takes for the setup becomes the one
// asked for, and Device.Lock changes it; a lock another process holds is
// an error matching ErrBusy, after which the Device holds what it held.
func TestAttachLock(t *testing.T) {
	t.Parallel()
	k := useFake(t, 4)
	f := kerneltest.TempFile(t, 1<<20)
	for _, tt := range []struct {
		m    LockMode
		last string // the last lock step of Attach
	}{{LockNone, "flock-un"}, {LockShared, "flock-sh"}, {LockExclusive, "flock-ex"}} {
		d := attachFake(t, k, f.Name(), Options{Lock: tt.m})
		steps := k.calls("flock")
		if got := steps[len(steps)-1]; got != tt.last+" "+d.Path() {
			t.Errorf("Attach with %v: lock steps end with %q, want %s", tt.m, got, tt.last)
		}
		if err := d.Lock(LockNone); err != nil {
			t.Fatal(err)
		}
		if got := k.calls("flock"); got[len(got)-1] != "flock-un "+d.Path() {
			t.Errorf("Lock(LockNone) after %v: %q", tt.m, got[len(got)-1])
		}
	}
	d := attachFake(t, k, f.Name(), Options{Lock: LockShared})
	k.failAt("flock-ex "+d.Path(), k.counts["flock-ex "+d.Path()]+1, unix.EWOULDBLOCK)
	before := len(k.calls("flock"))
	if err := d.Lock(LockExclusive); !errors.Is(err, ErrBusy) || !errors.Is(err, unix.EWOULDBLOCK) {
		t.Fatalf("Lock(LockExclusive) against another holder = %v, want ErrBusy", err)
	}
	// The kernel let go of the shared lock to change it: taken back.
	if got := k.calls("flock")[before:]; !slices.Equal(got, []string{"flock-ex " + d.Path(), "flock-sh " + d.Path()}) {
		t.Fatalf("lock steps %q, want the exclusive lock tried and the shared one taken back", got)
	}
	if err := d.Lock(LockMode(7)); !errors.Is(err, fs.ErrInvalid) {
		t.Fatalf("Lock(7) = %v, want fs.ErrInvalid", err)
	}
	if _, err := k.sys.Attach(context.Background(), f.Name(), Options{Lock: -1}); !errors.Is(err, fs.ErrInvalid) {
		t.Fatalf("Attach with lock mode -1 = %v, want fs.ErrInvalid", err)
	}
}
