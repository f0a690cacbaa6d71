package loopctl

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/kerneltest"
)

// rebindFake detaches device n as another process would and binds file to
// it: the same number, another binding.
func rebindFake(t *testing.T, k *fakeKernel, n int, file *os.File, o Options) {
	t.Helper()
	d := fakeDevice(t, k, n)
	if err := d.ClearFD(); err != nil {
		t.Fatal(err)
	}
	d.Close()
	d = fakeDevice(t, k, n)
	if err := d.Configure(file, o); err != nil {
		t.Fatal(err)
	}
	d.Close()
}

// TestOpenBindingFake: OpenBinding returns the binding a Status names,
// and refuses the number bound anew, with disk sequence numbers and, as
// before Linux 5.15, without.
func TestOpenBindingFake(t *testing.T) {
	t.Parallel()
	for _, noSeq := range []bool{false, true} {
		t.Run(map[bool]string{false: "diskseq", true: "no diskseq"}[noSeq], func(t *testing.T) {
			k := useFake(t, 3)
			k.noDiskSeq = noSeq
			d, f := bindFake(t, k, 1, Options{Flags: FlagReadOnly})
			d.Close()
			list, err := k.sys.List()
			if err != nil || len(list) != 1 {
				t.Fatalf("List = %+v, %v", list, err)
			}
			s := list[0]
			if want := k.devs[1].diskSeq; noSeq && s.DiskSeq != 0 || !noSeq && (s.DiskSeq != want || want == 0) {
				t.Fatalf("listed disk sequence number %d, want %d (no diskseq: %v)", s.DiskSeq, want, noSeq)
			}
			b, err := k.sys.OpenBinding(s)
			if err != nil {
				t.Fatal(err)
			}
			if seq, err := b.DiskSeq(); err != nil || seq != s.DiskSeq {
				t.Fatalf("DiskSeq = %d, %v; want %d", seq, err, s.DiskSeq)
			}
			b.Close()

			// Bound anew to the same file and range: a new binding, which
			// only a disk sequence number tells from the old.
			rebindFake(t, k, 1, f, Options{Flags: FlagReadOnly})
			b, err = k.sys.OpenBinding(s)
			if noSeq {
				if err != nil {
					t.Fatalf("without diskseq, the same file and range: %v", err)
				}
				b.Close()
			} else if !errors.Is(err, ErrChanged) || !strings.Contains(err.Error(), "disk sequence number") {
				t.Fatalf("OpenBinding of a device bound anew = %v, want ErrChanged", err)
			}
			// Bound anew to another file, or another range.
			for _, o := range []Options{{}, {Offset: 4096}} {
				file := f
				if o.Offset == 0 {
					file = kerneltest.TempFile(t, 1<<20)
				}
				rebindFake(t, k, 1, file, o)
				if _, err := k.sys.OpenBinding(s); !errors.Is(err, ErrChanged) {
					t.Fatalf("OpenBinding after a rebind with %+v = %v, want ErrChanged", o, err)
				}
			}
			// Unbound, and being torn down.
			c := fakeDevice(t, k, 1)
			c.ClearFD()
			if _, err := k.sys.OpenBinding(s); !errors.Is(err, ErrChanged) {
				t.Fatalf("OpenBinding in rundown = %v, want ErrChanged", err)
			}
			c.Close()
			if _, err := k.sys.OpenBinding(s); !errors.Is(err, ErrChanged) || !errors.Is(err, ErrNotBound) {
				t.Fatalf("OpenBinding of an unbound device = %v, want ErrChanged", err)
			}
			if n := k.deviceHandles(); n != 0 {
				t.Fatalf("%d device handles left open", n)
			}
		})
	}
}

// TestOpenBindingChangedBeforeCheck: between OpenBinding's open and its
// check, the device is bound anew (which the real kernel's pin forbids,
// but for LOOP_CHANGE_FD): the check sees it, and nothing stays open.
func TestOpenBindingChangedBeforeCheck(t *testing.T) {
	t.Parallel()
	k := useFake(t, 2)
	d, _ := bindFake(t, k, 0, Options{})
	s, err := d.Status()
	if err != nil {
		t.Fatal(err)
	}
	open := k.deviceHandles()
	k.actAt("LOOP_GET_STATUS64", len(k.calls("LOOP_GET_STATUS64"))+1, func(k *fakeKernel) { k.nextSeq(0) }, nil)
	if _, err := k.sys.OpenBinding(s); !errors.Is(err, ErrChanged) {
		t.Fatalf("OpenBinding = %v, want ErrChanged", err)
	}
	if n := k.deviceHandles(); n != open {
		t.Fatalf("%d device handles open, %d before", n, open)
	}
}

