//go:build integration

package loopctl

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/kerneltest"
)

// Bad input on the real kernel: every path, file and option a hostile
// caller controls. For each the test checks the error, that Attach
// answers within its context's deadline, and that nothing is left bound
// to the file, open, or locked. RELIABILITY.md has the table.

// untouched records what a failed Attach must leave as it was: the
// descriptors and flocks of this process; and, for a path that names a
// file, that no device is bound to that file.
type untouched struct {
	fds      map[int]string
	flocks   map[string]bool
	dev, ino uint64
	hasID    bool
}

func before(t *testing.T, path string) untouched {
	t.Helper()
	u := untouched{fds: kerneltest.OpenFDs(t), flocks: heldFlocks(t)}
	var st unix.Stat_t
	if unix.Stat(path, &st) == nil {
		u.dev, u.ino, u.hasID = uint64(st.Dev), uint64(st.Ino), true
	}
	return u
}

func (u untouched) check(t *testing.T) {
	t.Helper()
	if left := kerneltest.NewFDs(t, u.fds); len(left) != 0 {
		t.Errorf("descriptors %v left open", left)
	}
	for l := range heldFlocks(t) {
		if !u.flocks[l] {
			t.Errorf("flock left held: %s", l)
		}
	}
	if !u.hasID {
		return
	}
	list, err := List()
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range list {
		if s.BackingDevice == u.dev && s.BackingInode == u.ino {
			t.Errorf("left bound: %+v", s)
		}
	}
}

// heldFlocks returns the flocks this process holds (one is
// internal/testlock's), each as its descriptor, the file, and the lock
// line of the descriptor's fdinfo without its number. A lock on a
// descriptor closed meanwhile is passed over, as kerneltest.NewFDs passes
// the descriptor over: the runtime closes a file an earlier test dropped
// at a moment of its own.
//
// Not /proc/locks: it lists every process's locks, a few hundred bytes at
// a time, each read starting again at a position in a list that udev's
// probes change meanwhile, so that one read of it can show a lock twice,
// or miss one.
func heldFlocks(t *testing.T) map[string]bool {
	t.Helper()
	held := map[string]bool{}
	for fd, target := range kerneltest.OpenFDs(t) {
		info, err := os.ReadFile("/proc/self/fdinfo/" + strconv.Itoa(fd))
		if errors.Is(err, fs.ErrNotExist) {
			continue // closed since
		}
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(string(info), "\n") {
			l, ok := strings.CutPrefix(line, "lock:")
			if f := strings.Fields(l); ok && len(f) > 1 && f[1] == "FLOCK" {
				held[fmt.Sprintf("fd %d (%s): %s", fd, target, strings.Join(f[1:], " "))] = true
			}
		}
	}
	return held
}

// attachWithin attaches path with o under a context that ends after
// deadline, and fails the test unless Attach answers well within a
// minute: a hang is what it catches, not a slow answer.
func attachWithin(t *testing.T, path string, o Options, deadline time.Duration) (*Device, error) {
	t.Helper()
	return attachWithinOn(t, host, path, o, deadline)
}

// attachWithinOn is attachWithin on system s.
func attachWithinOn(t *testing.T, s *system, path string, o Options, deadline time.Duration) (*Device, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), deadline)
	defer cancel()
	d, err := within(t, time.Minute, func() (*Device, error) { return s.Attach(ctx, path, o) })
	if err == nil {
		t.Cleanup(func() {
			detach(t, d)
			kerneltest.WaitUnbound(t, d.Number()) // nothing left bound
		})
	}
	return d, err
}

// mountT mounts a file system of type fstype on a new directory and
// returns the directory; the test's cleanup unmounts it.
func mountT(t *testing.T, fstype string, flags uintptr) string {
	t.Helper()
	return mountFrom(t, fstype, fstype, flags)
}

