//go:build integration

package loopctl

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/loopctl/loopctl/internal/kerneltest"
	"golang.org/x/sys/unix"
)

func TestKernelControl(t *testing.T) {
	c := openControl(t)
	n, err := c.Add(AnyNumber)
	if err != nil || n < 0 {
		t.Fatalf("Add(AnyNumber) = %d, %v", n, err)
	}
	// The node appears at once.
	if fi, err := os.Stat(DevicePath(n)); err != nil || fi.Mode()&fs.ModeDevice == 0 {
		t.Fatalf("after Add: %v, %v", fi, err)
	}
	_, err = c.Add(n)
	wantErrno(t, err, unix.EEXIST, fs.ErrExist)
	if err.(*Error).Path != DevicePath(n) {
		t.Fatalf("EEXIST names %q", err.(*Error).Path)
	}
	if err := c.Remove(n); err != nil {
		t.Fatal(err)
	}
	wantErrno(t, c.Remove(n), unix.ENODEV, fs.ErrNotExist)
}

func TestKernelHighestNumber(t *testing.T) {
	c := openControl(t)
	n, err := c.Add(MaxNumber)
	if err != nil || n != MaxNumber {
		t.Fatalf("Add(MaxNumber) = %d, %v", n, err)
	}
	if err := c.Remove(MaxNumber); err != nil {
		t.Fatal(err)
	}
	// What Add and Remove refuse in Go, the kernel refuses too, since 6.1
	// at the latest. Not a probe to make on 5.10: it takes LOOP_CTL_ADD
	// 1<<20, making a device whose number overflows the minor range into
	// another major's, and LOOP_CTL_REMOVE -1, removing whatever unbound
	// device it finds first.
	if !kerneltest.AtLeast(t, 6, 1) {
		t.Logf("kernel %s: not probing LOOP_CTL_ADD %d and LOOP_CTL_REMOVE -1", kerneltest.Release(), MaxNumber+1)
		return
	}
	if _, err := ioctl(c.h, reqCtlAdd, MaxNumber+1); err != unix.EINVAL {
		t.Fatalf("kernel LOOP_CTL_ADD %d: %v, want EINVAL", MaxNumber+1, err)
	}
	minusOne := -1
	if _, err := ioctl(c.h, reqCtlRemove, uintptr(minusOne)); err != unix.EINVAL {
		t.Fatalf("kernel LOOP_CTL_REMOVE -1: %v, want EINVAL", err)
	}
}

func TestKernelRemoveBusy(t *testing.T) {
	c := openControl(t)
	d := newDevice(t, c)
	wantErrno(t, c.Remove(d.Number()), unix.EBUSY, ErrBusy) // open
	if err := d.SetFD(kerneltest.TempFile(t, 1<<20)); err != nil {
		t.Fatal(err)
	}
	wantErrno(t, c.Remove(d.Number()), unix.EBUSY, ErrBusy) // bound
}

func TestKernelGetFree(t *testing.T) {
	c := openControl(t)
	n, err := c.GetFree()
	if err != nil || n < 0 {
		t.Fatalf("GetFree = %d, %v", n, err)
	}
	d, err := OpenDevice(n)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	_, err = d.Status()
	wantErrno(t, err, unix.ENXIO, ErrNotBound)
}

func TestKernelGetFreeAllocatesNothing(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector's bookkeeping allocates")
	}
	c := openControl(t)
	if a := testing.AllocsPerRun(1000, func() {
		if _, err := c.GetFree(); err != nil {
			t.Fatal(err)
		}
	}); a != 0 {
		t.Fatalf("GetFree allocates %v times per call", a)
	}
}

// TestKernelLockAllocatesNothing: the four flocks of an Attach allocate
// nothing, as ioctls do.
func TestKernelLockAllocatesNothing(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector's bookkeeping allocates")
	}
	c := openControl(t)
	if a := testing.AllocsPerRun(1000, func() {
		if err := c.h.flock(unix.LOCK_EX | unix.LOCK_NB); err != nil {
			t.Fatal(err)
		}
		if err := c.h.flock(unix.LOCK_UN); err != nil {
			t.Fatal(err)
		}
	}); a != 0 {
		t.Fatalf("a flock and its release allocate %v times", a)
	}
}

