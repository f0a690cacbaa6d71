//go:build integration && !loopctl_stub

package loopctl

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
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
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/kerneltest"
)

// attachT attaches path with o for the test; cleanup detaches and closes.
func attachT(t *testing.T, path string, o Options) *Device {
	t.Helper()
	kerneltest.Require(t)
	d, err := Attach(context.Background(), path, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { detach(t, d) })
	return d
}

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
	if _, err := os.Stat(sysfsLoopAttr(n, "")); err != nil {
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

func TestKernelSetStatus(t *testing.T) {
	f := kerneltest.TempFile(t, 2<<20)
	d := attachT(t, f.Name(), Options{})
	set := Status{Offset: 4096, SizeLimit: 1 << 20, Flags: FlagAutoClear | FlagPartScan}
	if err := d.SetStatus(set); err != nil {
		t.Fatal(err)
	}
	want := Options{Offset: set.Offset, SizeLimit: set.SizeLimit, Flags: set.Flags}
	checkBound(t, d, f.Name(), want)
	if got := readAttr(t, d.Number(), "size"); got != "2048" {
		t.Fatalf("size %s sectors, want 2048", got)
	}
	// lo_file_name survives.
	var info unix.LoopInfo64
	if err := ioctlPtr(d.h, reqGetStatus64, unsafe.Pointer(&info)); err != nil || unix.ByteSliceToString(info.File_name[:]) == "" {
		t.Fatalf("lo_file_name %q after SetStatus, %v", info.File_name, err)
	}

	// The kernel ignores, with success, a read-only or direct I/O flag
	// through LOOP_SET_STATUS64: that is why SetStatus refuses them.
	for _, flag := range []uint32{unix.LO_FLAGS_READ_ONLY, unix.LO_FLAGS_DIRECT_IO} {
		raw := info
		raw.Flags |= flag
		if err := ioctlPtr(d.h, reqSetStatus64, unsafe.Pointer(&raw)); err != nil {
			t.Fatalf("kernel LOOP_SET_STATUS64 with flag %#x: %v", flag, err)
		}
		checkBound(t, d, f.Name(), want)
	}
	raw := info
	raw.Flags &^= unix.LO_FLAGS_PARTSCAN // nor can partscan be cleared
	if err := ioctlPtr(d.h, reqSetStatus64, unsafe.Pointer(&raw)); err != nil {
		t.Fatalf("kernel LOOP_SET_STATUS64 clearing partscan: %v", err)
	}
	checkBound(t, d, f.Name(), want)

	// What the kernel would ignore is refused, and nothing changes.
	for name, s := range map[string]Status{
		"set read-only":   {Flags: set.Flags | FlagReadOnly},
		"set direct I/O":  {Flags: set.Flags | FlagDirectIO},
		"clear partscan":  {Flags: FlagAutoClear},
		"unknown flag":    {Flags: set.Flags | 0x20},
		"offset too big":  {Offset: 1 << 63, Flags: set.Flags},
		"size too big":    {SizeLimit: 1 << 63, Flags: set.Flags},
		"read-only alone": {Flags: FlagReadOnly},
	} {
		t.Run(name, func(t *testing.T) {
			if err := d.SetStatus(s); !errors.Is(err, fs.ErrInvalid) {
				t.Fatalf("SetStatus(%+v) = %v, want fs.ErrInvalid", s, err)
			}
			checkBound(t, d, f.Name(), want)
		})
	}

	// Autoclear can be cleared.
	set.Flags = FlagPartScan
	if err := d.SetStatus(set); err != nil {
		t.Fatal(err)
	}
	want.Flags = FlagPartScan
	checkBound(t, d, f.Name(), want)
}

func TestKernelSetCapacity(t *testing.T) {
	f := kerneltest.TempFile(t, 1<<20)
	d := attachT(t, f.Name(), Options{})
	if err := f.Truncate(2 << 20); err != nil {
		t.Fatal(err)
	}
	if got := readAttr(t, d.Number(), "size"); got != "2048" {
		t.Fatalf("size before SetCapacity %s, want 2048", got)
	}
	if err := d.SetCapacity(); err != nil {
		t.Fatal(err)
	}
	if got := readAttr(t, d.Number(), "size"); got != "4096" {
		t.Fatalf("size after SetCapacity %s, want 4096", got)
	}
	if s, err := d.Status(); err != nil || s.Size != 2<<20 {
		t.Fatalf("Status = %+v, %v; want size %d", s, err, 2<<20)
	}
}

func TestKernelSetBlockSize(t *testing.T) {
	d := attachT(t, kerneltest.TempFile(t, 1<<20).Name(), Options{})
	for _, size := range []uint32{4096, 1024, 65536, 512} {
		err := d.SetBlockSize(size)
		if size > uint32(os.Getpagesize()) && !kerneltest.AtLeast(t, 6, 15) {
			// Block sizes above the page size came with Linux 6.15.
			if !errors.Is(err, unix.EINVAL) || !strings.Contains(err.Error(), "page size") {
				t.Fatalf("SetBlockSize(%d) on %s = %v, want EINVAL explained", size, kerneltest.Release(), err)
			}
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		if got := readAttr(t, d.Number(), "queue/logical_block_size"); got != strconv.Itoa(int(size)) {
			t.Fatalf("block size %s, want %d", got, size)
		}
		if s, err := d.Status(); err != nil || s.BlockSize != size {
			t.Fatalf("Status = %+v, %v; want block size %d", s, err, size)
		}
	}
	for _, size := range []uint32{0, 3, 256, 1000} {
		if err := d.SetBlockSize(size); !errors.Is(err, fs.ErrInvalid) || errors.Is(err, unix.EINVAL) {
			t.Fatalf("SetBlockSize(%d) = %v, want a refusal before the kernel", size, err)
		}
	}
	// A power of two beyond the kernel's limit is the kernel's to refuse.
	if err := d.SetBlockSize(1 << 20); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("SetBlockSize(1<<20) = %v, want the kernel's EINVAL", err)
	}
}

func TestKernelSetDirectIO(t *testing.T) {
	f := kerneltest.TempFile(t, 1<<20)
	d := attachT(t, f.Name(), Options{BlockSize: 4096})
	if !directIOOK(t, filepath.Dir(f.Name())) {
		if err := d.SetDirectIO(true); !errors.Is(err, ErrNoDirectIO) || !errors.Is(err, unix.EINVAL) {
			t.Fatalf("SetDirectIO(true) without O_DIRECT = %v, want ErrNoDirectIO", err)
		}
		if s, err := d.Status(); err != nil || s.Flags&FlagDirectIO != 0 {
			t.Fatalf("Status = %+v, %v", s, err)
		}
		return
	}
	for _, on := range []bool{true, false, true} {
		if err := d.SetDirectIO(on); err != nil {
			t.Fatal(err)
		}
		s, err := d.Status()
		if err != nil || (s.Flags&FlagDirectIO != 0) != on {
			t.Fatalf("direct I/O %v: %+v, %v", on, s, err)
		}
		want := map[bool]string{false: "0", true: "1"}[on]
		if got := readAttr(t, d.Number(), "loop/dio"); got != want {
			t.Fatalf("sysfs dio %s, want %s", got, want)
		}
	}
}

func TestKernelChangeFD(t *testing.T) {
	a := kerneltest.TempFile(t, 1<<20)
	d := attachT(t, a.Name(), Options{Flags: FlagReadOnly})
	b, err := os.Create(filepath.Join(t.TempDir(), "b-"+kerneltest.LongName))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if err := b.Truncate(1 << 20); err != nil {
		t.Fatal(err)
	}
	seq, err := d.DiskSeq()
	if err != nil {
		t.Fatal(err)
	}
	if err := d.ChangeFD(b); err != nil {
		t.Fatal(err)
	}
	// LOOP_CHANGE_FD leaves lo_file_name as the first bind wrote it, and
	// moves the disk sequence number on: checkBound compares sysfs's.
	checkBound(t, d, b.Name(), Options{Flags: FlagReadOnly, Ref: a.Name()[:63]})
	if after, err := d.DiskSeq(); err != nil || kerneltest.AtLeast(t, 5, 15) && after == seq {
		t.Fatalf("DiskSeq after ChangeFD = %d, %v; before %d", after, err, seq)
	}

	// Another size: the kernel refuses, and the error says why.
	c := kerneltest.TempFile(t, 2<<20)
	err = d.ChangeFD(c)
	if !errors.Is(err, unix.EINVAL) || !strings.Contains(err.Error(), "same size") {
		t.Fatalf("ChangeFD(other size) = %v, want EINVAL explained", err)
	}
	checkBound(t, d, b.Name(), Options{Flags: FlagReadOnly, Ref: a.Name()[:63]})

	// A read-write device: refused before the kernel.
	rw := attachT(t, c.Name(), Options{})
	if err := rw.ChangeFD(a); !errors.Is(err, fs.ErrInvalid) || errors.Is(err, unix.EINVAL) || !strings.Contains(err.Error(), "read-only") {
		t.Fatalf("ChangeFD on a read-write device = %v", err)
	}
	if err := d.ChangeFD(nil); !errors.Is(err, fs.ErrInvalid) {
		t.Fatalf("ChangeFD(nil) = %v", err)
	}
	dir, _ := os.Open(t.TempDir())
	defer dir.Close()
	if err := d.ChangeFD(dir); !errors.Is(err, fs.ErrInvalid) {
		t.Fatalf("ChangeFD(directory) = %v", err)
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
	useKernel(t, forceOpen{prefix: ControlPath, err: unix.ENOENT})
	f := kerneltest.TempFile(t, 1<<20)
	// Without the control device, Attach binds the lowest device that
	// sysfs shows unbound. A device of an earlier test may still be
	// going (udev holding it open past its detach): sysfs shows it bound
	// until its last close, so it may be unbound after Attach and bound
	// at its scan. Devices only go that way while the tests take turns
	// (internal/testlock): one unbound both before and after Attach was
	// unbound at its scan.
	before := sysfsUnbound(t)
	d := attachT(t, f.Name(), Options{Offset: 512})
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
	nums, err := loopNumbers()
	if err != nil {
		t.Fatal(err)
	}
	unbound := map[int]bool{}
	for _, n := range nums {
		if _, err := os.Lstat(sysfsLoopAttr(n, "")); errors.Is(err, fs.ErrNotExist) {
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
			useKernel(t, k)
			_, err := Attach(context.Background(), kerneltest.TempFile(t, 1<<20).Name(), Options{})
			var missing *NodeMissingError
			if !errors.Is(err, fs.ErrNotExist) || !errors.As(err, &missing) || missing.Path != DevicePath(missing.Number) {
				t.Fatalf("Attach = %v, want the missing /dev/loopN named", err)
			}
		})
	}
}

func TestKernelAttachFallback(t *testing.T) {
	useForced(t, map[uint]error{reqConfigure: unix.ENOTTY})
	o := Options{Offset: 4096, SizeLimit: 1 << 20, BlockSize: 4096, Flags: FlagAutoClear | FlagDirectIO | FlagReadOnly}
	f := kerneltest.TempFile(t, 2<<20)
	if !directIOOK(t, filepath.Dir(f.Name())) {
		_, err := Attach(context.Background(), f.Name(), o)
		wantNoDirectIO(t, err, f.Name())
		return
	}
	d := attachT(t, f.Name(), o)
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
	if after := kerneltest.OpenFDs(t); len(after) != len(before) {
		t.Fatalf("descriptors before %v, after %v", before, after)
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

// A pipedChild is the test binary running one test as a child process,
// talking with its parent through its standard input and output.
type pipedChild struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	out   *bufio.Scanner
}

// startPiped runs test again in a child process with env added.
func startPiped(t *testing.T, test string, env ...string) *pipedChild {
	t.Helper()
	return startPipedIn(t, nil, test, env...)
}

// startPipedIn is startPiped with the child started with attr: in
// namespaces of its own, for one.
func startPipedIn(t *testing.T, attr *syscall.SysProcAttr, test string, env ...string) *pipedChild {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^"+test+"$", "-test.count=1", "-test.v")
	cmd.Env = append(os.Environ(), env...)
	cmd.SysProcAttr = attr
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return &pipedChild{cmd, stdin, bufio.NewScanner(stdout)}
}

// attachChild is one process of TestKernelAttachConcurrent.
func attachChild(t *testing.T, dir string) {
	if _, err := sharedControl(); err != nil {
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
			useKernel(t, &racingKernel{race: func(path string) {
				raced, fd = path, tt.race(t, path)
				t.Cleanup(func() {
					unix.IoctlRetInt(fd, unix.LOOP_CLR_FD) // ENXIO where not bound
					unix.Close(fd)
				})
			}})
			f := kerneltest.TempFile(t, 1<<20)
			d := attachT(t, f.Name(), Options{})
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
			useKernel(t, &racingKernel{race: func(path string) {
				fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
				if err != nil {
					t.Error(err)
				} else if err := unix.Flock(fd, unix.LOCK_SH|unix.LOCK_NB); err != nil {
					t.Error(err)
				}
				probes <- probe{path, fd}
			}})
			f := kerneltest.TempFile(t, 1<<20)
			if _, err := sharedControl(); err != nil { // Attach keeps it open
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
				d, err := Attach(ctx, f.Name(), Options{})
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
				if _, err := os.Stat(sysfsLoopAttr(deviceNumber(t, probed), "")); err == nil {
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
			for end := time.Now().Add(10 * time.Second); len(kerneltest.OpenFDs(t)) != len(fds); runtime.Gosched() {
				if time.Now().After(end) {
					t.Fatalf("descriptors %v after the probe ended, %v before Attach", kerneltest.OpenFDs(t), fds)
				}
			}
		})
	}
}

// deviceNumber returns N of the path /dev/loopN.
func deviceNumber(t *testing.T, path string) int {
	t.Helper()
	n, err := strconv.Atoi(strings.TrimPrefix(path, "/dev/loop"))
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// rawBind binds f to the device at path as another program would, and
// returns its descriptor of the device.
func rawBind(t *testing.T, path string, f *os.File) int {
	t.Helper()
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.IoctlLoopConfigure(fd, &unix.LoopConfig{Fd: uint32(mustFd(t, f))}); err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	return fd
}

// TestKernelAttachTakesControlLock holds flock(LOCK_EX) on /dev/loop-control
// as systemd does while it sets up a device: Attach must wait for it, bind
// nothing meanwhile, honour its context while waiting, and go ahead once the
// lock is released.
func TestKernelAttachTakesControlLock(t *testing.T) {
	lock := holdControlLock(t)
	f := kerneltest.TempFile(t, 1<<20)

	// Given up while waiting: nothing is bound, and the lock is left as
	// it was.
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		d, err := Attach(ctx, f.Name(), Options{})
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
		d, err := Attach(context.Background(), f.Name(), Options{Flags: FlagAutoClear})
		if err != nil {
			t.Error(err)
		}
		attached <- d
	}()
	waitLockRequest(t, ControlPath)
	if found, err := FindByBackingFile(f.Name()); err != nil || len(found) != 0 {
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
	lockWaiters.Wait()
	if err := unix.Flock(lock, unix.LOCK_EX|unix.LOCK_NB); err != nil {
		t.Fatalf("the control lock after Attach: %v", err)
	}
}

// holdControlLock takes flock(LOCK_EX) on /dev/loop-control through a
// descriptor of its own, as another process would, and returns the
// descriptor, closed at the end of the test. The process's shared control
// device is made anew for the test.
func holdControlLock(t *testing.T) int {
	t.Helper()
	kerneltest.Require(t)
	useKernel(t, osKernel{})
	lock, err := unix.Open(ControlPath, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(lock) })
	if err := unix.Flock(lock, unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	return lock
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

// TestKernelPreferDirectIO: PreferDirectIO binds with direct I/O where
// the backing file system takes O_DIRECT and the offset is aligned, and
// buffered elsewhere (tmpfs before Linux 6.6, an offset of 256 bytes on a
// disk's file system),
// without an error, through LOOP_CONFIGURE and through the calls before
// it; Status and sysfs say which it got. With FlagDirectIO, which demands
// it, a file system without O_DIRECT is still an error.
func TestKernelPreferDirectIO(t *testing.T) {
	kerneltest.Require(t)
	dirs := map[string]string{"/tmp": t.TempDir(), "tmpfs": mountT(t, "tmpfs", 0)}
	for _, legacy := range []bool{false, true} {
		for fsName, dir := range dirs {
			for _, offset := range []uint64{0, 256} {
				name := fmt.Sprintf("%s,offset=%d,legacy=%v", fsName, offset, legacy)
				t.Run(name, func(t *testing.T) {
					if legacy {
						useForced(t, map[uint]error{reqConfigure: unix.ENOTTY})
					}
					f := fileIn(t, dir, 2<<20)
					o := Options{Offset: offset, BlockSize: 4096, PreferDirectIO: true}
					d := attachT(t, f.Name(), o)
					s, err := d.Status()
					if err != nil {
						t.Fatal(err)
					}
					got := s.Flags&FlagDirectIO != 0
					want := offset == 0 && directIOOK(t, dir)
					// An offset of 256 bytes is not aligned to a disk's
					// blocks; tmpfs has no disk, and there some kernels
					// give direct I/O at any offset (6.12), others not
					// (6.18).
					var sfs unix.Statfs_t
					if err := unix.Statfs(dir, &sfs); err != nil {
						t.Fatal(err)
					}
					if offset != 0 && sfs.Type == unix.TMPFS_MAGIC {
						want = got
					}
					if got != want {
						t.Fatalf("kernel %s, %s: direct I/O %v, want %v (Status %+v)", kerneltest.Release(), name, got, want, s)
					}
					if dio := readAttr(t, d.Number(), "loop/dio"); dio != map[bool]string{false: "0", true: "1"}[got] {
						t.Fatalf("sysfs loop/dio %s, Status says %v", dio, got)
					}
					// The device works either way: a block written through
					// it is in the file.
					block := bytes.Repeat([]byte{0xa5}, 4096)
					if err := writeDevice(d, block, 4096); err != nil {
						t.Fatal(err)
					}
					back := make([]byte, 4096)
					if _, err := f.ReadAt(back, int64(offset)+4096); err != nil || !bytes.Equal(back, block) {
						t.Fatalf("the block written through the device is not in the file: %v", err)
					}
					t.Logf("kernel %s, %s: direct I/O %v", kerneltest.Release(), name, got)

					if !want && offset == 0 {
						// Another file: this one is bound, buffered.
						g := fileIn(t, dir, 2<<20)
						o.Flags |= FlagDirectIO
						_, err := Attach(context.Background(), g.Name(), o)
						wantNoDirectIO(t, err, g.Name())
					}
				})
			}
		}
	}
}

// fileIn makes a file of size bytes in dir for the test.
func fileIn(t *testing.T, dir string, size int64) *os.File {
	t.Helper()
	f, err := os.CreateTemp(dir, "image-*.img")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close(); os.Remove(f.Name()) })
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	return f
}

// writeDevice writes b at off through d's node, and syncs it, which
// writes it through to the backing file.
func writeDevice(d *Device, b []byte, off int64) error {
	w, err := os.OpenFile(d.Path(), os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer w.Close()
	if _, err := w.WriteAt(b, off); err != nil {
		return err
	}
	return w.Sync()
}
