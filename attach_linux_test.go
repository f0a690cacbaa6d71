package loopctl

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/kerneltest"
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
	t.Parallel()
	k := useFake(t, 2)
	f := kerneltest.TempFile(t, 1<<20)
	d, err := k.sys.Attach(context.Background(), f.Name(), Options{Flags: FlagAutoClear})
	if err != nil {
		t.Fatal(err)
	}
	// systemd's lock protocol: the control device's lock across
	// GET_FREE, open and bind, the device's inside it; the binding's
	// disk sequence number read under both.
	want := []string{"open " + ControlPath, "ctl-lock " + ControlPath, "LOOP_CTL_GET_FREE " + ControlPath,
		"open /dev/loop0", "flock-ex /dev/loop0", "LOOP_CONFIGURE /dev/loop0", "BLKGETDISKSEQ /dev/loop0",
		"flock-un /dev/loop0", "ctl-unlock " + ControlPath}
	if got := k.calls(""); !slices.Equal(got, want) {
		t.Fatalf("calls:\n%q\nwant:\n%q", got, want)
	}
	if seq, err := d.DiskSeq(); err != nil || seq != k.devs[0].diskSeq || seq == 0 {
		t.Fatalf("DiskSeq = %d, %v; want the binding's, %d", seq, err, k.devs[0].diskSeq)
	}
	if s, _ := d.Status(); s.Flags != FlagAutoClear {
		t.Fatalf("flags %v", s.Flags)
	}
	checkAttached(t, k, d, f.Name())
	// AutoClear: the last close detached it.
	checkNothingLeft(t, k)

	// The control device stays open for the next Attach.
	before := len(k.calls("open " + ControlPath))
	d, err = k.sys.AttachFile(context.Background(), f, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if n := len(k.calls("open " + ControlPath)); n != before {
		t.Fatal("the control device was opened again")
	}
	checkAttached(t, k, d, f.Name())
}

// TestAttachLostRace: another process gets to the device that GET_FREE
// named first. Attach binds another, and never clears a binding it did not
// make.
func TestAttachLostRace(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		name  string
		race  func(k *fakeKernel)
		want  int
		check bool // checkAttached: only the returned device is open
	}{
		// Another binds loop0 first, then holds loop1's lock
		// exclusively, setting it up; GET_FREE keeps naming loop0, so
		// Attach turns to sysfs for another.
		{"bound, then locked", func(k *fakeKernel) {
			k.failAt("LOOP_CONFIGURE", 1, unix.EBUSY)
			k.failAt("flock-ex", 2, unix.EWOULDBLOCK)
			k.failAt("flock-sh", 1, unix.EWOULDBLOCK)
		}, 2, true},
		// udev holds loop0's lock shared, probing it: no race, and
		// Attach waits for the probe to end.
		{"probed", func(k *fakeKernel) {
			k.failAt("flock-ex", 1, unix.EWOULDBLOCK)
		}, 0, true},
		// loop0 is removed before Attach opens it: no node, and no longer
		// in sysfs.
		{"removed", func(k *fakeKernel) {
			k.actAt("open", 2, func(k *fakeKernel) { delete(k.devs, 0); k.sync(0) }, nil)
		}, 1, true},
		// loop0 is bound and cleared by its only opener before Attach opens
		// it: since Linux 6.11 it refuses opens (ENXIO) until that opener
		// closes it.
		{"torn down", func(k *fakeKernel) {
			k.actAt("open", 2, func(k *fakeKernel) {
				d := k.devs[0]
				d.bound, d.rundown, d.opens = true, true, 1
				k.sync(0)
			}, nil)
		}, 1, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			k := useFake(t, 3)
			tt.race(k)
			f := kerneltest.TempFile(t, 1<<20)
			d, err := k.sys.Attach(context.Background(), f.Name(), Options{})
			if err != nil {
				t.Fatal(err)
			}
			if d.Number() != tt.want {
				t.Fatalf("attached loop%d, want loop%d", d.Number(), tt.want)
			}
			if got := k.calls("LOOP_CLR_FD"); len(got) != 0 {
				t.Fatalf("cleared a binding it did not make: %q", got)
			}
			if tt.check {
				checkAttached(t, k, d, f.Name())
			}
			d.Close()
		})
	}
}

