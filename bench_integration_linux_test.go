//go:build integration

package loopctl

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/loopctl/loopctl/internal/kerneltest"
	"github.com/loopctl/loopctl/internal/sysfs"
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
	kerneltest.Require(b)
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
	kerneltest.Require(b)
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

// BenchmarkAttachPartScan is the cycle of BenchmarkAttachDetach with
// FlagPartScan, of an image with one MBR partition, which kernels with
// its parser find at each bind and drop at each detach: as the package
// binds on this kernel, and, to compare, in one LOOP_CONFIGURE and in
// two calls (LOOP_CONFIGURE, then LOOP_SET_STATUS64), as it binds where
// LOOP_CONFIGURE may scan twice (featScanOnce).
func BenchmarkAttachPartScan(b *testing.B) {
	kerneltest.Require(b)
	const size = 8 << 20
	f, err := os.OpenFile(benchFile(b), os.O_RDWR, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		b.Fatal(err)
	}
	if err := writeMBR(f, size, []part{{start: 2048, sectors: 4096}}); err != nil {
		b.Fatal(err)
	}
	for _, m := range []struct {
		name    string
		version kernelVersion
	}{
		{"as bound here", kernelVersion{}},
		{"one call", newestKernel},
		{"two calls", kernelVersion{6, 1, 0}},
	} {
		b.Run(m.name, func(b *testing.B) {
			s := newSystem(osKernel{}, sysfs.Root)
			s.version = m.version
			defer s.resetShared()
			b.ReportAllocs()
			for b.Loop() {
				d, err := s.attachFile(context.Background(), f, Options{Flags: FlagPartScan})
				if err != nil {
					b.Fatal(err)
				}
				if err := d.ClearFD(); err != nil {
					b.Fatal(err)
				}
				d.Close()
			}
		})
	}
}

func BenchmarkStatus(b *testing.B) {
	kerneltest.Require(b)
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
	kerneltest.Require(b)
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

// BenchmarkListUnbound lists with 4,096 devices of its own on the
// machine, none of them bound: a look's cost, which grows with the bound
// devices, here a path lookup in sysfs a device.
func BenchmarkListUnbound(b *testing.B) {
	kerneltest.Require(b)
	c, err := Open()
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	nums := addDevices(b, c, 4096)
	b.Cleanup(func() { removeAll(b, c, nums) })
	b.ReportAllocs()
	for b.Loop() {
		if _, err := List(); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkAttachConcurrent measures attach throughput: attachers
// goroutines each loop Attach, ClearFD, Close on a file of their own, with
// and without a second process doing the same with 8 goroutines, and with
// the attach lock (this process's turn and the control device's flock) and
// without it (lost races retried, nothing else).
func BenchmarkAttachConcurrent(b *testing.B) {
	kerneltest.Require(b)
	for _, lock := range []bool{true, false} {
		for _, contended := range []bool{false, true} {
			for _, attachers := range []int{1, 8, 32} {
				name := fmt.Sprintf("lock=%v/second-process=%v/attachers=%d", lock, contended, attachers)
				b.Run(name, func(b *testing.B) {
					s := newSystem(osKernel{}, sysfs.Root)
					s.noAttachLock = !lock
					defer s.resetShared()
					if contended {
						stop := startContender(b, lock)
						defer stop()
					}
					benchAttachers(b, s, attachers)
				})
			}
		}
	}
}

// benchAttachers runs b.N attach cycles shared among n goroutines.
func benchAttachers(b *testing.B, s *system, n int) {
	var files []*os.File
	for range n {
		f, err := os.OpenFile(benchFile(b), os.O_RDWR, 0)
		if err != nil {
			b.Fatal(err)
		}
		defer f.Close()
		files = append(files, f)
	}
	var next atomic.Int64
	var wg sync.WaitGroup
	b.ResetTimer()
	start := time.Now()
	for _, f := range files {
		wg.Go(func() {
			for next.Add(1) <= int64(b.N) {
				d, err := s.AttachFile(context.Background(), f, Options{})
				if err != nil {
					b.Error(err)
					return
				}
				if err := d.ClearFD(); err != nil {
					b.Error(err)
				}
				d.Close()
			}
		})
	}
	wg.Wait()
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "attaches/s")
}

// contenderEnv runs the test binary as a second process that attaches and
// detaches until its standard input closes; its value is "true" or
// "false", whether it takes the attach lock.
const contenderEnv = "LOOPCTL_CONTENDER"

// startContender starts a second process churning; stop ends it and waits.
func startContender(b *testing.B, lock bool) (stop func()) {
	cmd := exec.Command(os.Args[0], "-test.run=^TestKernelContender$", "-test.count=1")
	cmd.Env = append(os.Environ(), contenderEnv+"="+strconv.FormatBool(lock))
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	return func() {
		stdin.Close()
		if err := cmd.Wait(); err != nil {
			b.Errorf("second process: %v", err)
		}
	}
}

// TestKernelContender is the second process of BenchmarkAttachConcurrent,
// run only as such; alone it checks that its loop ends with its input.
func TestKernelContender(t *testing.T) {
	mode, input := os.Getenv(contenderEnv), io.Reader(os.Stdin)
	if mode == "" {
		kerneltest.Require(t)
		mode, input = "true", strings.NewReader("") // one round each
	}
	s := newSystem(osKernel{}, sysfs.Root)
	s.noAttachLock = mode != "true"
	defer s.resetShared()
	done := make(chan struct{})
	go func() {
		io.Copy(io.Discard, input)
		close(done)
	}()
	var wg sync.WaitGroup
	var rounds atomic.Int64
	for range 8 {
		path := filepath.Join(t.TempDir(), "contender.img")
		if err := os.WriteFile(path, make([]byte, 1<<20), 0o644); err != nil {
			t.Fatal(err)
		}
		wg.Go(func() {
			for {
				d, err := s.Attach(context.Background(), path, Options{Flags: FlagAutoClear})
				if err != nil {
					t.Error(err)
					return
				}
				d.Close()
				rounds.Add(1)
				select {
				case <-done:
					return
				default:
				}
			}
		})
	}
	wg.Wait()
	if rounds.Load() < 8 {
		t.Fatalf("%d rounds", rounds.Load())
	}
}

// BenchmarkReuseLookup is what Reuse adds to an Attach: a look through
// every loop device for the file's, here with 256 bound devices of the
// benchmark's own, none of them the file's.
func BenchmarkReuseLookup(b *testing.B) {
	kerneltest.Require(b)
	bound := benchFile(b)
	for range 256 {
		benchAttach(b, bound)
	}
	f, err := os.Open(benchFile(b))
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	rc, err := f.SyscallConn()
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		var d *Device
		// Internal: the look alone, without the bind a miss leads to.
		rc.Control(func(fd uintptr) { d, err = host.sharedDevice(fd, f.Name(), Options{Reuse: true}) })
		if d != nil || err != nil {
			b.Fatal(d, err)
		}
	}
}
