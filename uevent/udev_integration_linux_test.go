//go:build integration

package uevent

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/loopctl/loopctl"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/kerneltest"
)

// labelled returns an image holding an ext4 file system labelled label,
// at offset into it.
func labelled(t *testing.T, label string, offset int64) *os.File {
	t.Helper()
	fs := filepath.Join(t.TempDir(), "fs.img")
	if err := os.WriteFile(fs, nil, 0o644); err != nil || os.Truncate(fs, 8<<20) != nil {
		t.Fatal(err)
	}
	kerneltest.MkfsExt4(t, fs, "-L", label)
	f := kerneltest.TempFile(t, offset+8<<20)
	src, err := os.Open(fs)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	if _, err := io.Copy(io.NewOffsetWriter(f, offset), src); err != nil {
		t.Fatal(err)
	}
	return f
}

// TestKernelWaitUdev: once WaitUdev returns, /dev/disk/by-label/LABEL
// names the device, or its partition, a hundred times in a row.
func TestKernelWaitUdev(t *testing.T) {
	kerneltest.Udevd(t)
	// The tests before may have given udev events to work through:
	// WaitUdev is timed from an idle udev.
	kerneltest.SettleUdev(t)
	label := fmt.Sprintf("LCTL%d", os.Getpid()%100000)
	link := "/dev/disk/by-label/" + label
	for _, withPart := range []bool{false, true} {
		t.Run(fmt.Sprint("partition=", withPart), func(t *testing.T) {
			offset := int64(0)
			if withPart {
				offset = 1 << 20
			}
			f := labelled(t, label, offset)
			for i := range 100 {
				d, err := loopctl.AttachFile(context.Background(), f, loopctl.Options{Flags: loopctl.FlagPartScan})
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { detach(t, d) }) // on failure; Detach below otherwise
				want := d.Path()
				release := func() {}
				if withPart {
					// udev re-reads a disk's partition table
					// (BLKRRPART) when a writer closes it, the
					// previous round's maybe, and would drop a
					// partition added by hand; a shared lock, which
					// udev's probes share, tells it to leave the
					// table alone, as systemd's locking protocol has
					// it.
					release = kerneltest.LockNode(t, d.Path(), unix.LOCK_SH)
					// This machine's kernel reads no partition table:
					// the partition is added as a partitioning tool does.
					if out, err := exec.Command("addpart", d.Path(), "1", "2048", "16384").CombinedOutput(); err != nil {
						t.Fatalf("addpart: %v: %s", err, out)
					}
					want += "p1"
				}
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				err = WaitUdev(ctx, d)
				cancel()
				if err != nil {
					t.Fatal(err)
				}
				got, err := filepath.EvalSymlinks(link)
				if err != nil || got != want {
					_, perr := os.Stat(want)
					t.Fatalf("round %d: %s is %q, %v once WaitUdev returned; want %s (%v)", i, link, got, err, want, perr)
				}
				release()
				if i == 0 {
					// Again, udev's messages long gone: its database tells,
					// or, for the partition, whose entry has no by-diskseq
					// link (there is no partition table), udev is asked
					// to process it again.
					ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
					err := WaitUdev(ctx, d)
					cancel()
					if err != nil {
						t.Fatalf("WaitUdev once more: %v", err)
					}
				}
				if err := d.Detach(context.Background()); err != nil {
					t.Fatal(err)
				}
			}
		})
	}
}

// TestKernelWaitUdevNone: without udev, WaitUdev returns at once.
func TestKernelWaitUdevNone(t *testing.T) {
	kerneltest.Require(t)
	none := udev{sysfs: "/sys", udev: t.TempDir()} // no control socket: no udev
	d := attachT(t, kerneltest.TempFile(t, 1<<20).Name(), loopctl.Options{})
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // it must not even wait
	if err := none.wait(ctx, d); err != nil {
		t.Fatalf("WaitUdev without udev = %v", err)
	}
}
