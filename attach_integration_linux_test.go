//go:build integration

package loopctl

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/kerneltest"
	"github.com/loopctl/loopctl/internal/sysfs"
)

func TestKernelAttach(t *testing.T) {
	for _, o := range []Options{
		{},
		{Offset: 64 << 10, SizeLimit: 512 << 10},
		{BlockSize: 4096, Flags: FlagPartScan},
		{Flags: FlagReadOnly | FlagAutoClear},
		{Flags: FlagDirectIO, BlockSize: 4096},
	} {
		t.Run(o.Flags.String(), func(t *testing.T) {
			f := kerneltest.TempFile(t, 2<<20)
			if o.Flags&FlagDirectIO != 0 && !directIOOK(t, filepath.Dir(f.Name())) {
				kerneltest.Require(t)
				_, err := Attach(context.Background(), f.Name(), o)
				wantNoDirectIO(t, err, f.Name())
				return
			}
			d := attachT(t, f.Name(), o)
			checkBound(t, d, f.Name(), o)

			// The same file by another name: a hard link.
			link := filepath.Join(t.TempDir(), "link.img")
			if err := os.Link(f.Name(), link); err != nil {
				t.Fatal(err)
			}
			found, err := FindByBackingFile(link)
			if err != nil || len(found) != 1 || found[0].Number != d.Number() {
				t.Fatalf("FindByBackingFile(hard link) = %+v, %v", found, err)
			}
		})
	}
}

func TestKernelAttachFile(t *testing.T) {
	f := kerneltest.TempFile(t, 1<<20)
	kerneltest.Require(t)
	d, err := AttachFile(context.Background(), f, Options{Flags: FlagReadOnly})
	if err != nil {
		t.Fatal(err)
	}
	defer detach(t, d)
	checkBound(t, d, f.Name(), Options{Flags: FlagReadOnly})
	// The caller's file stays open and usable.
	if _, err := f.WriteAt([]byte("x"), 0); err != nil {
		t.Fatalf("caller's file: %v", err)
	}
}