// TestKernelControlClose: calls racing a Control's Close end with
// fs.ErrClosed (never another errno, never another file), the descriptor
// is closed once they have returned, with no garbage collection, and
// Controls opened and closed by the thousand leave no descriptor behind.
func TestKernelControlClose(t *testing.T) {
	kerneltest.Require(t)
	c, err := Open()
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for {
				_, err := c.GetFree()
				if err == nil {
					continue
				}
				if !errors.Is(err, fs.ErrClosed) {
					t.Errorf("GetFree racing Close: %v", err)
				}
				return
			}
		})
	}
	fd := c.h.(*fileHandle).fd
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	var now unix.Stat_t
	if err := unix.Fstat(fd, &now); err == nil && now.Rdev == st.Rdev && now.Ino == st.Ino {
		t.Fatalf("descriptor %d is still the control device after Close and the calls racing it", fd)
	}
	runtime.KeepAlive(c)

	before := filesOpen(t)
	for range 1000 {
		c, err := Open()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.GetFree(); err != nil {
			t.Fatal(err)
		}
		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
		runtime.KeepAlive(c)
	}
	if left := leftOpen(t, before); len(left) != 0 {
		t.Fatalf("1,000 Controls opened and closed left descriptors %v open", left)
	}
}

// TestKernelNotRoot runs the package's calls as an unprivileged user.
func TestKernelNotRoot(t *testing.T) {
	if s := os.Getenv("LOOPCTL_AS_NOBODY"); s != "" {
		_, err := Open()
		if !errors.Is(err, fs.ErrPermission) {
			t.Fatalf("Open as nobody: %v, want fs.ErrPermission", err)
		}
		n, _ := strconv.Atoi(s)
		_, err = OpenDevice(n)
		if !errors.Is(err, fs.ErrPermission) {
			t.Fatalf("OpenDevice as nobody: %v, want fs.ErrPermission", err)
		}
		// List and FindByBackingFile read sysfs instead of the devices,
		// and give what root gets from the device itself, but for the
		// owner reference, which is only in the device.
		want := os.Getenv("LOOPCTL_AS_NOBODY_WANT")
		list, err := List()
		if err != nil {
			t.Fatalf("List as nobody: %v", err)
		}
		found, err := FindByBackingFile(os.Getenv("LOOPCTL_AS_NOBODY_FILE"))
		if err != nil || len(found) != 1 || fmt.Sprintf("%+v", found[0]) != want {
			t.Fatalf("FindByBackingFile as nobody = %+v, %v; want [%s]", found, err, want)
		}
		for _, s := range list {
			if s.Number == n {
				if got := fmt.Sprintf("%+v", s); got != want {
					t.Fatalf("List as nobody: %s, want (as root) %s", got, want)
				}
				return
			}
		}
		t.Fatalf("List as nobody lacks device %d: %+v", n, list)
	}
	d := newDevice(t, openControl(t)) // one that surely exists
	// Run this test binary again as nobody, from a place nobody can read.
	dir, err := os.MkdirTemp("", "loopctl-nobody")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	// Bind a file nobody may stat (for List's backing device and inode).
	file := filepath.Join(dir, "backing.img")
	if err := os.WriteFile(file, make([]byte, 1<<16), 0o644); err != nil {
		t.Fatal(err)
	}
	bf, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer bf.Close()
	if err := d.Configure(bf, Options{Offset: 512, SizeLimit: 8192, Flags: FlagReadOnly | FlagPartScan, BlockSize: 4096}); err != nil {
		t.Fatal(err)
	}
	defer d.ClearFD()
	var want string
	if found, err := FindByBackingFile(file); err != nil || len(found) != 1 {
		t.Fatalf("FindByBackingFile as root = %+v, %v", found, err)
	} else {
		found[0].Ref = ""
		want = fmt.Sprintf("%+v", found[0])
	}
	bin := filepath.Join(dir, "loopctl.test")
	exe, err := os.ReadFile("/proc/self/exe")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, exe, 0o755); err != nil || os.Chmod(dir, 0o755) != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-test.run=^TestKernelNotRoot$", "-test.v")
	cmd.Env = append(os.Environ(), "LOOPCTL_AS_NOBODY="+strconv.Itoa(d.Number()),
		"LOOPCTL_AS_NOBODY_WANT="+want, "LOOPCTL_AS_NOBODY_FILE="+file)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil || !strings.Contains(out.String(), "--- PASS: TestKernelNotRoot") {
		t.Fatalf("as nobody: %v\n%s", err, out.String())
	}
}

