package loopctl

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// attachFake attaches path with o on the fake kernel.
func attachFake(t *testing.T, k *fakeKernel, path string, o Options) *Device {
	t.Helper()
	d, err := k.sys.Attach(context.Background(), path, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

func TestAttachReuseFake(t *testing.T) {
	t.Parallel()
	k := useFake(t, 4)
	// Another binder's device: loop2, f from byte 4096 to 8192.
	_, f := bindFake(t, k, 2, Options{Offset: 4096, SizeLimit: 4096})
	configures := len(k.calls("LOOP_CONFIGURE"))

	d := attachFake(t, k, f.Name(), Options{Offset: 4096, SizeLimit: 4096, Reuse: true})
	if d.Number() != 2 || !d.Shared() {
		t.Fatalf("attached loop%d, shared %v; want loop2, shared", d.Number(), d.Shared())
	}
	if n := len(k.calls("LOOP_CONFIGURE")); n != configures {
		t.Fatal("bound a new device")
	}

	for name, o := range map[string]Options{
		"overlapping":         {Offset: 0, SizeLimit: 8192},
		"to the end":          {Offset: 6144},
		"read-only":           {Offset: 4096, SizeLimit: 4096, Flags: FlagReadOnly},
		"another block size":  {Offset: 4096, SizeLimit: 4096, BlockSize: 4096},
		"inside, smaller":     {Offset: 5120, SizeLimit: 1024},
		"whole file, no size": {},
	} {
		t.Run(name, func(t *testing.T) {
			o.Reuse = true
			before := len(k.calls("LOOP_CONFIGURE"))
			_, err := k.sys.Attach(context.Background(), f.Name(), o)
			var oe *OverlapError
			if !errors.Is(err, ErrOverlap) || !errors.As(err, &oe) || oe.Device != "/dev/loop2" ||
				oe.Status.Offset != 4096 || oe.Status.BackingFile != f.Name() || !strings.Contains(err.Error(), "/dev/loop2") {
				t.Fatalf("k.sys.Attach(%+v) = %v, want ErrOverlap naming /dev/loop2", o, err)
			}
			if len(k.calls("LOOP_CONFIGURE")) != before {
				t.Fatal("bound a device")
			}
		})
	}
	// Ranges that do not overlap are bound anew.
	for _, o := range []Options{{SizeLimit: 4096}, {Offset: 8192}} {
		o.Reuse = true
		if d := attachFake(t, k, f.Name(), o); d.Shared() || d.Number() == 2 {
			t.Fatalf("k.sys.Attach(%+v): loop%d, shared %v; want a device of its own", o, d.Number(), d.Shared())
		}
	}
	// Without Reuse, nothing changes.
	if d := attachFake(t, k, f.Name(), Options{Offset: 4096, SizeLimit: 4096}); d.Number() == 2 || d.Shared() {
		t.Fatalf("without Reuse: loop%d, shared %v", d.Number(), d.Shared())
	}
}

// TestAttachReuseRaces: the device found is torn down, or bound to another
// file, between the look and the open: Attach looks again, and binds a
// device of its own.
func TestAttachReuseRaces(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		name string
		race func(k *fakeKernel)
	}{
		{"torn down", func(k *fakeKernel) {
			d := k.devs[1]
			d.rundown = true
		}},
		{"bound anew", func(k *fakeKernel) {
			d := k.devs[1]
			d.info.Inode++
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			k := useFake(t, 3)
			_, f := bindFake(t, k, 1, Options{}) // open 1 of loop1
			// Open 2 is the probe's, 3 Attach's: the race comes between.
			k.actAt("open /dev/loop1", 3, func(k *fakeKernel) { tt.race(k) }, nil)
			d := attachFake(t, k, f.Name(), Options{Reuse: true})
			if d.Shared() || d.Number() == 1 {
				t.Fatalf("attached loop%d, shared %v; want a device of its own", d.Number(), d.Shared())
			}
			if n := k.counts["open /dev/loop1"]; n != 3 {
				t.Fatalf("%d opens of loop1, want the test's, the probe's and the one that lost the race", n)
			}
		})
	}
}

// TestAttachReuseReadOnlyFile: a read-only file makes a read-only device
// without FlagReadOnly; Reuse compares what the device will be.
func TestAttachReuseReadOnlyFile(t *testing.T) {
	t.Parallel()
	k := useFake(t, 3)
	_, f := bindFake(t, k, 1, Options{Flags: FlagReadOnly})
	ro, err := os.Open(f.Name())
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	d, err := k.sys.AttachFile(context.Background(), ro, Options{Reuse: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if d.Number() != 1 || !d.Shared() {
		t.Fatalf("loop%d, shared %v; want loop1, shared", d.Number(), d.Shared())
	}
	if _, err := k.sys.Attach(context.Background(), f.Name(), Options{Reuse: true}); !errors.Is(err, ErrOverlap) {
		t.Fatalf("read-write over a read-only binding = %v, want ErrOverlap", err)
	}
}

// TestAttachReuseComparesEverything: a device bound to the file's range
// otherwise than asked (a flag, direct I/O as the kernel gave it, the
// owner reference, the block size) is refused, with the difference named;
// one that differs only in what was left unsaid (PreferDirectIO, BlockSize
// 0) is shared.
func TestAttachReuseComparesEverything(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		name        string
		bound, want Options
		differs     string // "" to share
	}{
		{"same", Options{Flags: FlagAutoClear | FlagPartScan, Ref: "r"}, Options{Flags: FlagAutoClear | FlagPartScan, Ref: "r"}, ""},
		{"partscan asked", Options{}, Options{Flags: FlagPartScan}, "partscan off, asked on"},
		{"partscan not asked", Options{Flags: FlagPartScan}, Options{}, "partscan on, asked off"},
		{"autoclear asked", Options{}, Options{Flags: FlagAutoClear}, "autoclear off, asked on"},
		{"direct I/O asked", Options{}, Options{Flags: FlagDirectIO}, "direct I/O off, asked on"},
		{"direct I/O not asked", Options{Flags: FlagDirectIO}, Options{}, "direct I/O on, asked off"},
		{"direct I/O preferred, device has it", Options{Flags: FlagDirectIO}, Options{PreferDirectIO: true}, ""},
		{"direct I/O preferred, device lacks it", Options{}, Options{PreferDirectIO: true}, ""},
		{"block size asked", Options{}, Options{BlockSize: 4096}, "block size 512, asked 4096"},
		{"block size unsaid", Options{BlockSize: 4096}, Options{}, ""},
		{"another owner", Options{Ref: "theirs"}, Options{Ref: "mine"}, `owner reference "theirs", asked "mine"`},
		{"an owner, asked none", Options{Ref: "theirs"}, Options{}, `owner reference "theirs", asked none`},
		{"none, asked an owner", Options{}, Options{Ref: "mine"}, `asked "mine"`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			k := useFake(t, 3)
			_, f := bindFake(t, k, 1, tt.bound)
			configures := len(k.calls("LOOP_CONFIGURE"))
			o := tt.want
			o.Reuse = true
			d, err := k.sys.Attach(context.Background(), f.Name(), o)
			if tt.differs == "" {
				if err != nil || !d.Shared() || d.Number() != 1 {
					t.Fatalf("k.sys.Attach(%+v) over %+v = %v, %v; want loop1 shared", o, tt.bound, d, err)
				}
				d.Close()
				return
			}
			var oe *OverlapError
			if !errors.Is(err, ErrOverlap) || !errors.As(err, &oe) || oe.Device != "/dev/loop1" ||
				!strings.Contains(oe.Differs, tt.differs) || !strings.Contains(err.Error(), tt.differs) {
				t.Fatalf("k.sys.Attach(%+v) over %+v = %v; want ErrOverlap naming %q", o, tt.bound, err, tt.differs)
			}
			if n := len(k.calls("LOOP_CONFIGURE")); n != configures {
				t.Fatal("bound a device")
			}
		})
	}
}

// TestAttachReuseLock: a device shared is locked as asked, without
// waiting; another holder's lock is an error matching ErrBusy, and the
// device is not handed out.
func TestAttachReuseLock(t *testing.T) {
	t.Parallel()
	k := useFake(t, 3)
	_, f := bindFake(t, k, 1, Options{})
	d := attachFake(t, k, f.Name(), Options{Reuse: true, Lock: LockShared})
	if !d.Shared() || len(k.calls("flock-sh /dev/loop1")) != 1 {
		t.Fatalf("shared %v, locks %q; want loop1 shared, locked shared", d.Shared(), k.calls("flock-"))
	}
	k.failAt("flock-ex /dev/loop1", 1, unix.EWOULDBLOCK)
	if _, err := k.sys.Attach(context.Background(), f.Name(), Options{Reuse: true, Lock: LockExclusive}); !errors.Is(err, ErrBusy) ||
		!errors.Is(err, unix.EWOULDBLOCK) {
		t.Fatalf("Attach with Reuse and LockExclusive of a device locked elsewhere = %v, want ErrBusy", err)
	}
	if n := k.deviceHandles(); n != 2 { // the test's binder, and d
		t.Fatalf("%d device handles open, want 2", n)
	}
}
