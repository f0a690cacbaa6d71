//go:build !loopctl_stub

package loopctl

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// checkAttached asserts that d is bound to f and is the only device handle
// open, then closes it and checks that nothing is left open.
func checkAttached(t *testing.T, k *fakeKernel, d *Device, f string) {
	t.Helper()
	s, err := d.Status()
	if err != nil {
		t.Fatal(err)
	}
	if s.BackingFile != f {
		t.Fatalf("bound to %q, want %q", s.BackingFile, f)
	}
	if n := k.deviceHandles(); n != 1 {
		t.Fatalf("%d device handles open, want the returned one", n)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if n := k.deviceHandles(); n != 0 {
		t.Fatalf("%d device handles open after Close", n)
	}
}

// checkNothingLeft asserts a failed Attach left no binding and no handle.
func checkNothingLeft(t *testing.T, k *fakeKernel) {
	t.Helper()
	if b := k.bound(); len(b) != 0 {
		t.Fatalf("devices left bound: %v", b)
	}
	if n := k.deviceHandles(); n != 0 {
		t.Fatalf("%d device handles left open", n)
	}
}

func TestAttachSteps(t *testing.T) {
	k := useFake(t, 2)
	f := tempFile(t, 1<<20)
	d, err := Attach(context.Background(), f.Name(), Options{Flags: FlagAutoClear})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"open " + ControlPath, "LOOP_CTL_GET_FREE " + ControlPath, "open /dev/loop0",
		"flock-ex /dev/loop0", "LOOP_CONFIGURE /dev/loop0", "flock-un /dev/loop0"}
	if got := k.calls(""); !slices.Equal(got, want) {
		t.Fatalf("calls:\n%q\nwant:\n%q", got, want)
	}
	if s, _ := d.Status(); s.Flags != FlagAutoClear {
		t.Fatalf("flags %v", s.Flags)
	}
	checkAttached(t, k, d, f.Name())
	// AutoClear: the last close detached it.
	checkNothingLeft(t, k)

	// The control device stays open for the next Attach.
	before := len(k.calls("open " + ControlPath))
	d, err = AttachFile(context.Background(), f, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if n := len(k.calls("open " + ControlPath)); n != before {
		t.Fatal("the control device was opened again")
	}
	checkAttached(t, k, d, f.Name())
}

func TestAttachLostRace(t *testing.T) {
	k := useFake(t, 3)
	// Someone else wins loop0 between GET_FREE and LOOP_CONFIGURE, twice;
	// GET_FREE keeps naming it, so Attach turns to sysfs for another.
	k.failAt("LOOP_CONFIGURE", 1, unix.EBUSY)
	k.failAt("flock-ex", 2, unix.EWOULDBLOCK)
	f := tempFile(t, 1<<20)
	d, err := Attach(context.Background(), f.Name(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	if d.Number() != 2 {
		t.Fatalf("attached loop%d, want loop2 (loop0 lost, loop1 locked)", d.Number())
	}
	if got := k.calls("LOOP_CLR_FD"); len(got) != 0 {
		t.Fatalf("cleared a binding it did not make: %q", got)
	}
	checkAttached(t, k, d, f.Name())
}

// TestAttachFaults fails each step of Attach, and of its fallback path, with
// each errno in turn, and checks the retry or the full rollback.
func TestAttachFaults(t *testing.T) {
	type outcome int
	const (
		fails   outcome = iota // error matching the errno, nothing left behind
		retried                // the step is tried again and Attach succeeds
	)
	steps := []struct {
		step     string
		nth      int  // which call of the step to fail
		fallback bool // on a kernel without LOOP_CONFIGURE
		busy     outcome
		again    outcome
	}{
		{"LOOP_CTL_GET_FREE", 1, false, fails, fails},
		{"open", 2, false, retried, fails},       // the device; open 1 is the control device
		{"flock-ex", 1, false, retried, retried}, // EAGAIN is EWOULDBLOCK: held elsewhere
		{"LOOP_CONFIGURE", 1, false, retried, fails},
		{"flock-un", 1, false, fails, fails},
		{"LOOP_SET_FD", 1, true, retried, fails},
		{"LOOP_SET_STATUS64", 1, true, fails, retried},
		{"LOOP_SET_BLOCK_SIZE", 1, true, fails, retried},
		{"LOOP_SET_DIRECT_IO", 1, true, fails, fails},
	}
	errnos := []unix.Errno{unix.EBUSY, unix.EAGAIN, unix.EINTR, unix.ENXIO, unix.EPERM}
	for _, s := range steps {
		for _, errno := range errnos {
			want := fails
			switch errno {
			case unix.EBUSY:
				want = s.busy
			case unix.EAGAIN:
				want = s.again
			case unix.EINTR:
				// Retried by the ioctl helper; open and flock are not
				// ioctls, and take EINTR as any error.
				if s.step != "open" && s.step != "flock-ex" && s.step != "flock-un" {
					want = retried
				}
			}
			name := s.step + "/" + unix.ErrnoName(errno)
			t.Run(name, func(t *testing.T) {
				k := useFake(t, 4)
				if s.fallback {
					noConfigure.Store(true)
				}
				k.failAt(s.step, s.nth, errno)
				f := tempFile(t, 1<<20)
				d, err := Attach(context.Background(), f.Name(), Options{BlockSize: 4096, Flags: FlagDirectIO})
				switch want {
				case retried:
					if err != nil {
						t.Fatalf("Attach = %v, want success after a retry", err)
					}
					if n := k.counts[s.step]; n < 2 {
						t.Fatalf("%s called %d times, want a retry", s.step, n)
					}
					checkAttached(t, k, d, f.Name())
				case fails:
					if err == nil {
						d.Close()
						t.Fatal("Attach succeeded")
					}
					var e *Error
					if !errors.Is(err, errno) || !errors.As(err, &e) || e.Op != "attach" || e.Path != f.Name() {
						t.Fatalf("Attach = %v, want an attach *Error for %s matching %s", err, f.Name(), unix.ErrnoName(errno))
					}
					checkNothingLeft(t, k)
				}
			})
		}
	}
}

func TestAttachRefusesBeforeTouchingDevices(t *testing.T) {
	k := useFake(t, 2)
	dir := t.TempDir()
	f := tempFile(t, 1<<20)
	closed := tempFile(t, 1<<20)
	closed.Close()
	dirFile, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer dirFile.Close()
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	bg := context.Background()

	tests := []struct {
		name   string
		attach func() (*Device, error)
		is     error
	}{
		{"cancelled", func() (*Device, error) { return Attach(cancelled, f.Name(), Options{}) }, context.Canceled},
		{"cancelled file", func() (*Device, error) { return AttachFile(cancelled, f, Options{}) }, context.Canceled},
		{"missing", func() (*Device, error) { return Attach(bg, filepath.Join(dir, "missing"), Options{}) }, fs.ErrNotExist},
		{"directory", func() (*Device, error) { return Attach(bg, dir, Options{}) }, unix.EISDIR},
		{"directory read-only", func() (*Device, error) { return Attach(bg, dir, Options{Flags: FlagReadOnly}) }, fs.ErrInvalid},
		{"directory file", func() (*Device, error) { return AttachFile(bg, dirFile, Options{}) }, fs.ErrInvalid},
		{"nil file", func() (*Device, error) { return AttachFile(bg, nil, Options{}) }, fs.ErrInvalid},
		{"closed file", func() (*Device, error) { return AttachFile(bg, closed, Options{}) }, fs.ErrInvalid},
		{"bad flags", func() (*Device, error) { return Attach(bg, f.Name(), Options{Flags: 0x40}) }, fs.ErrInvalid},
		{"bad block size", func() (*Device, error) { return AttachFile(bg, f, Options{BlockSize: 1000}) }, fs.ErrInvalid},
		// Not writable, even by root: never a silent switch to read-only.
		{"not writable", func() (*Device, error) { return Attach(bg, "/sys/kernel/uevent_seqnum", Options{}) }, fs.ErrPermission},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := len(k.calls(""))
			d, err := tt.attach()
			if err == nil {
				d.Close()
				t.Fatal("Attach succeeded")
			}
			if !errors.Is(err, tt.is) {
				t.Fatalf("Attach = %v, want %v", err, tt.is)
			}
			if log := k.calls("")[before:]; len(log) != 0 {
				t.Fatalf("devices touched: %q", log)
			}
		})
	}
}

func TestAttachCancelledWhileBusy(t *testing.T) {
	k := useFake(t, 1)
	for i := 1; i <= maxAttempts; i++ {
		k.failAt("LOOP_CONFIGURE", i, unix.EBUSY)
	}
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		// Cancel once Attach is retrying.
		for len(k.calls("LOOP_CONFIGURE")) < 3 {
			runtime.Gosched()
		}
		cancel()
	}()
	_, err := Attach(ctx, tempFile(t, 4096).Name(), Options{})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Attach = %v, want context.Canceled", err)
	}
	checkNothingLeft(t, k)
}

