//go:build integration

package loopctl

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/kerneltest"
	"github.com/loopctl/loopctl/internal/sysfs"
)

// diskSeqEvents reads the uevents for loop device n until a pause of 200
// ms, and returns the DISKSEQ of each "change".
func diskSeqEvents(t *testing.T, events *kerneltest.Uevents, n int) []uint64 {
	t.Helper()
	devpath := "/devices/virtual/block/loop" + strconv.Itoa(n)
	var seqs []uint64
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); {
		ev, ok, err := events.Next(200 * time.Millisecond)
		if err != nil {
			t.Fatal(err)
		}
		if !ok {
			break
		}
		if v, has := ev.Vars["DISKSEQ"]; has && ev.Action == "change" && ev.Vars["DEVPATH"] == devpath {
			seq, _ := strconv.ParseUint(v, 10, 64)
			seqs = append(seqs, seq)
		}
	}
	return seqs
}

// TestKernelDiskSeq: a binding's disk sequence number is the same in
// DiskSeq, Status, List, sysfs and the kernel's uevent, and moves on at
// the bind and at the unbind; 0 everywhere on a kernel before 5.15.
func TestKernelDiskSeq(t *testing.T) {
	kerneltest.Require(t)
	events := kerneltest.ListenUevents(t)
	f := kerneltest.TempFile(t, 1<<20)
	d := attachT(t, f.Name(), Options{})
	n := d.Number()
	seq, err := d.DiskSeq()
	if err != nil {
		t.Fatal(err)
	}
	if !kerneltest.AtLeast(t, 5, 15) {
		if seq != 0 || kerneltest.DiskSeq(t, n) != 0 {
			t.Fatalf("diskseq %d on %s, which has none", seq, kerneltest.Release())
		}
		return
	}
	s, err := d.Status()
	if err != nil {
		t.Fatal(err)
	}
	found, err := FindByBackingFile(f.Name())
	if err != nil || len(found) != 1 {
		t.Fatalf("FindByBackingFile = %+v, %v", found, err)
	}
	if seq == 0 || s.DiskSeq != seq || found[0].DiskSeq != seq || kerneltest.DiskSeq(t, n) != seq {
		t.Fatalf("diskseq: DiskSeq %d, Status %d, FindByBackingFile %d, sysfs %d: want one number", seq, s.DiskSeq,
			found[0].DiskSeq, kerneltest.DiskSeq(t, n))
	}
	// The bind's uevent, on kernels that send one (6.15, and Debian's
	// 6.12 by a backport), has the binding's number.
	if got := diskSeqEvents(t, events, n); len(got) > 0 && got[len(got)-1] != seq {
		t.Fatalf("uevents of the bind have DISKSEQ %v, want %d", got, seq)
	} else if len(got) == 0 && kerneltest.AtLeast(t, 6, 15) {
		t.Fatalf("no change uevent for loop%d at its bind on %s", n, kerneltest.Release())
	}
	if err := d.Detach(context.Background()); err != nil {
		t.Fatal(err)
	}
	after := kerneltest.DiskSeq(t, n)
	if after <= seq {
		t.Fatalf("diskseq %d after the unbind, %d before: want it moved on", after, seq)
	}
	// The unbind's uevents carry the old number.
	if got := diskSeqEvents(t, events, n); len(got) == 0 || got[0] != seq {
		t.Logf("uevents of the unbind on %s: DISKSEQ %v (binding's %d)", kerneltest.Release(), got, seq)
		if kerneltest.AtLeast(t, 6, 15) {
			t.Fatalf("uevents of the unbind have DISKSEQ %v, want the binding's, %d", got, seq)
		}
	}
}