func TestRefFake(t *testing.T) {
	t.Parallel()
	k := useFake(t, 4)
	for _, bad := range []string{strings.Repeat("r", 64), "a\x00b"} {
		before := len(k.calls(""))
		if _, err := k.sys.AttachFile(context.Background(), kerneltest.TempFile(t, 4096), Options{Ref: bad}); !errors.Is(err, fs.ErrInvalid) {
			t.Fatalf("Ref %q: %v, want fs.ErrInvalid", bad, err)
		}
		if _, err := k.sys.FindByRef(bad); !errors.Is(err, fs.ErrInvalid) {
			t.Fatalf("k.sys.FindByRef(%q) = %v, want fs.ErrInvalid", bad, err)
		}
		if log := k.calls("")[before:]; len(log) != 0 {
			t.Fatalf("devices touched: %q", log)
		}
	}
	if _, err := k.sys.FindByRef(""); !errors.Is(err, fs.ErrInvalid) {
		t.Fatalf("k.sys.FindByRef(\"\") = %v, want fs.ErrInvalid", err)
	}
	ref := strings.Repeat("r", 63)
	f := kerneltest.TempFile(t, 4096)
	a, err := k.sys.AttachFile(context.Background(), f, Options{Ref: ref})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := k.sys.AttachFile(context.Background(), f, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	for _, tt := range []struct {
		d   *Device
		ref string
	}{{a, ref}, {b, f.Name()[:63]}} {
		if s, err := tt.d.Status(); err != nil || s.Ref != tt.ref || s.BackingFile != f.Name() {
			t.Fatalf("Status = %+v, %v; want Ref %q and the file's path", s, err, tt.ref)
		}
	}
	found, err := k.sys.FindByRef(ref)
	if err != nil || len(found) != 1 || found[0].Number != a.Number() || found[0].Ref != ref {
		t.Fatalf("FindByRef = %+v, %v; want %s", found, err, a.Path())
	}
	// Without the right to open the devices, references cannot be read.
	k.noAccess = true
	if _, err := k.sys.FindByRef(ref); !errors.Is(err, fs.ErrPermission) {
		t.Fatalf("FindByRef without access = %v, want fs.ErrPermission", err)
	}
}

// TestDetachFake: Detach returns once the binding is gone: at once for the
// last opener; for a device another opener holds, at its close, or with
// ErrBusy when the context ends first, the detach still set.
func TestDetachFake(t *testing.T) {
	t.Parallel()
	k := useFake(t, 2)
	d, _ := bindFake(t, k, 0, Options{})
	if err := d.Detach(context.Background()); err != nil {
		t.Fatal(err)
	}
	if b := k.bound(); len(b) != 0 {
		t.Fatalf("bound after Detach: %v", b)
	}
	if _, err := d.Status(); !errors.Is(err, fs.ErrClosed) {
		t.Fatalf("Status after Detach = %v, want fs.ErrClosed", err)
	}

	d, _ = bindFake(t, k, 1, Options{})
	other := fakeDevice(t, k, 1) // a second opener
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	err := d.Detach(ctx)
	if !errors.Is(err, ErrBusy) || !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "another process has it open") {
		t.Fatalf("Detach held by another opener = %v, want ErrBusy and the deadline", err)
	}
	if b := k.bound(); !slices.Equal(b, []int{1}) || k.devs[1].info.Flags&unix.LO_FLAGS_AUTOCLEAR == 0 {
		t.Fatalf("bound %v: want loop1 bound, with autoclear", b)
	}
	other.Close() // the last close detaches
	if b := k.bound(); len(b) != 0 {
		t.Fatalf("bound after the last close: %v", b)
	}
}

// TestSweepFake: Sweep detaches the bindings of its reference, and no
// other: not another reference's, not one bound anew since it looked.
func TestSweepFake(t *testing.T) {
	t.Parallel()
	k := useFake(t, 5)
	bind := func(n int, ref string) {
		d := fakeDevice(t, k, n)
		if err := d.Configure(kerneltest.TempFile(t, 4096), Options{Ref: ref}); err != nil {
			t.Fatal(err)
		}
		d.Close()
	}
	bind(0, "mine")
	bind(1, "theirs")
	bind(2, "mine")
	bind(3, "mine")
	// Between Sweep's look and its open of loop3, loop3 is bound anew,
	// to the same reference: another binding, not Sweep's to take.
	k.actAt("open /dev/loop3", len(k.calls("open /dev/loop3"))+2, func(k *fakeKernel) {
		k.devs[3].bound = false
		k.bind(3, 0, k.devs[3].info, 512)
	}, nil)
	swept, err := k.sys.Sweep(context.Background(), "mine")
	if err != nil {
		t.Fatal(err)
	}
	var nums []int
	for _, s := range swept {
		nums = append(nums, s.Number)
	}
	if !slices.Equal(nums, []int{0, 2}) {
		t.Fatalf("swept %v, want loop0 and loop2", nums)
	}
	if b := k.bound(); !slices.Equal(b, []int{1, 3}) {
		t.Fatalf("bound after Sweep: %v, want loop1 (theirs) and loop3 (bound anew)", b)
	}
}