// TestAttachFaults fails each step of Attach, and of its fallback path, with
// each errno in turn, and checks the retry or the full rollback, and that
// the error keeps the errno and names the operation that failed.
func TestAttachFaults(t *testing.T) {
	t.Parallel()
	type outcome int
	const (
		fails   outcome = iota // error matching the errno, nothing left behind
		retried                // the step is tried again and Attach succeeds
		waits                  // a lock held elsewhere (shared, for a device), so Attach waits for it
		ignored                // Attach succeeds all the same
	)
	steps := []struct {
		step     string
		nth      int    // which call of the step to fail
		fallback bool   // on a kernel without LOOP_CONFIGURE
		op       string // the operation the error names
		retry    map[unix.Errno]outcome
	}{
		{"ctl-lock", 1, false, "lock", map[unix.Errno]outcome{unix.EAGAIN: waits}},
		{"LOOP_CTL_GET_FREE", 1, false, "get free", map[unix.Errno]outcome{unix.EINTR: retried}},
		// The device; open 1 is the control device. A lost race: the
		// device was torn down (ENXIO), removed (ENODEV) or is held
		// exclusively (EBUSY). ENOENT while sysfs still lists it and
		// GET_FREE still names it: a missing node, reported at once.
		{"open", 2, false, "open", map[unix.Errno]outcome{unix.EBUSY: retried, unix.ENXIO: retried, unix.ENODEV: retried}},
		{"flock-ex", 1, false, "lock", map[unix.Errno]outcome{unix.EAGAIN: waits}},
		{"LOOP_CONFIGURE", 1, false, "configure", map[unix.Errno]outcome{unix.EBUSY: retried, unix.EINTR: retried}},
		{"flock-un", 1, false, "unlock", nil},
		{"ctl-unlock", 1, false, "", nil}, // every errno ignored, see below
		{"LOOP_SET_FD", 1, true, "configure", map[unix.Errno]outcome{unix.EBUSY: retried, unix.EINTR: retried}},
		{"LOOP_SET_STATUS64", 1, true, "configure", map[unix.Errno]outcome{unix.EAGAIN: retried, unix.EINTR: retried}},
		{"LOOP_SET_BLOCK_SIZE", 1, true, "configure", map[unix.Errno]outcome{unix.EAGAIN: retried, unix.EINTR: retried}},
		{"LOOP_SET_DIRECT_IO", 1, true, "configure", map[unix.Errno]outcome{unix.EINTR: retried}},
	}
	errnos := []unix.Errno{unix.EBUSY, unix.EAGAIN, unix.EINTR, unix.ENXIO, unix.ENOENT, unix.ENODEV, unix.EPERM, unix.ENOMEM}
	for _, s := range steps {
		for _, errno := range errnos {
			want := s.retry[errno]
			if s.step == "ctl-unlock" {
				// The lock is released by closing the control
				// device; the next Attach opens it again.
				want = ignored
			}
			name := s.step + "/" + unix.ErrnoName(errno)
			t.Run(name, func(t *testing.T) {
				k := useFake(t, 4)
				if s.fallback {
					k.sys.lacks(featConfigure)
				}
				k.failAt(s.step, s.nth, errno)
				f := kerneltest.TempFile(t, 1<<20)
				d, err := k.sys.Attach(context.Background(), f.Name(), Options{BlockSize: 4096, Flags: FlagDirectIO})
				switch want {
				case retried, waits, ignored:
					if err != nil {
						t.Fatalf("Attach = %v, want success", err)
					}
					switch n := k.counts[s.step]; {
					case want == retried && n < 2:
						t.Fatalf("%s called %d times, want a retry", s.step, n)
					case want == waits && k.counts[s.step+"-wait"] != 1:
						t.Fatalf("%d blocking waits after %s, want 1", k.counts[s.step+"-wait"], s.step)
					}
					checkAttached(t, k, d, f.Name())
					if want == ignored {
						opens := len(k.calls("open " + ControlPath))
						d, err := k.sys.Attach(context.Background(), f.Name(), Options{})
						if err != nil || len(k.calls("open "+ControlPath)) != opens+1 {
							t.Fatalf("the next Attach: %v, control device opens %d, want it reopened", err, opens)
						}
						checkAttached(t, k, d, f.Name())
					}
				case fails:
					if err == nil {
						d.Close()
						t.Fatal("Attach succeeded")
					}
					var e *Error
					if !errors.Is(err, errno) || !errors.As(err, &e) || e.Op != "attach" || e.Path != f.Name() {
						t.Fatalf("Attach = %v, want an attach *Error for %s matching %s", err, f.Name(), unix.ErrnoName(errno))
					}
					if ops := errorOps(err); !slices.Contains(ops, s.op) {
						t.Fatalf("Attach = %v: operations %q, want %q named", err, ops, s.op)
					}
					checkNothingLeft(t, k)
				}
			})
		}
	}
}