// TestKernelOpenBinding: List, then OpenBinding, then ClearFD never
// detaches a binding other than the one listed: the number is bound anew
// between the List and the OpenBinding, to another file (which a kernel
// without diskseq, 5.10, tells too) and to the same one (which only
// diskseq tells).
func TestKernelOpenBinding(t *testing.T) {
	c := openControl(t)
	d := newDevice(t, c)
	n := d.Number()
	a, b := kerneltest.TempFile(t, 1<<20), kerneltest.TempFile(t, 1<<20)
	if err := d.Configure(a, Options{}); err != nil {
		t.Fatal(err)
	}
	d.Close()
	list := func() Status {
		t.Helper()
		found, err := List()
		if err != nil {
			t.Fatal(err)
		}
		i := slices.IndexFunc(found, func(s Status) bool { return s.Number == n })
		if i < 0 {
			t.Fatalf("List lacks loop%d", n)
		}
		return found[i]
	}
	rebind := func(f *os.File) {
		t.Helper()
		o, err := OpenDevice(n)
		if err != nil {
			t.Fatal(err)
		}
		clearAlone(t, o)
		o.Close()
		kerneltest.WaitUnbound(t, n)
		if o, err = OpenDevice(n); err != nil {
			t.Fatal(err)
		}
		if err := o.Configure(f, Options{}); err != nil {
			t.Fatal(err)
		}
		o.Close()
	}
	listed := list()
	rebind(b)
	if _, err := OpenBinding(listed); !errors.Is(err, ErrChanged) {
		t.Fatalf("OpenBinding of loop%d bound anew to another file = %v, want ErrChanged", n, err)
	}
	// Still the other binding's: nothing was detached.
	if s := list(); s.BackingInode == listed.BackingInode {
		t.Fatalf("loop%d: %+v", n, s)
	}
	listed = list()
	rebind(b)
	o, err := OpenBinding(listed)
	switch {
	case kerneltest.AtLeast(t, 5, 15) && !errors.Is(err, ErrChanged):
		t.Fatalf("OpenBinding of loop%d bound anew to the same file = %v, %v; want ErrChanged", n, o, err)
	case !kerneltest.AtLeast(t, 5, 15) && err != nil:
		t.Fatalf("OpenBinding of loop%d bound anew to the same file, without diskseq: %v", n, err)
	case err == nil:
		o.Close()
	}
	// The binding listed now: opened, and it is the one ClearFD detaches.
	listed = list()
	o, err = OpenBinding(listed)
	if err != nil {
		t.Fatal(err)
	}
	if seq, err := o.DiskSeq(); err != nil || seq != listed.DiskSeq {
		t.Fatalf("DiskSeq = %d, %v; want %d", seq, err, listed.DiskSeq)
	}
	if err := o.Detach(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// TestKernelRef: an owner reference goes into lo_file_name and comes back
// in Status, List and FindByRef, beside the backing file's full path.
func TestKernelRef(t *testing.T) {
	kerneltest.Require(t)
	ref := "loopctl-test-" + strconv.Itoa(os.Getpid()) + "-" + strings.Repeat("r", 30)
	f := kerneltest.TempFile(t, 1<<20)
	d := attachT(t, f.Name(), Options{Ref: ref})
	plain := attachT(t, f.Name(), Options{Flags: FlagReadOnly})
	for _, tt := range []struct {
		d   *Device
		ref string
	}{{d, ref}, {plain, f.Name()[:63]}} {
		s, err := tt.d.Status()
		if err != nil || s.Ref != tt.ref || s.BackingFile != f.Name() {
			t.Fatalf("Status = %+v, %v; want Ref %q and BackingFile %s", s, err, tt.ref, f.Name())
		}
	}
	found, err := FindByRef(ref)
	if err != nil || len(found) != 1 || found[0].Number != d.Number() || found[0].Ref != ref || found[0].BackingFile != f.Name() {
		t.Fatalf("FindByRef = %+v, %v; want %s", found, err, d.Path())
	}
	all, err := FindByBackingFile(f.Name())
	if err != nil || len(all) != 2 {
		t.Fatalf("FindByBackingFile = %+v, %v", all, err)
	}
	if found, err := FindByRef(ref + "x"); err != nil || len(found) != 0 {
		t.Fatalf("FindByRef of another = %+v, %v", found, err)
	}
}

// TestKernelDetach: Detach returns once the binding is gone: at once for
// its only opener; after a second opener's close; and, when its context
// ends while a file system is mounted on it, with ErrBusy naming the
// mount, the detach left for the unmount.
func TestKernelDetach(t *testing.T) {
	kerneltest.Require(t)
	t.Run("only opener", func(t *testing.T) {
		d := attachT(t, kerneltest.TempFile(t, 1<<20).Name(), Options{})
		n := d.Number()
		if err := d.Detach(context.Background()); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(sysfs.LoopAttr(sysfs.Root, n, "")); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("loop%d bound after Detach returned: %v", n, err)
		}
	})
	t.Run("second opener", func(t *testing.T) {
		d := attachT(t, kerneltest.TempFile(t, 1<<20).Name(), Options{})
		n := d.Number()
		other, err := os.Open(d.Path())
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- d.Detach(context.Background()) }()
		// The binding stays while the other opener holds the device.
		if _, err := os.Stat(sysfs.LoopAttr(sysfs.Root, n, "")); err != nil {
			t.Fatalf("loop%d unbound under a second opener: %v", n, err)
		}
		select {
		case err := <-done:
			t.Fatalf("Detach returned %v while another opener held the device", err)
		case <-time.After(100 * time.Millisecond):
		}
		other.Close()
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(sysfs.LoopAttr(sysfs.Root, n, "")); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("loop%d bound after Detach returned: %v", n, err)
		}
	})
	t.Run("mounted", func(t *testing.T) {
		if _, err := exec.LookPath("mkfs.ext4"); err != nil {
			t.Skip("no mkfs.ext4")
		}
		f := kerneltest.TempFile(t, 16<<20)
		if out, err := exec.Command("mkfs.ext4", "-q", "-F", f.Name()).CombinedOutput(); err != nil {
			t.Fatalf("mkfs.ext4: %v\n%s", err, out)
		}
		d := attachT(t, f.Name(), Options{})
		n := d.Number()
		dir := t.TempDir()
		if err := unix.Mount(d.Path(), dir, "ext4", 0, ""); err != nil {
			t.Fatal(err)
		}
		mounted := true
		t.Cleanup(func() {
			if mounted {
				unix.Unmount(dir, 0)
			}
		})
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		defer cancel()
		err := d.Detach(ctx)
		if !errors.Is(err, ErrBusy) || !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "mounted at "+dir) {
			t.Fatalf("Detach of a mounted device = %v; want ErrBusy naming the mount on %s", err, dir)
		}
		if err := unix.Unmount(dir, 0); err != nil {
			t.Fatal(err)
		}
		mounted = false
		kerneltest.WaitUnbound(t, n) // the unmount was the last close
	})
}

