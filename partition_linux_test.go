package loopctl

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/kerneltest"
	"github.com/loopctl/loopctl/internal/sysfs"
)

func TestPartitionsFake(t *testing.T) {
	t.Parallel()
	k := useFake(t, 4)
	d, _ := bindFake(t, k, 3, Options{Flags: FlagPartScan})
	k.addPartition(3, 10, 100, 10)
	k.addPartition(3, 1, 2048, 4096)
	k.addPartition(3, 2, 8192, 2048)
	k.addPartition(3, 5, 1, 1)
	os.Remove(k.root + "/block/loop3/loop3p5/size") // removed while read
	if err := os.Mkdir(k.root+"/block/loop3/loop3p02", 0o755); err != nil {
		t.Fatal(err)
	}
	parts, err := d.Partitions()
	if err != nil {
		t.Fatal(err)
	}
	want := []Partition{
		{Number: 1, Path: "/dev/loop3p1", Start: 2048 * 512, Size: 4096 * 512},
		{Number: 2, Path: "/dev/loop3p2", Start: 8192 * 512, Size: 2048 * 512},
		{Number: 10, Path: "/dev/loop3p10", Start: 100 * 512, Size: 10 * 512},
	}
	if !slices.Equal(parts, want) {
		t.Fatalf("Partitions = %+v, want %+v", parts, want)
	}
	k.write(k.root+"/block/loop3/loop3p1/start", "x\n")
	if _, err := d.Partitions(); !errors.As(err, new(*Error)) {
		t.Fatalf("Partitions with a malformed start = %v", err)
	}
	d1 := fakeDevice(t, k, 1)
	if parts, err := d1.Partitions(); err != nil || len(parts) != 0 {
		t.Fatalf("Partitions of an unbound device = %+v, %v", parts, err)
	}
}

func TestRescanFake(t *testing.T) {
	t.Parallel()
	k := useFake(t, 3)
	d, _ := bindFake(t, k, 0, Options{})
	if err := d.Rescan(); !errors.Is(err, fs.ErrInvalid) || !strings.Contains(err.Error(), "FlagPartScan") {
		t.Fatalf("Rescan without partscan = %v, want it refused", err)
	}
	if got := k.calls("BLKRRPART"); len(got) != 0 {
		t.Fatalf("asked the kernel: %q", got)
	}
	d2, _ := bindFake(t, k, 1, Options{Flags: FlagPartScan})
	if err := d2.Rescan(); err != nil {
		t.Fatal(err)
	}
	if got := k.calls("BLKRRPART"); len(got) != 1 {
		t.Fatalf("BLKRRPART calls %q", got)
	}
	if err := fakeDevice(t, k, 2).Rescan(); !errors.Is(err, ErrNotBound) {
		t.Fatalf("Rescan of an unbound device = %v", err)
	}
}

// staleFake is a fake kernel of version v whose loop0 keeps partitions 1
// and 3 from an earlier binding, as kernels before 7.2 keep partitions
// added by hand.
func staleFake(t *testing.T, v kernelVersion) *fakeKernel {
	t.Helper()
	k := useFake(t, 3)
	k.sys.version = v
	k.addPartition(0, 1, 2048, 2048)
	k.addPartition(0, 3, 8192, 2048)
	return k
}

// partitionsLeft returns the partitions device n shows in the fake's sysfs.
func partitionsLeft(t *testing.T, k *fakeKernel, n int) []int {
	t.Helper()
	parts, err := k.sys.stalePartitions(n)
	if err != nil {
		t.Fatal(err)
	}
	return parts
}