// errorOps returns the operations that the *Error and *os.PathError values
// in err's chain name, outermost first.
func errorOps(err error) []string {
	var ops []string
	for stack := []error{err}; len(stack) > 0; {
		e := stack[0]
		stack = stack[1:]
		switch e := e.(type) {
		case *Error:
			ops = append(ops, e.Op)
		case *os.PathError:
			ops = append(ops, e.Op)
		}
		switch u := e.(type) {
		case interface{ Unwrap() error }:
			if next := u.Unwrap(); next != nil {
				stack = append(stack, next)
			}
		case interface{ Unwrap() []error }:
			stack = append(stack, u.Unwrap()...)
		}
	}
	return ops
}

func TestAttachRefusesBeforeTouchingDevices(t *testing.T) {
	t.Parallel()
	k := useFake(t, 2)
	dir := t.TempDir()
	f := kerneltest.TempFile(t, 1<<20)
	closed := kerneltest.TempFile(t, 1<<20)
	closed.Close()
	dirFile, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer dirFile.Close()
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	bg := context.Background()
	readOnlyFile := filepath.Join(dir, "read-only")
	if err := os.WriteFile(readOnlyFile, make([]byte, 4096), 0o444); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name   string
		attach func() (*Device, error)
		is     error
	}{
		{"cancelled", func() (*Device, error) { return k.sys.Attach(cancelled, f.Name(), Options{}) }, context.Canceled},
		{"cancelled file", func() (*Device, error) { return k.sys.AttachFile(cancelled, f, Options{}) }, context.Canceled},
		{"missing", func() (*Device, error) { return k.sys.Attach(bg, filepath.Join(dir, "missing"), Options{}) }, fs.ErrNotExist},
		{"directory", func() (*Device, error) { return k.sys.Attach(bg, dir, Options{}) }, fs.ErrInvalid},
		{"directory read-only", func() (*Device, error) { return k.sys.Attach(bg, dir, Options{Flags: FlagReadOnly}) }, fs.ErrInvalid},
		{"directory file", func() (*Device, error) { return k.sys.AttachFile(bg, dirFile, Options{}) }, fs.ErrInvalid},
		{"nil file", func() (*Device, error) { return k.sys.AttachFile(bg, nil, Options{}) }, fs.ErrInvalid},
		{"closed file", func() (*Device, error) { return k.sys.AttachFile(bg, closed, Options{}) }, fs.ErrInvalid},
		{"bad flags", func() (*Device, error) { return k.sys.Attach(bg, f.Name(), Options{Flags: 0x40}) }, fs.ErrInvalid},
		{"bad block size", func() (*Device, error) { return k.sys.AttachFile(bg, f, Options{BlockSize: 1000}) }, fs.ErrInvalid},
		// Not writable: never a silent switch to read-only. Root may
		// write it; TestKernelBadBackingFiles has a read-only mount.
		{"not writable", func() (*Device, error) { return k.sys.Attach(bg, readOnlyFile, Options{}) }, fs.ErrPermission},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.name == "not writable" && os.Geteuid() == 0 {
				t.Skip("root may write a file of mode 0444")
			}
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
	t.Parallel()
	k := useFake(t, 1)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	for i := 1; i <= maxAttempts; i++ {
		if i == 3 {
			// Cancelled while Attach retries.
			k.actAt("LOOP_CONFIGURE", i, func(*fakeKernel) { cancel() }, unix.EBUSY)
			continue
		}
		k.failAt("LOOP_CONFIGURE", i, unix.EBUSY)
	}
	_, err := k.sys.Attach(ctx, kerneltest.TempFile(t, 4096).Name(), Options{})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Attach = %v, want context.Canceled", err)
	}
	checkNothingLeft(t, k)
}