func TestKernelAttachAutoClear(t *testing.T) {
	f := kerneltest.TempFile(t, 1<<20)
	d := attachT(t, f.Name(), Options{Flags: FlagAutoClear})
	n := d.Number()
	// The returned Device holds the binding open.
	if _, err := os.Stat(sysfs.LoopAttr(sysfs.Root, n, "")); err != nil {
		t.Fatalf("bound device: %v", err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	// Its Close was the last but for udev's probe, if udev runs: the
	// kernel detaches the device at the last close.
	kerneltest.WaitUnbound(t, n)
	if found, err := FindByBackingFile(f.Name()); err != nil || len(found) != 0 {
		t.Fatalf("FindByBackingFile = %+v, %v; want none", found, err)
	}
}

// forceOpen makes the real kernel's opens of paths with prefix, but for
// keep, fail with err, as on a machine without them.
type forceOpen struct {
	prefix, keep string
	err          error
}

func (k forceOpen) open(path string, mode int) (handle, error) {
	if strings.HasPrefix(path, k.prefix) && path != k.keep {
		return nil, &os.PathError{Op: "open", Path: path, Err: k.err}
	}
	return osKernel{}.open(path, mode)
}

func TestKernelAttachWithoutControl(t *testing.T) {
	s := useKernel(t, forceOpen{prefix: ControlPath, err: unix.ENOENT})
	f := kerneltest.TempFile(t, 1<<20)
	// Without the control device, Attach binds the lowest device that
	// sysfs shows unbound. A device of an earlier test may still be
	// going (udev holding it open past its detach): sysfs shows it bound
	// until its last close, so it may be unbound after Attach and bound
	// at its scan. Devices only go that way while the tests take turns
	// (internal/testlock): one unbound both before and after Attach was
	// unbound at its scan. Where udev runs, it holds each device an
	// earlier test let go of open while it processes the device's events,
	// so that the device shows bound before Attach and may be unbound at
	// its scan: the test lets udev process what is queued first.
	kerneltest.SettleUdev(t)
	before := sysfsUnbound(t)
	d := attachOn(t, s, f.Name(), Options{Offset: 512})
	checkBound(t, d, f.Name(), Options{Offset: 512})
	after := sysfsUnbound(t)
	if !before[d.Number()] {
		t.Fatalf("attached loop%d, which sysfs showed bound before", d.Number())
	}
	for n := range before {
		if n < d.Number() && after[n] {
			t.Fatalf("attached loop%d while loop%d was unbound before and after", d.Number(), n)
		}
	}
}

// sysfsUnbound returns the devices that sysfs shows unbound (no loop/
// directory), as Attach without the control device reads them.
func sysfsUnbound(t *testing.T) map[int]bool {
	t.Helper()
	nums, err := sysfs.LoopNumbers(sysfs.Root)
	if err != nil {
		t.Fatal(err)
	}
	unbound := map[int]bool{}
	for _, n := range nums {
		if _, err := os.Lstat(sysfs.LoopAttr(sysfs.Root, n, "")); errors.Is(err, fs.ErrNotExist) {
			unbound[n] = true
		}
	}
	return unbound
}

func TestKernelAttachMissingNode(t *testing.T) {
	for _, noControl := range []bool{false, true} {
		t.Run(fmt.Sprint("noControl=", noControl), func(t *testing.T) {
			k := forceOpen{prefix: "/dev/loop", err: unix.ENOENT}
			if !noControl {
				k.keep = ControlPath // only the /dev/loopN nodes are missing
			}
			_, err := useKernel(t, k).Attach(context.Background(), kerneltest.TempFile(t, 1<<20).Name(), Options{})
			var missing *NodeMissingError
			if !errors.Is(err, fs.ErrNotExist) || !errors.As(err, &missing) || missing.Path != DevicePath(missing.Number) {
				t.Fatalf("Attach = %v, want the missing /dev/loopN named", err)
			}
		})
	}
}

func TestKernelAttachFallback(t *testing.T) {
	s := useForced(t, map[uint]error{reqConfigure: unix.ENOTTY}).sys
	o := Options{Offset: 4096, SizeLimit: 1 << 20, BlockSize: 4096, Flags: FlagAutoClear | FlagDirectIO | FlagReadOnly}
	f := kerneltest.TempFile(t, 2<<20)
	if !directIOOK(t, filepath.Dir(f.Name())) {
		_, err := s.Attach(context.Background(), f.Name(), o)
		wantNoDirectIO(t, err, f.Name())
		return
	}
	d := attachOn(t, s, f.Name(), o)
	checkBound(t, d, f.Name(), o)
}

func TestKernelAttachNoLeak(t *testing.T) {
	kerneltest.Require(t)
	f := kerneltest.TempFile(t, 1<<20)
	dir := t.TempDir()
	// The first Attach opens the process's control device, which stays.
	d, err := Attach(context.Background(), f.Name(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	detach(t, d)
	before := kerneltest.OpenFDs(t)
	used := map[int]bool{}
	for range 20 {
		d, err := Attach(context.Background(), f.Name(), Options{Flags: FlagAutoClear})
		if err != nil {
			t.Fatal(err)
		}
		used[d.Number()] = true
		d.Close()
		Attach(context.Background(), filepath.Join(dir, "missing"), Options{})
		Attach(context.Background(), dir, Options{})
		Attach(context.Background(), f.Name(), Options{BlockSize: 1 << 20}) // the kernel refuses
		AttachFile(context.Background(), f, Options{Flags: 0x20})
	}
	if left := kerneltest.NewFDs(t, before); len(left) != 0 {
		t.Fatalf("descriptors %v left open", left)
	}
	for n := range used {
		kerneltest.WaitUnbound(t, n) // autoclear: at the last close, maybe udev's
	}
	if found, err := FindByBackingFile(f.Name()); err != nil || len(found) != 0 {
		t.Fatalf("devices left bound: %+v, %v", found, err)
	}
}

// TestKernelAttachConcurrent attaches from 4 processes x 8 goroutines at
// once, each to its own file, and holds every device until all are bound:
// each device must carry its caller's inode, and nothing may leak.
func TestKernelAttachConcurrent(t *testing.T) {
	if dir := os.Getenv("LOOPCTL_ATTACH_CHILD"); dir != "" {
		attachChild(t, dir)
		return
	}
	kerneltest.Require(t)
	const procs = 4
	dir := t.TempDir()
	var children []*pipedChild
	for range procs {
		children = append(children, startPiped(t, "TestKernelAttachConcurrent", "LOOPCTL_ATTACH_CHILD="+dir))
	}
	// Each child reports "bound N INODE" per device, then "held".
	owner := map[int]int{}
	for i, c := range children {
		for c.out.Scan() {
			line := c.out.Text()
			if line == "held" {
				break
			}
			var n int
			var ino uint64
			if _, err := fmt.Sscanf(line, "bound %d %d", &n, &ino); err != nil {
				continue // test framework output
			}
			if prev, ok := owner[n]; ok {
				t.Errorf("loop%d given to process %d and %d", n, prev, i)
			}
			owner[n] = i
		}
	}
	if len(owner) != procs*8 {
		t.Errorf("%d devices bound at once, want %d", len(owner), procs*8)
	}
	for _, c := range children {
		c.stdin.Close() // release: the child detaches and checks its fds
	}
	for i, c := range children {
		var rest []string
		for c.out.Scan() {
			rest = append(rest, c.out.Text())
		}
		if err := c.cmd.Wait(); err != nil {
			t.Errorf("process %d: %v\n%s", i, err, strings.Join(rest, "\n"))
		}
	}
	// The children bound with autoclear: each device goes once every
	// opener has closed it, udev's probe too.
	for n := range owner {
		kerneltest.WaitUnbound(t, n)
	}
	list, err := List()
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range list {
		if strings.HasPrefix(s.BackingFile, dir) {
			t.Errorf("left bound: %+v", s)
		}
	}
}

// attachChild is one process of TestKernelAttachConcurrent.
func attachChild(t *testing.T, dir string) {
	// Internal state: the control device Attach keeps once made, opened
	// first so that the descriptor count leaves it out.
	if _, err := host.sharedControl(); err != nil {
		t.Fatal(err)
	}
	before := len(kerneltest.OpenFDs(t))
	const goroutines = 8
	devs := make([]*Device, goroutines)
	var wg sync.WaitGroup
	var mu sync.Mutex
	for i := range goroutines {
		wg.Go(func() {
			path := filepath.Join(dir, fmt.Sprintf("%d-%d-%s", os.Getpid(), i, kerneltest.LongName))
			if err := os.WriteFile(path, make([]byte, 64<<10), 0o644); err != nil {
				t.Error(err)
				return
			}
			d, err := Attach(context.Background(), path, Options{})
			if err != nil {
				t.Error(err)
				return
			}
			devs[i] = d
			_, ino := fileID(t, path)
			s, err := d.Status()
			if err != nil || s.BackingInode != ino || s.BackingFile != path {
				t.Errorf("loop%d: %+v, %v; want inode %d of %s", d.Number(), s, err, ino, path)
			}
			mu.Lock()
			fmt.Printf("bound %d %d\n", d.Number(), ino)
			mu.Unlock()
		})
	}
	wg.Wait()
	fmt.Println("held")
	io.Copy(io.Discard, os.Stdin) // until the parent has seen every process's devices
	for _, d := range devs {
		if d != nil {
			detach(t, d)
		}
	}
	if after := len(kerneltest.OpenFDs(t)); after != before {
		t.Errorf("%d descriptors before, %d after", before, after)
	}
}

// A racingKernel is the real kernel with another process's move made just
// before Attach first opens a /dev/loopN: between LOOP_CTL_GET_FREE naming
// the device and Attach opening it.
type racingKernel struct {
	once sync.Once
	race func(path string)
}

func (k *racingKernel) open(path string, mode int) (handle, error) {
	if path != ControlPath {
		k.once.Do(func() { k.race(path) })
	}
	return osKernel{}.open(path, mode)
}

// TestKernelAttachLostRace makes each race Attach can lose happen on the real
// kernel, at the worst moment, and checks that Attach binds another device
// and leaves the winner's alone.
func TestKernelAttachLostRace(t *testing.T) {
	for _, tt := range []struct {
		name string
		// race does the other process's move on the device at path, with
		// raw calls, and returns its descriptor of the device.
		race func(t *testing.T, path string) int
		// bound: the other process's binding, which must survive.
		bound bool
	}{
		{"bound", func(t *testing.T, path string) int {
			return rawBind(t, path, kerneltest.TempFile(t, 1<<20))
		}, true},
		{"torn down", func(t *testing.T, path string) int {
			// Bound and cleared by its only opener: since Linux 6.11 the
			// device refuses opens (ENXIO) until that opener closes it.
			fd := rawBind(t, path, kerneltest.TempFile(t, 1<<20))
			if _, err := unix.IoctlRetInt(fd, unix.LOOP_CLR_FD); err != nil {
				t.Fatal(err)
			}
			return fd
		}, false},
		{"locked", func(t *testing.T, path string) int {
			// Held under flock(LOCK_EX) by a tool setting it up.
			fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
			if err != nil {
				t.Fatal(err)
			}
			if err := unix.Flock(fd, unix.LOCK_EX); err != nil {
				t.Fatal(err)
			}
			return fd
		}, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var fd int
			var raced string
			s := useKernel(t, &racingKernel{race: func(path string) {
				raced, fd = path, tt.race(t, path)
				t.Cleanup(func() {
					unix.IoctlRetInt(fd, unix.LOOP_CLR_FD) // ENXIO where not bound
					unix.Close(fd)
				})
			}})
			f := kerneltest.TempFile(t, 1<<20)
			d := attachOn(t, s, f.Name(), Options{})
			// Before Linux 6.11 LOOP_CLR_FD tore the device down at once:
			// no race, and the device is free again for Attach.
			noRace := tt.name == "torn down" && !kerneltest.AtLeast(t, 6, 11)
			if raced == "" || d.Path() == raced && !noRace {
				t.Fatalf("attached %s; the race was on %q", d.Path(), raced)
			}
			checkBound(t, d, f.Name(), Options{})
			if tt.bound {
				// Still the winner's: Attach never clears what it did
				// not bind.
				if _, err := unix.IoctlLoopGetStatus64(fd); err != nil {
					t.Fatalf("the winner's device: %v", err)
				}
			}
		})
	}
}

// TestKernelAttachWaitsForProbe: udev holds a shared flock on the device
// LOOP_CTL_GET_FREE names, probing it after a change. Attach waits for the
// probe to end, and binds that device, as losetup would; when its context
// ends first, it returns, leaving nothing bound, and its descriptor of the
// device goes once the probe ends.
func TestKernelAttachWaitsForProbe(t *testing.T) {
	for _, cancelled := range []bool{false, true} {
		t.Run(fmt.Sprint("cancelled=", cancelled), func(t *testing.T) {
			type probe struct {
				path string
				fd   int
			}
			probes := make(chan probe, 1)
			s := useKernel(t, &racingKernel{race: func(path string) {
				fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
				if err != nil {
					t.Error(err)
				} else if err := unix.Flock(fd, unix.LOCK_SH|unix.LOCK_NB); err != nil {
					t.Error(err)
				}
				probes <- probe{path, fd}
			}})
			f := kerneltest.TempFile(t, 1<<20)
			if _, err := s.sharedControl(); err != nil { // Attach keeps it open
				t.Fatal(err)
			}
			fds := kerneltest.OpenFDs(t)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			type result struct {
				d   *Device
				err error
			}
			done := make(chan result, 1)
			go func() {
				d, err := s.Attach(ctx, f.Name(), Options{})
				done <- result{d, err}
			}()
			p := <-probes
			probed := p.path
			waitLockRequest(t, probed)
			select {
			case r := <-done:
				t.Fatalf("Attach answered (%v, %v) during the probe", r.d, r.err)
			default:
			}
			if cancelled {
				cancel()
				if r := <-done; !errors.Is(r.err, context.Canceled) {
					t.Fatalf("Attach = %v, %v; want context.Canceled", r.d, r.err)
				}
				if _, err := os.Stat(sysfs.LoopAttr(sysfs.Root, deviceNumber(t, probed), "")); err == nil {
					t.Fatalf("%s bound after a cancelled Attach", probed)
				}
			}
			unix.Close(p.fd) // the probe ends
			if !cancelled {
				r := <-done
				if r.err != nil {
					t.Fatal(r.err)
				}
				t.Cleanup(func() { detach(t, r.d) })
				if r.d.Path() != probed {
					t.Fatalf("attached %s, want %s, which udev was probing", r.d.Path(), probed)
				}
				checkBound(t, r.d, f.Name(), Options{})
				return
			}
			for end := time.Now().Add(10 * time.Second); len(kerneltest.NewFDs(t, fds)) != 0; runtime.Gosched() {
				if time.Now().After(end) {
					t.Fatalf("descriptors %v still open after the probe ended", kerneltest.NewFDs(t, fds))
				}
			}
		})
	}
}

// TestKernelAttachTakesControlLock holds flock(LOCK_EX) on /dev/loop-control
// as systemd does while it sets up a device: Attach must wait for it, bind
// nothing meanwhile, honour its context while waiting, and go ahead once the
// lock is released.
func TestKernelAttachTakesControlLock(t *testing.T) {
	lock, s := holdControlLock(t)
	f := kerneltest.TempFile(t, 1<<20)

	// Given up while waiting: nothing is bound, and the lock is left as
	// it was.
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		d, err := s.Attach(ctx, f.Name(), Options{})
		if err == nil {
			detach(t, d)
		}
		done <- err
	}()
	waitLockRequest(t, ControlPath)
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("Attach = %v, want context.Canceled", err)
	}

	// Waiting with a context that cannot end.
	attached := make(chan *Device, 1)
	go func() {
		d, err := s.Attach(context.Background(), f.Name(), Options{Flags: FlagAutoClear})
		if err != nil {
			t.Error(err)
		}
		attached <- d
	}()
	waitLockRequest(t, ControlPath)
	if found, err := s.FindByBackingFile(f.Name()); err != nil || len(found) != 0 {
		t.Fatalf("bound while the control lock was held elsewhere: %+v, %v", found, err)
	}
	if err := unix.Flock(lock, unix.LOCK_UN); err != nil {
		t.Fatal(err)
	}
	d := <-attached
	if d == nil {
		t.FailNow()
	}
	checkBound(t, d, f.Name(), Options{Flags: FlagAutoClear})
	d.Close()
	// The abandoned wait took the lock when it was free, and let it go.
	s.lockWaiters.Wait()
	if err := unix.Flock(lock, unix.LOCK_EX|unix.LOCK_NB); err != nil {
		t.Fatalf("the control lock after Attach: %v", err)
	}
}

// holdControlLock takes flock(LOCK_EX) on /dev/loop-control through a
// descriptor of its own, as another process would, and returns the
// descriptor, closed at the end of the test, and a system of the test's
// own, whose shared control device is made anew.
func holdControlLock(t *testing.T) (int, *system) {
	t.Helper()
	kerneltest.Require(t)
	s := useKernel(t, osKernel{})
	lock, err := unix.Open(ControlPath, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(lock) })
	if err := unix.Flock(lock, unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	return lock, s
}

// waitLockRequest waits until /proc/locks shows a request for a flock of
// the node at path waiting.
func waitLockRequest(t *testing.T, path string) {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	id := fmt.Sprintf("%02x:%02x:%d", unix.Major(st.Dev), unix.Minor(st.Dev), st.Ino)
	for end := time.Now().Add(10 * time.Second); time.Now().Before(end); runtime.Gosched() {
		locks, err := os.ReadFile("/proc/locks")
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(string(locks), "\n") {
			if f := strings.Fields(line); len(f) > 6 && f[1] == "->" && f[2] == "FLOCK" && f[6] == id {
				return
			}
		}
	}
	t.Fatalf("no flock request on %s (%s) waiting in /proc/locks", path, id)
}
