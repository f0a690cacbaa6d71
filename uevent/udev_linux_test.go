package uevent

import (
	"maps"
	"os"
	"path/filepath"
	"testing"
)

// fakeUdev builds a sysfs tree with loop5 (7:5) and its partitions 1
// (259:0) and 2 (259:1), and an empty udev state directory.
func fakeUdev(t *testing.T) udev {
	t.Helper()
	u := udev{sysfs: t.TempDir(), udev: t.TempDir()}
	write := func(path, s string) {
		t.Helper()
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	dir := u.sysfs + "/block/loop5"
	write(dir+"/dev", "7:5\n")
	write(dir+"/loop5p1/dev", "259:0\n")
	write(dir+"/loop5p2/dev", "259:1\n")
	write(dir+"/loop/backing_file", "/img\n") // not a partition
	if err := os.MkdirAll(u.udev+"/data", 0o755); err != nil {
		t.Fatal(err)
	}
	return u
}

// TestUdevTargets: WaitUdev waits for the device and each partition, by
// device number, at their devpaths; nothing else in the directory counts.
func TestUdevTargets(t *testing.T) {
	t.Parallel()
	u := fakeUdev(t)
	want := map[string]udevTarget{
		"7:5":   {devpath: "/devices/virtual/block/loop5"},
		"259:0": {devpath: "/devices/virtual/block/loop5/loop5p1", part: 1},
		"259:1": {devpath: "/devices/virtual/block/loop5/loop5p2", part: 2},
	}
	if got := u.targets(5); !maps.Equal(got, want) {
		t.Fatalf("targets(5) = %v, want %v", got, want)
	}
	if got := u.targets(6); len(got) != 0 {
		t.Fatalf("targets of a missing device = %v, want none", got)
	}
}

// TestUdevDone: an entry is done when it carries the binding's
// by-diskseq link (with -partM for a partition), never an older
// binding's; before Linux 5.15 (seq 0), when an entry exists and udev's
// queue is empty.
func TestUdevDone(t *testing.T) {
	t.Parallel()
	u := fakeUdev(t)
	disk := udevTarget{devpath: "/devices/virtual/block/loop5"}
	part := udevTarget{devpath: disk.devpath + "/loop5p1", part: 1}
	entry := func(dev, s string) {
		t.Helper()
		if err := os.WriteFile(u.udev+"/data/b"+dev, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if u.done("7:5", disk, 42) || u.hasEntry("7:5") {
		t.Fatal("done, or an entry, without an entry")
	}
	entry("7:5", "S:disk/by-diskseq/41\nS:disk/by-diskseq/420\nE:ID_FS_TYPE=ext4\n")
	if !u.hasEntry("7:5") {
		t.Fatal("hasEntry false with an entry")
	}
	if u.done("7:5", disk, 42) {
		t.Fatal("done for 42 by an entry of bindings 41 and 420")
	}
	entry("7:5", "S:disk/by-diskseq/42\n")
	if !u.done("7:5", disk, 42) {
		t.Fatal("not done for 42 by an entry with its link")
	}
	entry("259:0", "S:disk/by-diskseq/42\n") // the disk's link, not the partition's
	if u.done("259:0", part, 42) {
		t.Fatal("partition done by the disk's link")
	}
	entry("259:0", "S:disk/by-diskseq/42-part1\n")
	if !u.done("259:0", part, 42) {
		t.Fatal("partition not done by its link")
	}

	// Before 5.15: an entry and an empty queue.
	if !u.done("7:5", disk, 0) {
		t.Fatal("seq 0: not done with an entry and no queue")
	}
	if err := os.WriteFile(u.udev+"/queue", nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if u.done("7:5", disk, 0) {
		t.Fatal("seq 0: done while udev has a queue")
	}
}

// TestUdevTrigger: trigger writes "change" to the device's uevent file.
func TestUdevTrigger(t *testing.T) {
	t.Parallel()
	u := fakeUdev(t)
	devpath := "/devices/virtual/block/loop5"
	if err := os.MkdirAll(u.sysfs+devpath, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(u.sysfs+devpath+"/uevent", nil, 0o644); err != nil {
		t.Fatal(err)
	}
	u.trigger(devpath)
	if b, err := os.ReadFile(u.sysfs + devpath + "/uevent"); err != nil || string(b) != "change" {
		t.Fatalf("uevent file = %q, %v; want \"change\"", b, err)
	}
}
