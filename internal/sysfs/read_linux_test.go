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
