//go:build !loopctl_stub

package loopctl

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"
)

// attachFake attaches path with o on the fake kernel.
func attachFake(t *testing.T, path string, o Options) *Device {
	t.Helper()
	d, err := Attach(context.Background(), path, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

func TestAttachReuseFake(t *testing.T) {
	k := useFake(t, 4)
	// Another binder's device: loop2, f from byte 4096 to 8192.
	_, f := bindFake(t, k, 2, Options{Offset: 4096, SizeLimit: 4096})
	configures := len(k.calls("LOOP_CONFIGURE"))

	d := attachFake(t, f.Name(), Options{Offset: 4096, SizeLimit: 4096, Reuse: true})
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
			_, err := Attach(context.Background(), f.Name(), o)
			var oe *OverlapError
			if !errors.Is(err, ErrOverlap) || !errors.As(err, &oe) || oe.Device != "/dev/loop2" ||
				oe.Status.Offset != 4096 || oe.Status.BackingFile != f.Name() || !strings.Contains(err.Error(), "/dev/loop2") {
				t.Fatalf("Attach(%+v) = %v, want ErrOverlap naming /dev/loop2", o, err)
			}
			if len(k.calls("LOOP_CONFIGURE")) != before {
				t.Fatal("bound a device")
			}
		})
	}
	// Ranges that do not overlap are bound anew.
	for _, o := range []Options{{SizeLimit: 4096}, {Offset: 8192}} {
		o.Reuse = true
		if d := attachFake(t, f.Name(), o); d.Shared() || d.Number() == 2 {
			t.Fatalf("Attach(%+v): loop%d, shared %v; want a device of its own", o, d.Number(), d.Shared())
		}
	}
	// Without Reuse, nothing changes.
	if d := attachFake(t, f.Name(), Options{Offset: 4096, SizeLimit: 4096}); d.Number() == 2 || d.Shared() {
		t.Fatalf("without Reuse: loop%d, shared %v", d.Number(), d.Shared())
	}
}

// TestAttachReuseRaces: the device found is torn down, or bound to another
// file, between the look and the open: Attach looks again, and binds a
// device of its own.
func TestAttachReuseRaces(t *testing.T) {
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
			d := attachFake(t, f.Name(), Options{Reuse: true})
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
	k := useFake(t, 3)
	_, f := bindFake(t, k, 1, Options{Flags: FlagReadOnly})
	ro, err := os.Open(f.Name())
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	d, err := AttachFile(context.Background(), ro, Options{Reuse: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if d.Number() != 1 || !d.Shared() {
		t.Fatalf("loop%d, shared %v; want loop1, shared", d.Number(), d.Shared())
	}
	if _, err := Attach(context.Background(), f.Name(), Options{Reuse: true}); !errors.Is(err, ErrOverlap) {
		t.Fatalf("read-write over a read-only binding = %v, want ErrOverlap", err)
	}
}
