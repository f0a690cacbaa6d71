//go:build integration

package loopctl

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/kerneltest"
)

func TestKernelAttachReuse(t *testing.T) {
	f := kerneltest.TempFile(t, 2<<20)
	o := Options{Offset: 1 << 20, SizeLimit: 512 << 10, Flags: FlagReadOnly, Reuse: true}
	first := attachT(t, f.Name(), o)
	if first.Shared() {
		t.Fatal("the first device is shared")
	}
	// The same file, by another name too.
	link := filepath.Join(t.TempDir(), "link.img")
	if err := os.Link(f.Name(), link); err != nil {
		t.Fatal(err)
	}
	for _, path := range []string{f.Name(), link} {
		d, err := Attach(context.Background(), path, o)
		if err != nil {
			t.Fatal(err)
		}
		if d.Number() != first.Number() || !d.Shared() {
			t.Fatalf("Attach(%s, Reuse) = loop%d, shared %v; want loop%d, shared", path, d.Number(), d.Shared(), first.Number())
		}
		checkBound(t, d, f.Name(), Options{Offset: o.Offset, SizeLimit: o.SizeLimit, Flags: o.Flags})
		d.Close()
	}
	for name, tt := range map[string]struct {
		o       Options
		differs string
	}{
		"overlapping":     {Options{Offset: 1<<20 + 4096}, "another range"},
		"read-write":      {Options{Offset: 1 << 20, SizeLimit: 512 << 10}, "read-only on, asked off"},
		"4 KiB blocks":    {Options{Offset: 1 << 20, SizeLimit: 512 << 10, BlockSize: 4096, Flags: FlagReadOnly}, "block size 512, asked 4096"},
		"the whole image": {Options{Flags: FlagReadOnly}, "another range"},
		"partscan":        {Options{Offset: 1 << 20, SizeLimit: 512 << 10, Flags: FlagReadOnly | FlagPartScan}, "partscan off, asked on"},
		"autoclear":       {Options{Offset: 1 << 20, SizeLimit: 512 << 10, Flags: FlagReadOnly | FlagAutoClear}, "autoclear off, asked on"},
		"an owner":        {Options{Offset: 1 << 20, SizeLimit: 512 << 10, Flags: FlagReadOnly, Ref: "mine"}, `asked "mine"`},
	} {
		t.Run(name, func(t *testing.T) {
			o := tt.o
			o.Reuse = true
			_, err := Attach(context.Background(), f.Name(), o)
			var oe *OverlapError
			if !errors.Is(err, ErrOverlap) || !errors.As(err, &oe) || oe.Device != first.Path() || oe.Status.BackingFile != f.Name() ||
				!strings.Contains(err.Error(), tt.differs) {
				t.Fatalf("Attach(%+v) = %v, want ErrOverlap naming %s and %q", o, err, first.Path(), tt.differs)
			}
		})
	}
	// What was left unsaid is not compared: PreferDirectIO.
	if d, err := Attach(context.Background(), f.Name(), Options{Offset: 1 << 20, SizeLimit: 512 << 10, Flags: FlagReadOnly,
		PreferDirectIO: true, Reuse: true}); err != nil || !d.Shared() || d.Number() != first.Number() {
		t.Fatalf("Attach with PreferDirectIO = %v, %v; want %s shared", d, err, first.Path())
	} else {
		d.Close()
	}
	// The first megabyte does not overlap: a device of its own.
	d := attachT(t, f.Name(), Options{SizeLimit: 1 << 20, Reuse: true})
	if d.Shared() || d.Number() == first.Number() {
		t.Fatalf("loop%d, shared %v; want a device of its own", d.Number(), d.Shared())
	}
}

