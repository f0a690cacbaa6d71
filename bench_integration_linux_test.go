//go:build integration && !loopctl_stub

package loopctl

import (
	"context"
	"os"
	"path/filepath"
	"testing"
)

func benchFile(b *testing.B) string {
	b.Helper()
	path := filepath.Join(b.TempDir(), "bench.img")
	if err := os.WriteFile(path, make([]byte, 1<<20), 0o644); err != nil {
		b.Fatal(err)
	}
	return path
}

// benchAttach attaches path for the benchmark, detached when it ends.
func benchAttach(b *testing.B, path string) *Device {
	b.Helper()
	d, err := Attach(context.Background(), path, Options{})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		d.ClearFD()
		d.Close()
	})
	return d
}

func BenchmarkGetFree(b *testing.B) {
	requireKernel(b)
	c, err := Open()
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := c.GetFree(); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkAttachDetach is one whole cycle: Attach (GET_FREE, open, flock,
// LOOP_CONFIGURE, unlock), ClearFD, Close.
func BenchmarkAttachDetach(b *testing.B) {
	requireKernel(b)
	f, err := os.OpenFile(benchFile(b), os.O_RDWR, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	b.ReportAllocs()
	for b.Loop() {
		d, err := AttachFile(context.Background(), f, Options{})
		if err != nil {
			b.Fatal(err)
		}
		if err := d.ClearFD(); err != nil {
			b.Fatal(err)
		}
		d.Close()
	}
}

func BenchmarkStatus(b *testing.B) {
	requireKernel(b)
	d := benchAttach(b, benchFile(b))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := d.Status(); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkList lists the machine's bound devices, with 16 of its own.
func BenchmarkList(b *testing.B) {
	requireKernel(b)
	path := benchFile(b)
	for range 16 {
		benchAttach(b, path)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := List(); err != nil {
			b.Fatal(err)
		}
	}
}
