package sysfs

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

func TestPartitions(t *testing.T) {
	dir := t.TempDir()
	for _, name := range []string{"loop3p12", "loop3p1", "loop3p2", "loop3p01", "loop3p", "loop30p1", "loop3p1x", "holders", "loop"} {
		if err := os.Mkdir(filepath.Join(dir, name), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	got, err := Partitions(dir, 3)
	if want := []int{1, 2, 12}; err != nil || !slices.Equal(got, want) {
		t.Errorf("Partitions = %v, %v; want %v", got, err, want)
	}
	if name := PartitionName(3, 12); name != "loop3p12" {
		t.Errorf("PartitionName(3, 12) = %q", name)
	}
	if _, err := Partitions(filepath.Join(dir, "gone"), 3); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Partitions of a missing directory: %v, want fs.ErrNotExist", err)
	}
}

// TestDiskDir: the other directories are counted, loop/ and the
// partitions not, so that a directory's link count tells whether it has
// more.
func TestDiskDir(t *testing.T) {
	root := t.TempDir()
	dir := LoopDir(root, 3)
	for _, name := range []string{"", "queue", "holders", "power", "loop", "loop3p1", "loop3p4"} {
		if err := os.MkdirAll(filepath.Join(dir, name), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "size"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	parts, others, err := DiskDir(dir, 3)
	if err != nil || !slices.Equal(parts, []int{1, 4}) || others != 3 {
		t.Fatalf("DiskDir = %v, %d, %v; want [1 4], 3", parts, others, err)
	}
	links, err := DiskLinks(root, 3)
	if err != nil || links != uint64(2+others+len(parts)+1) {
		t.Fatalf("Links = %d, %v; want %d (loop/ and the partitions beyond the others)", links, err, 2+others+len(parts)+1)
	}
	for _, name := range []string{"loop", "loop3p1", "loop3p4"} {
		if err := os.Remove(filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	if links, err := DiskLinks(root, 3); err != nil || links != uint64(2+others) {
		t.Fatalf("Links of a clean disk = %d, %v; want %d", links, err, 2+others)
	}
	if _, err := DiskLinks(root, 4); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Links of a missing directory: %v", err)
	}
}