// TestKernelAttachReuseRace starts processes that attach one image with
// Reuse at the same moment: they must end with one device between them.
func TestKernelAttachReuseRace(t *testing.T) {
	if path := os.Getenv("LOOPCTL_REUSE_CHILD"); path != "" {
		reuseChild(t, path)
		return
	}
	kerneltest.Require(t)
	const procs, goroutines = 4, 4
	f := kerneltest.TempFile(t, 1<<20)
	var children []*pipedChild
	for range procs {
		children = append(children, startPiped(t, "TestKernelAttachReuseRace",
			"LOOPCTL_REUSE_CHILD="+f.Name(), "LOOPCTL_REUSE_GOROUTINES="+strconv.Itoa(goroutines)))
	}
	// Each child says "ready" once its control device is open; then all go.
	for _, c := range children {
		for c.out.Scan() && c.out.Text() != "ready" {
		}
	}
	for _, c := range children {
		io.WriteString(c.stdin, "go\n")
	}
	devices := map[string]int{}
	shared := 0
	for _, c := range children {
		for c.out.Scan() && c.out.Text() != "held" {
			var dev string
			var sh bool
			if _, err := fmt.Sscanf(c.out.Text(), "attached %s %t", &dev, &sh); err == nil {
				devices[dev]++
				if sh {
					shared++
				}
			}
		}
	}
	if len(devices) != 1 || shared != procs*goroutines-1 {
		t.Errorf("%d attachers ended with devices %v, %d of them shared; want one device, all but one shared",
			procs*goroutines, devices, shared)
	}
	for i, c := range children {
		c.stdin.Close() // let go: the last close detaches (autoclear)
		if err := c.cmd.Wait(); err != nil {
			t.Errorf("child %d: %v", i, err)
		}
	}
	// The last close detaches, and may be udev's: it opens a device a
	// writer closed, to probe it.
	for dev := range devices {
		if n, err := strconv.Atoi(strings.TrimPrefix(dev, "/dev/loop")); err == nil {
			kerneltest.WaitUnbound(t, n)
		}
	}
	if found, err := FindByBackingFile(f.Name()); err != nil || len(found) != 0 {
		t.Fatalf("left bound: %+v, %v", found, err)
	}
}

// reuseChild attaches path with Reuse from several goroutines once told
// to, reports the devices, and holds them until its input closes.
func reuseChild(t *testing.T, path string) {
	n, _ := strconv.Atoi(os.Getenv("LOOPCTL_REUSE_GOROUTINES"))
	// Internal state: the control device Attach keeps once made, opened
	// first so that the descriptor count leaves it out.
	if _, err := host.sharedControl(); err != nil {
		t.Fatal(err)
	}
	fmt.Println("ready")
	in := bufio.NewReader(os.Stdin)
	if line, _ := in.ReadString('\n'); strings.TrimSpace(line) != "go" {
		t.Fatal("no go")
	}
	devs := make(chan *Device, n)
	for range n {
		go func() {
			d, err := Attach(context.Background(), path, Options{Flags: FlagAutoClear, Reuse: true})
			if err != nil {
				t.Error(err)
			}
			devs <- d
		}()
	}
	var held []*Device
	for range n {
		if d := <-devs; d != nil {
			fmt.Printf("attached %s %t\n", d.Path(), d.Shared())
			held = append(held, d)
		}
	}
	fmt.Println("held")
	io.Copy(io.Discard, in)
	for _, d := range held {
		d.Close()
	}
}

// TestKernelAttachReuseUnderLock: Attach with Reuse looks for the file's
// device under the control lock. Another process (systemd's protocol)
// holds the lock and binds the file meanwhile; once it lets go, Attach
// must find that device, not bind one of its own.
func TestKernelAttachReuseUnderLock(t *testing.T) {
	lock, s := holdControlLock(t)
	f := kerneltest.TempFile(t, 1<<20)
	got := make(chan *Device, 1)
	go func() {
		d, err := s.Attach(context.Background(), f.Name(), Options{Reuse: true})
		if err != nil {
			t.Error(err)
		}
		got <- d
	}()
	waitLockRequest(t, ControlPath)
	// The other process binds the file, holding the lock.
	n, err := unix.IoctlRetInt(lock, unix.LOOP_CTL_GET_FREE)
	if err != nil {
		t.Fatal(err)
	}
	fd := rawBind(t, DevicePath(n), f)
	t.Cleanup(func() { unix.IoctlRetInt(fd, unix.LOOP_CLR_FD); unix.Close(fd) })
	if err := unix.Flock(lock, unix.LOCK_UN); err != nil {
		t.Fatal(err)
	}
	d := <-got
	if d == nil {
		t.FailNow()
	}
	if d.Number() != n {
		defer detach(t, d) // a binding of its own, wrongly
	} else {
		defer d.Close()
	}
	if d.Number() != n || !d.Shared() {
		t.Fatalf("Attach(Reuse) = loop%d, shared %v; want loop%d, bound while it waited for the lock", d.Number(), d.Shared(), n)
	}
}