func TestAttachGivesUp(t *testing.T) {
	k := useFake(t, 1)
	for i := 1; i <= maxAttempts; i++ {
		k.failAt("LOOP_CONFIGURE", i, unix.EBUSY)
	}
	_, err := Attach(context.Background(), tempFile(t, 4096).Name(), Options{})
	if !errors.Is(err, ErrBusy) {
		t.Fatalf("Attach = %v, want ErrBusy", err)
	}
	if n := k.counts["LOOP_CONFIGURE"]; n != maxAttempts {
		t.Fatalf("%d attempts, want %d", n, maxAttempts)
	}
	checkNothingLeft(t, k)
}

func TestAttachWithoutControl(t *testing.T) {
	k := useFake(t, 3)
	k.noControl = true
	f := tempFile(t, 1<<20)
	var devs []*Device
	for want := range 3 {
		d, err := Attach(context.Background(), f.Name(), Options{})
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		if d.Number() != want {
			t.Fatalf("attached loop%d, want the lowest unbound, loop%d", d.Number(), want)
		}
		devs = append(devs, d)
	}
	if got := k.calls("LOOP_CTL_"); len(got) != 0 {
		t.Fatalf("control calls without a control device: %q", got)
	}
	_, err := Attach(context.Background(), f.Name(), Options{})
	if !errors.Is(err, ErrBusy) {
		t.Fatalf("Attach with every device bound = %v, want ErrBusy", err)
	}
	for _, d := range devs {
		d.ClearFD()
	}
}