// TestKernelSweep: Sweep detaches the bindings of its reference, those a
// mount holds at the mount's end, and no binding of another reference.
func TestKernelSweep(t *testing.T) {
	kerneltest.Require(t)
	mine, theirs := "loopctl-sweep-mine-"+strconv.Itoa(os.Getpid()), "loopctl-sweep-theirs-"+strconv.Itoa(os.Getpid())
	t.Cleanup(func() {
		for _, ref := range []string{mine, theirs} {
			if _, err := Sweep(context.Background(), ref); err != nil {
				t.Error(err)
			}
		}
	})
	var devs []*Device
	for _, ref := range []string{mine, theirs, mine, mine} {
		d, err := Attach(context.Background(), kerneltest.TempFile(t, 1<<20).Name(), Options{Ref: ref})
		if err != nil {
			t.Fatal(err)
		}
		devs = append(devs, d)
	}
	// devs[3] stays held by another opener; the others are let go of, as
	// a runtime that crashed lets go.
	for _, d := range devs[:3] {
		d.Close()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	swept, err := Sweep(ctx, mine)
	var nums []int
	for _, s := range swept {
		nums = append(nums, s.Number)
	}
	want := []int{devs[0].Number(), devs[2].Number(), devs[3].Number()}
	slices.Sort(want)
	if !slices.Equal(nums, want) {
		t.Fatalf("swept %v, want %v", nums, want)
	}
	if !errors.Is(err, ErrBusy) || !strings.Contains(err.Error(), devs[3].Path()) || strings.Count(err.Error(), "still bound") != 1 {
		t.Fatalf("Sweep = %v; want ErrBusy for %s alone", err, devs[3].Path())
	}
	for _, d := range []*Device{devs[0], devs[2]} {
		if _, err := os.Stat(sysfs.LoopAttr(sysfs.Root, d.Number(), "")); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("%s bound after Sweep: %v", d.Path(), err)
		}
	}
	if found, err := FindByRef(theirs); err != nil || len(found) != 1 || found[0].Number != devs[1].Number() {
		t.Fatalf("another reference's binding: %+v, %v; want %s untouched", found, err, devs[1].Path())
	}
	// The held one goes at its holder's close.
	n := devs[3].Number()
	devs[3].Close()
	kerneltest.WaitUnbound(t, n)
}
