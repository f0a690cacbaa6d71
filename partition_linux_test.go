//go:build !loopctl_stub

package loopctl

import (
	"errors"
	"io/fs"
	"os"
	"slices"
	"strings"
	"testing"
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