// mountFrom is mountT of the file system on source: a device's, say.
func mountFrom(t *testing.T, source, fstype string, flags uintptr) string {
	t.Helper()
	dir := t.TempDir()
	if err := unix.Mount(source, dir, fstype, flags, ""); err != nil {
		t.Fatalf("mount %s of %s: %v", fstype, source, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	return dir
}

func TestKernelBadBackingFiles(t *testing.T) {
	kerneltest.Require(t)
	for _, hp := range hostilePaths(t) {
		for _, ro := range []bool{false, true} {
			name := hp.name
			var o Options
			if ro {
				name += ", read-only"
				o.Flags = FlagReadOnly
			}
			t.Run(name, func(t *testing.T) {
				u := before(t, hp.path)
				_, err := attachWithin(t, hp.path, o, 2*time.Second)
				checkFileBlamed(t, err, hp.words, hp.is)
				u.check(t)
			})
		}
	}

	t.Run("block device with no driver", func(t *testing.T) {
		// A node of a block major no driver has: its open fails with
		// ENXIO, which says nothing of the loop device Attach binds.
		node := filepath.Join(t.TempDir(), "nodriver")
		if err := unix.Mknod(node, unix.S_IFBLK|0o600, int(unix.Mkdev(unusedBlockMajor(t), 0))); err != nil {
			t.Fatal(err)
		}
		u := before(t, node)
		_, err := attachWithin(t, node, Options{}, 2*time.Second)
		checkFileBlamed(t, err, "no such device or address", unix.ENXIO)
		u.check(t)
	})

	t.Run("read-only file system", func(t *testing.T) {
		dir := mountT(t, "tmpfs", 0)
		file := filepath.Join(dir, "disk.img")
		if err := os.WriteFile(file, make([]byte, 1<<20), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := unix.Mount("", dir, "", unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
			t.Fatal(err)
		}
		u := before(t, file)
		_, err := attachWithin(t, file, Options{}, 2*time.Second)
		checkFileBlamed(t, err, "FlagReadOnly", fs.ErrPermission)
		if !errors.Is(err, unix.EROFS) {
			t.Errorf("error %q: want EROFS reachable", err)
		}
		u.check(t)
		d, err := attachWithin(t, file, Options{Flags: FlagReadOnly}, 2*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		checkBound(t, d, file, Options{Flags: FlagReadOnly})
	})

	t.Run("leased", testKernelLeasedFile)

	// The file changes between Attach's open and its LOOP_CONFIGURE: the
	// device is bound to the file as it is at the binding.
	for _, tt := range []struct {
		name    string
		o       Options
		change  func(path string) error
		size    uint64
		deleted bool
		readErr error // what a read of the first block may fail with
	}{
		{"truncated to 0 after the open", Options{}, func(p string) error { return os.Truncate(p, 0) }, 0, false, nil},
		// 1000 bytes hold one whole sector and no whole block: kernels
		// since 6.12 or so read nothing less than a block (EIO); 5.10
		// and 6.1 read the sector.
		{"truncated below a block after the open", Options{BlockSize: 4096}, func(p string) error { return os.Truncate(p, 1000) }, 512, false, unix.EIO},
		{"deleted after the open", Options{}, os.Remove, 1 << 20, true, nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			f := kerneltest.TempFile(t, 1<<20)
			k := &hookOpen{before: func() {
				if err := tt.change(f.Name()); err != nil {
					t.Error(err)
				}
			}}
			d, err := attachWithinOn(t, useKernel(t, k), f.Name(), tt.o, 10*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			if k.before != nil {
				t.Fatal("the file was not changed between open and bind")
			}
			s, err := d.Status()
			if err != nil {
				t.Fatal(err)
			}
			if s.Size != tt.size || s.Deleted() != tt.deleted {
				t.Fatalf("bound %+v: want %d bytes, deleted %v", s, tt.size, tt.deleted)
			}
			// The device reads what the file holds, and no further.
			buf := make([]byte, 4096)
			n, err := unix.Pread(mustFd(t, devFile(t, d)), buf, 0)
			if err != nil && err == tt.readErr {
				t.Logf("read from a device of %d bytes in blocks of %d on %s: %v", tt.size, s.BlockSize, kerneltest.Release(), err)
				return
			}
			if err != nil || uint64(n) != min(tt.size, 4096) {
				t.Fatalf("read %d bytes (%v) from a device of %d", n, err, tt.size)
			}
		})
	}

	t.Run("loop devices", testKernelLoopBacking)

	t.Run("no O_DIRECT", func(t *testing.T) {
		dir := mountT(t, "ramfs", 0)
		file := filepath.Join(dir, "disk.img")
		if err := os.WriteFile(file, make([]byte, 1<<20), 0o644); err != nil {
			t.Fatal(err)
		}
		u := before(t, file)
		_, err := attachWithin(t, file, Options{Flags: FlagDirectIO}, 10*time.Second)
		if !errors.Is(err, ErrNoDirectIO) || !errors.Is(err, unix.EINVAL) {
			t.Fatalf("FlagDirectIO on ramfs: %v, want ErrNoDirectIO", err)
		}
		u.check(t)
	})

	t.Run("extremes", testKernelExtremeOptions)
}

// unusedBlockMajor returns a block major number of those for local use
// (240-254) that no driver of this kernel has taken.
func unusedBlockMajor(t *testing.T) uint32 {
	t.Helper()
	b, err := os.ReadFile("/proc/devices")
	if err != nil {
		t.Fatal(err)
	}
	_, block, _ := strings.Cut(string(b), "Block devices:")
	used := map[string]bool{}
	for _, line := range strings.Split(block, "\n") {
		if f := strings.Fields(line); len(f) > 0 {
			used[f[0]] = true
		}
	}
	for m := uint32(240); m <= 254; m++ {
		if !used[strconv.Itoa(int(m))] {
			return m
		}
	}
	t.Skip("every block major for local use is taken")
	return 0
}

// A hookOpen is the real kernel that runs before, once, when Attach opens
// a loop device: after it opened the backing file, before it binds it.
type hookOpen struct{ before func() }

func (k *hookOpen) open(path string, mode int) (handle, error) {
	if path != ControlPath && k.before != nil {
		k.before()
		k.before = nil
	}
	return osKernel{}.open(path, mode)
}

// devFile opens d's node for reading; the test closes it.
func devFile(t *testing.T, d *Device) *os.File {
	t.Helper()
	f, err := os.Open(d.Path())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// testKernelLeasedFile attaches a file on which the test holds a read
// lease, as a file server holds one. A read-only Attach does not break
// it. A read-write Attach does: it waits for the lease to go, and only
// as long as its context allows, where a plain open would wait the
// kernel's lease-break-time (45 s).
func testKernelLeasedFile(t *testing.T) {
	file := filepath.Join(t.TempDir(), "leased.img")
	if err := os.WriteFile(file, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	sigio := make(chan os.Signal, 8)
	signal.Notify(sigio, unix.SIGIO)
	defer signal.Stop(sigio)
	lease := func() *os.File {
		f, err := os.Open(file)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := unix.FcntlInt(f.Fd(), unix.F_SETLEASE, unix.F_RDLCK); err != nil {
			t.Fatal(err)
		}
		return f
	}

	lf := lease()
	d, err := attachWithin(t, file, Options{Flags: FlagReadOnly}, 2*time.Second)
	if err != nil {
		t.Fatalf("read-only, beside a read lease: %v", err)
	}
	detach(t, d)

	u := before(t, file)
	_, err = attachWithin(t, file, Options{}, 300*time.Millisecond)
	if !errors.Is(err, context.DeadlineExceeded) || !errors.Is(err, unix.EWOULDBLOCK) || !strings.Contains(err.Error(), "lease") {
		t.Fatalf("read-write, lease held past the deadline: %v", err)
	}
	checkFileBlamed(t, err, "lease", unix.EWOULDBLOCK)
	u.check(t)
	lf.Close() // lets go of the lease

	// A lease the holder lets go of when told to: Attach is waiting for
	// it once the holder hears of the break, and binds when it is gone.
	lf = lease()
	defer lf.Close()
	for len(sigio) > 0 {
		<-sigio
	}
	done := make(chan error, 1)
	go func() {
		d, err := Attach(context.Background(), file, Options{})
		if err == nil {
			t.Cleanup(func() { detach(t, d) })
		}
		done <- err
	}()
	select {
	case <-sigio:
	case err := <-done:
		t.Fatalf("Attach answered %v while the lease was held", err)
	case <-time.After(time.Minute):
		t.Fatal("no lease break within a minute")
	}
	select {
	case err := <-done:
		t.Fatalf("Attach answered %v while the lease was held", err)
	default:
	}
	if _, err := unix.FcntlInt(lf.Fd(), unix.F_SETLEASE, unix.F_UNLCK); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(time.Minute):
		t.Fatal("Attach did not bind within a minute of the lease's release")
	}
}

// testKernelLoopBacking backs loop devices with loop devices: a bound one
// stacks, an unbound one is refused before any device is touched, and
// the kernel refuses a cycle.
func testKernelLoopBacking(t *testing.T) {
	f := kerneltest.TempFile(t, 1<<20)
	if _, err := f.WriteAt([]byte("bottom"), 8192); err != nil {
		t.Fatal(err)
	}
	a := attachT(t, f.Name(), Options{Flags: FlagReadOnly})
	b, err := attachWithin(t, a.Path(), Options{Flags: FlagReadOnly}, 10*time.Second)
	if err != nil {
		t.Fatalf("a loop device on a bound one: %v", err)
	}
	buf := make([]byte, 6)
	if _, err := unix.Pread(mustFd(t, devFile(t, b)), buf, 8192); err != nil || !bytes.Equal(buf, []byte("bottom")) {
		t.Fatalf("read %q (%v) through the stack", buf, err)
	}

	// a and b back each other: the kernel refuses the cycle.
	bf, err := os.Open(b.Path())
	if err != nil {
		t.Fatal(err)
	}
	defer bf.Close()
	err = a.ChangeFD(bf)
	checkFileBlamed(t, err, "cycle", unix.EBADF)

	c := openControl(t)
	n, err := c.Add(AnyNumber)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Remove(n) })
	free := DevicePath(n)
	u := before(t, free)
	_, err = attachWithin(t, free, Options{}, 2*time.Second)
	checkFileBlamed(t, err, "a loop device with no file bound to it", fs.ErrInvalid)
	u.check(t)
}

// testKernelExtremeOptions binds with the largest and smallest offsets,
// size limits and block sizes: each binds as the kernel defines it, or is
// refused with the kernel's errno, explained, and nothing left bound.
func testKernelExtremeOptions(t *testing.T) {
	for _, tt := range []struct {
		name string
		o    Options
		size uint64 // of the device bound; or
		err  error  // what the error matches
	}{
		{"offset at 2^63-1", Options{Offset: math.MaxInt64}, 0, nil},
		{"offset past the end", Options{Offset: 2 << 20}, 0, nil},
		{"offset past 2^63-1", Options{Offset: math.MaxInt64 + 1}, 0, unix.EOVERFLOW},
		{"size limit 2^63-1", Options{SizeLimit: math.MaxInt64}, 1 << 20, nil},
		{"size limit past 2^63-1", Options{SizeLimit: math.MaxUint64}, 0, unix.EOVERFLOW},
		{"size limit below a sector", Options{SizeLimit: 1}, 0, nil},
		{"block size 2^31", Options{BlockSize: 1 << 31}, 0, unix.EINVAL},
		{"block size not a power of two", Options{BlockSize: math.MaxUint32 - 1}, 0, fs.ErrInvalid},
		{"all at once", Options{Offset: math.MaxInt64, SizeLimit: math.MaxInt64, BlockSize: 1 << 31}, 0, unix.EINVAL},
	} {
		t.Run(tt.name, func(t *testing.T) {
			f := kerneltest.TempFile(t, 1<<20)
			u := before(t, f.Name())
			d, err := attachWithin(t, f.Name(), tt.o, 10*time.Second)
			if tt.err != nil {
				if !errors.Is(err, tt.err) {
					t.Fatalf("Attach = %v, want %v", err, tt.err)
				}
				u.check(t)
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			s, err := d.Status()
			if err != nil {
				t.Fatal(err)
			}
			if s.Size != tt.size || s.Offset != tt.o.Offset || s.SizeLimit != tt.o.SizeLimit {
				t.Fatalf("bound %+v, want %d bytes with %+v", s, tt.size, tt.o)
			}
		})
	}
}

func TestKernelAttachDeletedFile(t *testing.T) {
	f := kerneltest.TempFile(t, 1<<20)
	d := attachT(t, f.Name(), Options{})
	dev, ino := fileID(t, f.Name())
	if err := os.Remove(f.Name()); err != nil {
		t.Fatal(err)
	}
	list, err := List()
	if err != nil {
		t.Fatal(err)
	}
	want := Status{Number: d.Number(), BackingFile: f.Name() + " (deleted)", BackingDevice: dev, BackingInode: ino,
		BlockSize: 512, Size: 1 << 20, DiskSeq: kerneltest.DiskSeq(t, d.Number()), Ref: f.Name()[:63]}
	var got *Status
	for i := range list {
		if list[i].Number == d.Number() {
			got = &list[i]
		}
	}
	if got == nil || *got != want || !got.Deleted() {
		t.Fatalf("List has %+v, want %+v", got, want)
	}
	if s, err := d.Status(); err != nil || s != want {
		t.Fatalf("Status = %+v, %v; want %+v", s, err, want)
	}
	if l := losetup(t, d.Path()); l.BackFile != want.BackingFile {
		t.Fatalf("losetup back-file %q, want %q", l.BackFile, want.BackingFile)
	}
	if _, err := FindByBackingFile(f.Name()); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("FindByBackingFile(deleted path) = %v, want fs.ErrNotExist", err)
	}
}