// TestAttachCancelledWhileProbed: udev holds the device's lock, shared,
// past the Attach's context. Attach returns at once with the context's
// error; its device is closed once the flock it waited for returns.
func TestAttachCancelledWhileProbed(t *testing.T) {
	k := useFake(t, 1)
	k.failAt("flock-ex", 1, unix.EWOULDBLOCK)
	k.devWait = make(chan struct{})
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		waitBlocked(t, "lockDevice")
		cancel()
	}()
	_, err := k.sys.Attach(ctx, kerneltest.TempFile(t, 4096).Name(), Options{})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Attach = %v, want context.Canceled", err)
	}
	if b := k.bound(); len(b) != 0 {
		t.Fatalf("devices bound: %v", b)
	}
	close(k.devWait) // udev's probe ends
	for k.deviceHandles() != 0 {
		runtime.Gosched()
	}
	if got := k.calls("LOOP_CONFIGURE"); len(got) != 0 {
		t.Fatalf("bound after the context ended: %q", got)
	}
}

func TestAttachGivesUp(t *testing.T) {
	t.Parallel()
	for _, step := range []string{"LOOP_CONFIGURE", "open"} {
		t.Run(step, func(t *testing.T) {
			k := useFake(t, 1)
			first := 1
			if step == "open" {
				first = 2 // open 1 is the control device
			}
			for i := first; i < first+maxAttempts; i++ {
				k.failAt(step, i, map[string]unix.Errno{"open": unix.ENXIO, "LOOP_CONFIGURE": unix.EBUSY}[step])
			}
			_, err := k.sys.Attach(context.Background(), kerneltest.TempFile(t, 4096).Name(), Options{})
			if !errors.Is(err, ErrBusy) || !strings.Contains(err.Error(), "gave up after 256 lost races") {
				t.Fatalf("Attach = %v, want ErrBusy after 256 lost races", err)
			}
			if step == "open" && !errors.Is(err, unix.ENXIO) {
				t.Fatalf("Attach = %v: the last race's ENXIO is lost", err)
			}
			if n := k.counts[step] - first + 1; n != maxAttempts {
				t.Fatalf("%d attempts, want %d", n, maxAttempts)
			}
			checkNothingLeft(t, k)
		})
	}
}