// TestStalePartitionsAttach: before binding a device that keeps partitions
// of an earlier binding, Attach deletes them under the device's lock, on
// kernels before 7.2; a partition in use makes the device not free, and
// without CAP_SYS_ADMIN nothing is bound over them.
func TestStalePartitionsAttach(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	t.Run("deleted", func(t *testing.T) {
		k := staleFake(t, kernelVersion{6, 12, 0})
		f := kerneltest.TempFile(t, 1<<20)
		d, err := k.sys.Attach(ctx, f.Name(), Options{})
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		if d.Number() != 0 {
			t.Fatalf("attached loop%d, want loop0", d.Number())
		}
		want := []string{"flock-ex /dev/loop0", "LOOP_GET_STATUS64 /dev/loop0", "BLKPG /dev/loop0", "BLKPG /dev/loop0", "LOOP_CONFIGURE /dev/loop0"}
		if got := k.calls("")[4:9]; !slices.Equal(got, want) {
			t.Fatalf("calls %q, want %q", got, want)
		}
		if parts := partitionsLeft(t, k, 0); len(parts) != 0 {
			t.Fatalf("partitions %v left", parts)
		}
	})
	t.Run("7.2 deletes them itself", func(t *testing.T) {
		k := staleFake(t, kernelVersion{7, 2, 0})
		f := kerneltest.TempFile(t, 1<<20)
		d, err := k.sys.Attach(ctx, f.Name(), Options{})
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		if got := k.calls("BLKPG"); len(got) != 0 {
			t.Fatalf("calls %q on a kernel that deletes them at detach", got)
		}
	})
	t.Run("in use", func(t *testing.T) {
		k := staleFake(t, kernelVersion{6, 1, 0})
		k.inUse = map[string]bool{"loop0p1": true}
		f := kerneltest.TempFile(t, 1<<20)
		d, err := k.sys.Attach(ctx, f.Name(), Options{})
		if err != nil {
			t.Fatal(err)
		}
		if d.Number() != 1 {
			t.Fatalf("attached loop%d, want loop1: loop0 is not free", d.Number())
		}
		if parts := partitionsLeft(t, k, 0); !slices.Equal(parts, []int{1, 3}) {
			t.Fatalf("loop0's partitions %v, want them as they were", parts)
		}
		checkAttached(t, k, d, f.Name())
	})
	t.Run("no CAP_SYS_ADMIN", func(t *testing.T) {
		k := staleFake(t, kernelVersion{5, 10, 0})
		k.noAdmin = true
		f := kerneltest.TempFile(t, 1<<20)
		d, err := k.sys.Attach(ctx, f.Name(), Options{})
		if err == nil {
			d.Close()
			t.Fatal("Attach bound over the partitions of an earlier binding")
		}
		if !errors.Is(err, fs.ErrPermission) || !strings.Contains(err.Error(), "/dev/loop0p1, /dev/loop0p3") {
			t.Fatalf("Attach = %v, want fs.ErrPermission naming the partitions", err)
		}
		checkNothingLeft(t, k)
	})
}

// TestStalePartitionsConfigure: Configure and SetFD delete the partitions
// an earlier binding left under the device's exclusive lock, and give
// back the lock the Device held; a partition in use, a caller without
// CAP_SYS_ADMIN and a lock held elsewhere leave the device as it was.
func TestStalePartitionsConfigure(t *testing.T) {
	t.Parallel()
	binds := []struct {
		name string
		bind func(d *Device, f *os.File) error
	}{
		{"Configure", func(d *Device, f *os.File) error { return d.Configure(f, Options{}) }},
		{"Configure LockShared", func(d *Device, f *os.File) error { return d.Configure(f, Options{Lock: LockShared}) }},
		{"SetFD", func(d *Device, f *os.File) error { return d.SetFD(f) }},
	}
	for _, b := range binds {
		t.Run(b.name, func(t *testing.T) {
			k := staleFake(t, kernelVersion{6, 12, 0})
			d := fakeDevice(t, k, 0)
			if err := b.bind(d, kerneltest.TempFile(t, 1<<20)); err != nil {
				t.Fatal(err)
			}
			if parts := partitionsLeft(t, k, 0); len(parts) != 0 {
				t.Fatalf("partitions %v left", parts)
			}
			if b.name == "Configure" && len(k.calls("BLKPG")) != 2 {
				t.Fatalf("BLKPG calls %q, want one a partition", k.calls("BLKPG"))
			}
			locks := k.calls("flock")
			want := []string{"flock-ex /dev/loop0", "flock-un /dev/loop0"}
			if b.name == "Configure LockShared" {
				want = []string{"flock-sh /dev/loop0", "flock-ex /dev/loop0", "flock-sh /dev/loop0"}
			}
			if !slices.Equal(locks, want) {
				t.Fatalf("locks %q, want %q", locks, want)
			}
		})
	}
	t.Run("probed for a moment", func(t *testing.T) {
		// udev has a partition open for a moment: tried again.
		k := staleFake(t, kernelVersion{6, 12, 0})
		k.failAt("BLKPG", 1, unix.EBUSY)
		d := fakeDevice(t, k, 0)
		if err := d.Configure(kerneltest.TempFile(t, 1<<20), Options{}); err != nil {
			t.Fatal(err)
		}
		if parts := partitionsLeft(t, k, 0); len(parts) != 0 {
			t.Fatalf("partitions %v left", parts)
		}
	})
	for _, tt := range []struct {
		name  string
		fault func(k *fakeKernel)
		is    error
		text  string
	}{
		{"in use", func(k *fakeKernel) { k.inUse = map[string]bool{"loop0p3": true} }, ErrBusy, "partition /dev/loop0p3 is in use"},
		{"no CAP_SYS_ADMIN", func(k *fakeKernel) { k.noAdmin = true }, fs.ErrPermission, "(/dev/loop0p1, /dev/loop0p3)"},
		{"locked elsewhere", func(k *fakeKernel) {
			for i := 1; i <= againTries+1; i++ {
				k.failAt("flock-ex", i, unix.EWOULDBLOCK)
			}
		}, ErrBusy, "another process holds a lock"},
	} {
		for _, b := range binds {
			t.Run(tt.name+"/"+b.name, func(t *testing.T) {
				k := staleFake(t, kernelVersion{6, 12, 0})
				tt.fault(k)
				d := fakeDevice(t, k, 0)
				err := b.bind(d, kerneltest.TempFile(t, 1<<20))
				var e *Error
				if !errors.Is(err, tt.is) || !errors.As(err, &e) || e.Path != "/dev/loop0" || !strings.Contains(err.Error(), tt.text) {
					t.Fatalf("%s = %v, want an *Error for /dev/loop0 matching %v, saying %q", b.name, err, tt.is, tt.text)
				}
				if b := k.bound(); len(b) != 0 {
					t.Fatalf("bound: %v", b)
				}
				if tt.name != "in use" {
					if parts := partitionsLeft(t, k, 0); !slices.Equal(parts, []int{1, 3}) {
						t.Fatalf("partitions %v, want them as they were", parts)
					}
				}
				if mode := LockMode(d.lock.mode.Load()); b.name == "Configure LockShared" && mode != LockNone {
					t.Fatalf("lock %v after a failed Configure, want the one held before", mode)
				}
			})
		}
	}
}