func TestAttachMissingNode(t *testing.T) {
	for _, noControl := range []bool{false, true} {
		k := useFake(t, 2)
		k.noControl = noControl
		k.noNode[0] = true
		_, err := Attach(context.Background(), tempFile(t, 4096).Name(), Options{})
		var pe *os.PathError
		if !errors.Is(err, fs.ErrNotExist) || !errors.As(err, &pe) || pe.Path != "/dev/loop0" {
			t.Fatalf("noControl=%v: Attach = %v, want the missing /dev/loop0", noControl, err)
		}
		checkNothingLeft(t, k)
	}
}

func TestAttachConcurrentFake(t *testing.T) {
	k := useFake(t, 2)
	const n = 32
	var wg sync.WaitGroup
	devs := make([]*Device, n)
	files := make([]*os.File, n)
	for i := range n {
		files[i] = tempFile(t, 4096)
	}
	for i := range n {
		wg.Go(func() {
			d, err := Attach(context.Background(), files[i].Name(), Options{})
			if err != nil {
				t.Error(err)
				return
			}
			devs[i] = d
		})
	}
	wg.Wait()
	seen := map[int]bool{}
	for i, d := range devs {
		if d == nil {
			continue
		}
		s, err := d.Status()
		if err != nil || s.BackingFile != files[i].Name() || seen[d.Number()] {
			t.Errorf("device %d: %+v, %v", d.Number(), s, err)
		}
		seen[d.Number()] = true
		d.ClearFD()
		d.Close()
	}
	checkNothingLeft(t, k)
}