func TestAttachWithoutControl(t *testing.T) {
	t.Parallel()
	k := useFake(t, 3)
	k.noControl = true
	f := kerneltest.TempFile(t, 1<<20)
	var devs []*Device
	for want := range 3 {
		d, err := k.sys.Attach(context.Background(), f.Name(), Options{})
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
	_, err := k.sys.Attach(context.Background(), f.Name(), Options{})
	if !errors.Is(err, ErrBusy) {
		t.Fatalf("Attach with every device bound = %v, want ErrBusy", err)
	}
	for _, d := range devs {
		d.ClearFD()
	}
}

func TestAttachMissingNode(t *testing.T) {
	t.Parallel()
	for _, noControl := range []bool{false, true} {
		k := useFake(t, 2)
		k.noControl = noControl
		k.noNode[0] = true
		_, err := k.sys.Attach(context.Background(), kerneltest.TempFile(t, 4096).Name(), Options{})
		if !errors.Is(err, fs.ErrNotExist) || !errors.Is(err, unix.ENOENT) || !strings.Contains(err.Error(), "open /dev/loop0: ") {
			t.Fatalf("noControl=%v: Attach = %v, want the missing /dev/loop0", noControl, err)
		}
		var missing *NodeMissingError
		if !errors.As(err, &missing) || missing.Number != 0 || missing.Partition != 0 || missing.Path != "/dev/loop0" {
			t.Fatalf("noControl=%v: Attach = %v, want a *NodeMissingError for loop0", noControl, err)
		}
		checkNothingLeft(t, k)
	}
}

func TestAttachConcurrentFake(t *testing.T) {
	t.Parallel()
	k := useFake(t, 2)
	const n = 32
	var wg sync.WaitGroup
	devs := make([]*Device, n)
	files := make([]*os.File, n)
	for i := range n {
		files[i] = kerneltest.TempFile(t, 4096)
	}
	for i := range n {
		wg.Go(func() {
			d, err := k.sys.Attach(context.Background(), files[i].Name(), Options{})
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

// TestAttachReadOnlyDescriptor: a read-only binding is made and held
// through a read-only descriptor of the device (FlagReadOnly, or a file
// open read-only), and OpenBinding of one opens it so; OpenDevice stays
// read-write. Through a read-only descriptor, a caller without
// CAP_SYS_ADMIN is refused a change with EPERM, explained.
func TestAttachReadOnlyDescriptor(t *testing.T) {
	t.Parallel()
	k := useFake(t, 4)
	k.noAdmin = true
	mode := func(d *Device) bool { return d.h.(readOnlyHandle).readOnly() }
	f := kerneltest.TempFile(t, 1<<20)

	ro := attachFake(t, k, f.Name(), Options{Flags: FlagReadOnly})
	if !mode(ro) {
		t.Fatal("Attach with FlagReadOnly holds a read-write descriptor")
	}
	if s, err := ro.Status(); err != nil || s.Flags&FlagReadOnly == 0 {
		t.Fatalf("Status = %+v, %v; want read-only", s, err)
	}
	err := ro.ClearFD()
	if !errors.Is(err, unix.EPERM) || !errors.Is(err, fs.ErrPermission) || !strings.Contains(err.Error(), "open read-only") {
		t.Fatalf("ClearFD through a read-only descriptor without CAP_SYS_ADMIN = %v, want EPERM explained", err)
	}
	if err := ro.Lock(LockShared); err != nil { // flock needs no write access
		t.Fatal(err)
	}

	rw := attachFake(t, k, f.Name(), Options{})
	if mode(rw) {
		t.Fatal("Attach without FlagReadOnly holds a read-only descriptor")
	}
	rf, err := os.Open(f.Name())
	if err != nil {
		t.Fatal(err)
	}
	defer rf.Close()
	d, err := k.sys.AttachFile(context.Background(), rf, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if !mode(d) {
		t.Fatal("AttachFile of a file open read-only holds a read-write descriptor")
	}

	for _, tt := range []struct {
		d    *Device
		want bool
	}{{ro, true}, {rw, false}} {
		s, err := tt.d.Status()
		if err != nil {
			t.Fatal(err)
		}
		b, err := k.sys.OpenBinding(s)
		if err != nil {
			t.Fatal(err)
		}
		if mode(b) != tt.want {
			t.Errorf("OpenBinding of %v: read-only descriptor %v, want %v", s.Flags, mode(b), tt.want)
		}
		b.Close()
	}
	od, err := k.sys.OpenDevice(ro.Number())
	if err != nil {
		t.Fatal(err)
	}
	defer od.Close()
	if mode(od) {
		t.Fatal("OpenDevice opened read-only")
	}
}

// TestAttachBlockSizeAuto: the image's GPT sector size is bound; none
// gives the kernel's default; headers at two sizes are an error naming
// both, before any device is touched.
func TestAttachBlockSizeAuto(t *testing.T) {
	t.Parallel()
	k := useFake(t, 4)
	for _, tt := range []struct {
		name   string
		sizes  []uint32
		offset uint64
		want   uint32
	}{
		{"4096", []uint32{4096}, 0, 4096},
		{"2048, after an offset", []uint32{2048}, 8192, 2048},
		{"none", nil, 0, 512},
	} {
		path := filepath.Join(t.TempDir(), "image")
		img := make([]byte, 1<<20)
		copy(img[tt.offset:], gptImage(tt.sizes...))
		if err := os.WriteFile(path, img, 0o644); err != nil {
			t.Fatal(err)
		}
		d := attachFake(t, k, path, Options{BlockSize: BlockSizeAuto, Offset: tt.offset})
		if s, err := d.Status(); err != nil || s.BlockSize != tt.want {
			t.Errorf("%s: Status = %+v, %v; want %d-byte blocks", tt.name, s, err, tt.want)
		}
	}
	path := filepath.Join(t.TempDir(), "image")
	img := make([]byte, 1<<20)
	copy(img, gptImage(512, 4096))
	if err := os.WriteFile(path, img, 0o644); err != nil {
		t.Fatal(err)
	}
	before := len(k.calls("LOOP_CONFIGURE"))
	_, err := k.sys.Attach(context.Background(), path, Options{BlockSize: BlockSizeAuto})
	if !errors.Is(err, fs.ErrInvalid) || !strings.Contains(err.Error(), "512- and 4096-byte") {
		t.Fatalf("Attach of an image with two GPT headers = %v, want an error naming both sizes", err)
	}
	if len(k.calls("LOOP_CONFIGURE")) != before {
		t.Fatal("bound a device")
	}
	if err := fakeDevice(t, k, 3).SetBlockSize(BlockSizeAuto); !errors.Is(err, fs.ErrInvalid) {
		t.Fatalf("SetBlockSize(BlockSizeAuto) = %v, want fs.ErrInvalid", err)
	}
}