// TestStalePartitionsLinks: once a listing has shown a clean disk, a stat
// of the device's sysfs directory tells a clean disk from one with
// partitions, whose link count is higher.
func TestStalePartitionsLinks(t *testing.T) {
	t.Parallel()
	k := useFake(t, 3)
	k.sys.version = kernelVersion{6, 1, 0}
	if parts := partitionsLeft(t, k, 1); len(parts) != 0 || k.sys.cleanDiskLinks.Load() == 0 {
		t.Fatalf("partitions %v, clean link count %d: want none, and the count learnt", parts, k.sys.cleanDiskLinks.Load())
	}
	k.addPartition(2, 4, 1, 1)
	if parts := partitionsLeft(t, k, 2); !slices.Equal(parts, []int{4}) {
		t.Fatalf("partitions %v, want [4]", parts)
	}
	// A clean device's count is the one learnt: no listing needed (a
	// directory of another kind would list, and find it).
	if links, err := sysfs.DiskLinks(k.root, 0); err != nil || links != k.sys.cleanDiskLinks.Load() {
		t.Fatalf("links %d, %v; want %d", links, err, k.sys.cleanDiskLinks.Load())
	}
	if parts := partitionsLeft(t, k, 0); len(parts) != 0 {
		t.Fatalf("partitions %v", parts)
	}
}