func TestKernelConcurrent(t *testing.T) {
	c := openControl(t)
	d := newDevice(t, c)
	if err := d.Configure(kerneltest.TempFile(t, 1<<20), Options{}); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 200 {
				if _, err := c.GetFree(); err != nil {
					t.Error(err)
					return
				}
				if s, err := d.Status(); err != nil || s.Number != d.Number() {
					t.Error(s, err)
					return
				}
			}
		})
	}
	wg.Wait()

	// Close while calls are in flight: each call succeeds or reports
	// fs.ErrClosed, never another descriptor's answer.
	c2, err := Open()
	if err != nil {
		t.Fatal(err)
	}
	d2, err := OpenDevice(d.Number())
	if err != nil {
		t.Fatal(err)
	}
	start := make(chan struct{})
	for range 4 {
		wg.Go(func() {
			<-start
			for range 100000 {
				_, err1 := c2.GetFree()
				_, err2 := d2.Status()
				if err1 != nil && !errors.Is(err1, fs.ErrClosed) || err2 != nil && !errors.Is(err2, fs.ErrClosed) {
					t.Error(err1, err2)
					return
				}
				if err1 != nil && err2 != nil {
					return
				}
			}
			t.Error("calls did not see Close")
		})
	}
	close(start)
	c2.Close()
	d2.Close()
	wg.Wait()
}

func TestKernelCloexecAndNoLeak(t *testing.T) {
	c := openControl(t)
	d := newDevice(t, c)
	f := kerneltest.TempFile(t, 1<<20)
	before := kerneltest.OpenFDs(t)

	c2, err := Open()
	if err != nil {
		t.Fatal(err)
	}
	d2, err := OpenDevicePath(d.Path())
	if err != nil {
		t.Fatal(err)
	}
	found := 0
	for fd, target := range kerneltest.OpenFDs(t) {
		if target != ControlPath && target != d.Path() {
			continue
		}
		info, err := os.ReadFile("/proc/self/fdinfo/" + strconv.Itoa(fd))
		if err != nil {
			t.Fatal(err)
		}
		var flags uint64
		for _, line := range strings.Split(string(info), "\n") {
			if v, ok := strings.CutPrefix(line, "flags:"); ok {
				flags, _ = strconv.ParseUint(strings.TrimSpace(v), 8, 64)
			}
		}
		if flags&unix.O_CLOEXEC == 0 {
			t.Errorf("fd %d (%s) lacks O_CLOEXEC: flags %o", fd, target, flags)
		}
		found++
	}
	if found < 3 { // c, c2 on loop-control; d, d2 on the device
		t.Fatalf("found %d loop fds", found)
	}

	// Successes and failures alike leave no descriptor behind.
	if err := d2.Configure(f, Options{}); err != nil {
		t.Fatal(err)
	}
	d2.Status()
	d2.Configure(f, Options{})
	d2.ClearFD()
	d2.ClearFD()
	c2.GetFree()
	c2.Remove(MaxNumber)
	c2.Close()
	d2.Close()
	OpenDevicePath("/dev/null")
	OpenDevicePath(f.Name())
	OpenDevice(MaxNumber)
	if left := kerneltest.NewFDs(t, before); len(left) != 0 {
		t.Fatalf("descriptors %v left open", left)
	}
}
