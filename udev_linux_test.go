package loopctl

import (
	"context"
	"errors"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/kerneltest"
)

// startFakeUdev makes k's udev state directory as a running udev has it:
// its control socket and its database.
func startFakeUdev(t *testing.T, k *fakeKernel) {
	t.Helper()
	if err := os.MkdirAll(k.sys.udev+"/data", 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(k.sys.udev+"/control", nil, 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestAttachWaitsForUdevRules: a device just made is root's until udev
// has applied its rules; Attach of a member of the disk group waits for
// udev's entry of the device, within its context, and then binds it.
func TestAttachWaitsForUdevRules(t *testing.T) {
	t.Parallel()
	k := useFake(t, 2)
	startFakeUdev(t, k)
	k.noAccess = true
	// udev processes the device's add event a moment later, and writes
	// its entry once the node is the disk group's.
	go func() {
		time.Sleep(20 * time.Millisecond)
		k.mu.Lock()
		k.noAccess = false
		k.mu.Unlock()
		os.WriteFile(k.sys.udev+"/data/.b7:0.tmp", []byte("E:ID_FS_TYPE=\n"), 0o644)
		os.Rename(k.sys.udev+"/data/.b7:0.tmp", k.sys.udev+"/data/b7:0")
	}()
	f := kerneltest.TempFile(t, 1<<20)
	d, err := k.sys.Attach(context.Background(), f.Name(), Options{Flags: FlagAutoClear})
	if err != nil {
		t.Fatal(err)
	}
	checkAttached(t, k, d, f.Name())

	// udev done with the device, the node still refused: no wait.
	k.noAccess = true
	start := time.Now()
	if _, err := k.sys.OpenDevice(0); !errors.Is(err, unix.EACCES) || time.Since(start) > udevPatience/2 {
		t.Fatalf("OpenDevice of a node udev left refused = %v after %v, want EACCES at once", err, time.Since(start))
	}
	// A device udev never gets to: the context ends the wait.
	os.Remove(k.sys.udev + "/data/b7:0")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel()
	_, err = k.sys.Attach(ctx, f.Name(), Options{})
	if !errors.Is(err, context.DeadlineExceeded) || !errors.Is(err, unix.EACCES) {
		t.Fatalf("Attach while udev never comes = %v, want the deadline and EACCES", err)
	}
	checkNothingLeft(t, k)
}

// TestAttachRefusedWithoutUdev: without udev, a refused node is an error
// at once.
func TestAttachRefusedWithoutUdev(t *testing.T) {
	t.Parallel()
	k := useFake(t, 2)
	k.noAccess = true
	f := kerneltest.TempFile(t, 1<<20)
	_, err := k.sys.Attach(context.Background(), f.Name(), Options{})
	if !errors.Is(err, unix.EACCES) {
		t.Fatalf("Attach = %v, want EACCES", err)
	}
	checkNothingLeft(t, k)
}