// TestPartScanSteps: on a kernel that may scan a partition table twice in
// LOOP_CONFIGURE, FlagPartScan is set after the bind, once an open of the
// disk has run the scan the bind marked it for; elsewhere it is bound in
// one call. A failure of either step leaves nothing bound.
func TestPartScanSteps(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		v    kernelVersion
		want []string
	}{
		{kernelVersion{5, 10, 0}, []string{"LOOP_CONFIGURE /dev/loop0", "BLKGETDISKSEQ /dev/loop0"}},
		{kernelVersion{6, 1, 0}, []string{"LOOP_CONFIGURE /dev/loop0", "open /dev/loop0", "close /dev/loop0",
			"LOOP_SET_STATUS64 /dev/loop0", "BLKGETDISKSEQ /dev/loop0"}},
		{kernelVersion{6, 12, 50}, []string{"LOOP_CONFIGURE /dev/loop0", "open /dev/loop0", "close /dev/loop0",
			"LOOP_SET_STATUS64 /dev/loop0", "BLKGETDISKSEQ /dev/loop0"}},
		{kernelVersion{6, 12, 118}, []string{"LOOP_CONFIGURE /dev/loop0", "BLKGETDISKSEQ /dev/loop0"}},
		{kernelVersion{7, 2, 0}, []string{"LOOP_CONFIGURE /dev/loop0", "BLKGETDISKSEQ /dev/loop0"}},
	} {
		t.Run(fmt.Sprintf("%d.%d.%d", tt.v.major, tt.v.minor, tt.v.patch), func(t *testing.T) {
			k := useFake(t, 2)
			k.sys.version = tt.v
			var flagsBefore uint32
			k.actAt("LOOP_SET_STATUS64", 1, func(k *fakeKernel) { flagsBefore = k.devs[0].info.Flags }, nil)
			f := kerneltest.TempFile(t, 1<<20)
			d, err := k.sys.Attach(context.Background(), f.Name(), Options{Flags: FlagPartScan | FlagAutoClear, Ref: "owner"})
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			log := k.calls("")
			i := slices.Index(log, "LOOP_CONFIGURE /dev/loop0")
			if got := log[i : i+len(tt.want)]; !slices.Equal(got, tt.want) {
				t.Fatalf("calls %q, want %q", got, tt.want)
			}
			if flagsBefore&unix.LO_FLAGS_PARTSCAN != 0 {
				t.Fatal("bound with partscan before LOOP_SET_STATUS64")
			}
			st, err := d.Status()
			if err != nil || st.Flags != FlagPartScan|FlagAutoClear || st.Ref != "owner" {
				t.Fatalf("Status = %+v, %v; want partscan and autoclear, owner reference kept", st, err)
			}
		})
	}
	for _, step := range []string{"open /dev/loop0", "LOOP_SET_STATUS64"} {
		t.Run("fails at "+step, func(t *testing.T) {
			k := useFake(t, 2)
			k.sys.version = kernelVersion{6, 1, 0}
			nth := 1
			if step == "open /dev/loop0" {
				nth = 2 // the first is Attach's
			}
			k.failAt(step, nth, unix.EIO)
			f := kerneltest.TempFile(t, 1<<20)
			d, err := k.sys.Attach(context.Background(), f.Name(), Options{Flags: FlagPartScan})
			if err == nil {
				d.Close()
				t.Fatal("Attach succeeded")
			}
			if !errors.Is(err, unix.EIO) {
				t.Fatalf("Attach = %v, want EIO", err)
			}
			checkNothingLeft(t, k)
		})
	}
}

// TestRescanBusyFake: a table the kernel will not read again while a
// partition is in use is an error that names the partitions.
func TestRescanBusyFake(t *testing.T) {
	t.Parallel()
	k := useFake(t, 2)
	d, _ := bindFake(t, k, 1, Options{Flags: FlagPartScan})
	k.addPartition(1, 1, 2048, 2048)
	k.addPartition(1, 2, 8192, 2048)
	k.failAt("BLKRRPART", 1, unix.EBUSY)
	err := d.Rescan()
	if !errors.Is(err, ErrBusy) || !errors.Is(err, unix.EBUSY) || !strings.Contains(err.Error(), "partition /dev/loop1p1 or /dev/loop1p2 is in use") {
		t.Fatalf("Rescan = %v, want ErrBusy naming the partitions", err)
	}
}

// TestSetStatusPartScanFake: SetStatus turning FlagPartScan on, on a
// kernel whose LOOP_CONFIGURE marks the disk for a scan, opens the disk
// first, so that its own scan is the only one.
func TestSetStatusPartScanFake(t *testing.T) {
	t.Parallel()
	for _, v := range []kernelVersion{{6, 1, 0}, {7, 2, 0}} {
		k := useFake(t, 2)
		k.sys.version = v
		d, _ := bindFake(t, k, 1, Options{})
		st, err := d.Status()
		if err != nil {
			t.Fatal(err)
		}
		st.Flags |= FlagPartScan
		before := len(k.calls(""))
		if err := d.SetStatus(st); err != nil {
			t.Fatal(err)
		}
		opened := slices.Contains(k.calls("")[before:], "open /dev/loop1")
		if opened != !v.has(featScanOnce) {
			t.Errorf("%v: the disk opened before LOOP_SET_STATUS64: %t, want %t", v, opened, !v.has(featScanOnce))
		}
	}
}
