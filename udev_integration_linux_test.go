//go:build integration && !loopctl_stub

package loopctl

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// udevd makes sure systemd-udevd runs for the test: the one already
// running, or one the test starts and stops by its pid; it skips the test
// where Debian's udev is not installed.
func udevd(t *testing.T) {
	t.Helper()
	requireKernel(t)
	if _, err := os.Stat("/run/udev/control"); err == nil {
		return
	}
	const bin = "/lib/systemd/systemd-udevd"
	if _, err := os.Stat(bin); err != nil {
		t.Skip("udev is not installed (apt-get install udev); CI runs the tests with it once")
	}
	cmd := exec.Command(bin)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		os.RemoveAll("/run/udev")
	})
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if _, err := os.Stat("/run/udev/control"); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("systemd-udevd did not start")
		}
	}
}

// labelled returns an image holding an ext4 file system labelled label,
// at offset into it.
func labelled(t *testing.T, label string, offset int64) *os.File {
	t.Helper()
	fs := filepath.Join(t.TempDir(), "fs.img")
	if err := os.WriteFile(fs, nil, 0o644); err != nil || os.Truncate(fs, 8<<20) != nil {
		t.Fatal(err)
	}
	mkfsExt4(t, fs, "-L", label)
	f := tempFile(t, offset+8<<20)
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
	udevd(t)
	// The tests before have given udev thousands of events, which it
	// works through at a few hundred a second on two cores: WaitUdev is
	// timed from an idle udev.
	if out, err := exec.Command("udevadm", "settle", "--timeout=600").CombinedOutput(); err != nil {
		t.Fatalf("udevadm settle: %v: %s", err, out)
	}
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
				d, err := AttachFile(context.Background(), f, Options{Flags: FlagPartScan})
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
					release = lockShared(t, d.Path())
					// This machine's kernel reads no partition table:
					// the partition is added as a partitioning tool does.
					if out, err := exec.Command("addpart", d.Path(), "1", "2048", "16384").CombinedOutput(); err != nil {
						t.Fatalf("addpart: %v: %s", err, out)
					}
					want += "p1"
				}
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				err = d.WaitUdev(ctx)
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
					err := d.WaitUdev(ctx)
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
	requireKernel(t)
	defer func(old string) { udevRoot = old }(udevRoot)
	udevRoot = t.TempDir() // no control socket: no udev
	d := attachT(t, tempFile(t, 1<<20).Name(), Options{})
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // it must not even wait
	if err := d.WaitUdev(ctx); err != nil {
		t.Fatalf("WaitUdev without udev = %v", err)
	}
}

// lockShared takes a shared lock (flock) of the device at path, on a
// read-only descriptor of its own, and returns what releases it (once,
// however often it is called).
func lockShared(t *testing.T, path string) func() {
	t.Helper()
	return lockNode(t, path, unix.LOCK_SH)
}

// lockExclusive takes an exclusive flock of the node at path, waiting for
// any holder of a shared one (udev probing), and returns its release.
func lockExclusive(t *testing.T, path string) func() {
	t.Helper()
	return lockNode(t, path, unix.LOCK_EX)
}

// lockNode takes flock how of the node at path, on a read-only descriptor
// of its own, and returns what releases it (once, however often it is
// called).
func lockNode(t *testing.T, path string, how int) func() {
	t.Helper()
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Flock(fd, how); err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	var once sync.Once
	return func() { once.Do(func() { unix.Close(fd) }) }
}
