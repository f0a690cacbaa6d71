//go:build integration

package uevent

import (
	"context"
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/loopctl/loopctl"
	"github.com/loopctl/loopctl/internal/kerneltest"
)

// BenchmarkMonitorLatency times a Monitor's report of a bind: from the
// return of the Attach that bound the device to the return of Next with
// its EventBound.
func BenchmarkMonitorLatency(b *testing.B) {
	kerneltest.Require(b)
	m, err := Open()
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	f := kerneltest.TempFile(b, 1<<20)
	var waited time.Duration
	ctx := context.Background()
	for b.Loop() {
		d, err := loopctl.AttachFile(ctx, f, loopctl.Options{})
		if err != nil {
			b.Fatal(err)
		}
		start := time.Now()
		for {
			e, err := m.Next(ctx)
			if err != nil {
				b.Fatal(err)
			}
			if e.Kind == EventBound && e.Number == d.Number() {
				break
			}
		}
		waited += time.Since(start)
		if err := d.Detach(ctx); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(waited.Nanoseconds())/float64(b.N), "ns/event")
}

// BenchmarkWaitUdev times, after a bind, the wait for udev: WaitUdev, for
// the device alone, against `udevadm settle`, for every event of the
// machine. It needs udev running.
func BenchmarkWaitUdev(b *testing.B) {
	kerneltest.Require(b)
	if _, err := os.Stat("/run/udev/control"); err != nil {
		b.Skip("udev is not running")
	}
	f := kerneltest.TempFile(b, 1<<20)
	for _, way := range []string{"WaitUdev", "udevadm-settle"} {
		b.Run(way, func(b *testing.B) {
			ctx := context.Background()
			var waited time.Duration
			for b.Loop() {
				d, err := loopctl.AttachFile(ctx, f, loopctl.Options{})
				if err != nil {
					b.Fatal(err)
				}
				start := time.Now()
				if way == "WaitUdev" {
					err = WaitUdev(ctx, d)
				} else {
					err = exec.Command("udevadm", "settle").Run()
				}
				waited += time.Since(start)
				if err != nil {
					b.Fatal(err)
				}
				if err := d.Detach(ctx); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(waited.Nanoseconds())/float64(b.N), "ns/wait")
		})
	}
}
