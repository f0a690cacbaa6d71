//go:build integration

package uevent

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/loopctl/loopctl"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/kerneltest"
)

// TestKernelMonitor: a Monitor sees a device of the test's added, bound,
// resized, given a partition and rid of it, unbound and removed, with
// the device's number and the binding's disk sequence number.
func TestKernelMonitor(t *testing.T) {
	m := openMonitor(t)
	if m.Polling() {
		t.Fatalf("polling, in the machine's own network namespace")
	}
	c := openControl(t)
	n, err := c.Add(loopctl.AnyNumber)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Remove(n) })
	expect(t, m, n, "add", Event{Kind: EventAdded, Number: n, DiskSeq: kerneltest.DiskSeq(t, n)})

	d, err := loopctl.OpenDevice(n)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { detach(t, d) }) // on failure; Detach below otherwise
	f := kerneltest.TempFile(t, 8<<20)
	if err := d.Configure(f, loopctl.Options{Flags: loopctl.FlagPartScan}); err != nil {
		t.Fatal(err)
	}
	seq, err := d.DiskSeq()
	if err != nil {
		t.Fatal(err)
	}
	expect(t, m, n, "bind", Event{Kind: EventBound, Number: n, DiskSeq: seq})

	if err := f.Truncate(16 << 20); err != nil {
		t.Fatal(err)
	}
	if err := d.SetCapacity(); err != nil {
		t.Fatal(err)
	}
	expect(t, m, n, "SetCapacity", Event{Kind: EventResized, Number: n, DiskSeq: seq})

	release := addPartition(t, d, 1, 2048, 1024)
	expect(t, m, n, "addpart", Event{Kind: EventPartitionAdded, Number: n, Partition: 1, DiskSeq: seq})
	// udev, where it runs, opens the new partition to probe it, holding a
	// shared lock of the disk, and the kernel refuses to delete an open
	// partition (EBUSY): an exclusive lock of the disk waits out the
	// probe and keeps the next one off, as a partitioning tool's does.
	// (WaitUdev waits for the binding's event, not the partition's.)
	release()
	unlock := kerneltest.LockNode(t, d.Path(), unix.LOCK_EX)
	out, err := exec.Command("delpart", d.Path(), "1").CombinedOutput()
	unlock()
	if err != nil {
		t.Fatalf("delpart: %v: %s", err, out)
	}
	expect(t, m, n, "delpart", Event{Kind: EventPartitionRemoved, Number: n, Partition: 1, DiskSeq: seq})

	if err := d.Detach(context.Background()); err != nil {
		t.Fatal(err)
	}
	expect(t, m, n, "detach", Event{Kind: EventUnbound, Number: n, DiskSeq: seq})

	// A synthetic "change", as udev writes one when a writer closes a
	// device, reports nothing: the device's next event is its removal.
	if err := os.WriteFile(filepath.Join("/sys/block", "loop"+strconv.Itoa(n), "uevent"), []byte("change"), 0); err != nil {
		t.Fatal(err)
	}
	removed := kerneltest.DiskSeq(t, n)
	if err := c.Remove(n); err != nil {
		t.Fatal(err)
	}
	e := nextOf(t, m, n)
	if e.Kind != EventRemoved || e.Number != n || seq != 0 && e.DiskSeq < removed {
		t.Fatalf("remove: event %+v, want loop%d removed (diskseq %d or later)", e, n, removed)
	}
}

// TestKernelMonitorLate: bindings made and gone before the Monitor reads
// their events are reported all the same, each Bound and Unbound once and
// in order, where the kernel numbers bindings (5.15 and later).
func TestKernelMonitorLate(t *testing.T) {
	m := openMonitor(t)
	if !kerneltest.AtLeast(t, 5, 15) {
		t.Skip("before Linux 5.15 a binding gone before its event is read is not seen")
	}
	c := openControl(t)
	d := newDevice(t, c)
	n := d.Number()
	d.Close()
	expect(t, m, n, "add", Event{Kind: EventAdded, Number: n, DiskSeq: kerneltest.DiskSeq(t, n)})
	f := kerneltest.TempFile(t, 1<<20)
	var seqs []uint64
	for range 5 {
		b, err := loopctl.OpenDevice(n)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { detach(t, b) }) // on failure; Detach below otherwise
		if err := b.Configure(f, loopctl.Options{}); err != nil {
			t.Fatal(err)
		}
		seq, _ := b.DiskSeq()
		seqs = append(seqs, seq)
		if err := b.Detach(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	for _, seq := range seqs {
		expect(t, m, n, "bind and detach", Event{Kind: EventBound, Number: n, DiskSeq: seq},
			Event{Kind: EventUnbound, Number: n, DiskSeq: seq})
	}
}

// bindAndClose binds a file of the test's binds times, each with autoclear
// and closed at once, and returns once every device it used is unbound:
// the devices' numbers.
func bindAndClose(t *testing.T, binds int) map[int]bool {
	t.Helper()
	f := kerneltest.TempFile(t, 1<<20)
	numbers := map[int]bool{}
	for range binds {
		d, err := loopctl.AttachFile(context.Background(), f, loopctl.Options{Flags: loopctl.FlagAutoClear})
		if err != nil {
			t.Fatal(err)
		}
		numbers[d.Number()] = true
		d.Close()
	}
	for n := range numbers {
		kerneltest.WaitUnbound(t, n)
	}
	return numbers
}

// TestKernelMonitorBurst: a thousand binds and unbinds while the Monitor
// reads nothing: its receive buffer holds their events, none is lost,
// and each binding is reported once.
func TestKernelMonitorBurst(t *testing.T) {
	m := openMonitor(t)
	const binds = 1000
	numbers := bindAndClose(t, binds)
	bound, unbound := 0, 0
	count := func(e Event) {
		switch {
		case e.Kind == EventLost:
			t.Fatalf("events lost after %d binds and %d unbinds read", bound, unbound)
		case !numbers[e.Number]:
		case e.Kind == EventBound:
			bound++
		case e.Kind == EventUnbound:
			unbound++
		}
	}
	if kerneltest.AtLeast(t, 5, 15) {
		// Every binding is reported: read until they are, or a minute
		// has passed; then on, for any reported twice.
		readUntil(t, m, func(e Event) bool {
			count(e)
			return bound >= binds && unbound >= binds
		})
	}
	readPastSentinel(t, m, count)
	// Before 5.15 a binding gone before its event was read is not seen.
	if kerneltest.AtLeast(t, 5, 15) && (bound != binds || unbound != binds) {
		t.Fatalf("%d binds and unbinds made, %d and %d reported", binds, bound, unbound)
	}
	t.Logf("%d binds and unbinds, %d and %d reported, on %s", binds, bound, unbound, kerneltest.Release())
}

const pollingChildEnv = "LOOPCTL_POLLING_CHILD"

// TestKernelMonitorPolling: in a network namespace of a user namespace of
// its own, where kernel uevents do not arrive, a Monitor polls, and sees
// a device that the test binds and unbinds.
func TestKernelMonitorPolling(t *testing.T) {
	if os.Getenv(pollingChildEnv) != "" {
		pollingChild(t)
		return
	}
	kerneltest.Require(t)
	cmd := exec.Command(os.Args[0], "-test.run=^TestKernelMonitorPolling$", "-test.v")
	cmd.Env = append(os.Environ(), pollingChildEnv+"=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWUSER | syscall.CLONE_NEWNET,
		UidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: 0, Size: 1}},
		GidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: 0, Size: 1}}}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		t.Skipf("no user namespace here: %v", err)
	}
	defer cmd.Wait()
	defer stdin.Close()
	lines := make(chan string)
	go func() {
		defer close(lines)
		buf := make([]byte, 4096)
		var rest string
		for {
			n, err := out.Read(buf)
			rest += string(buf[:n])
			for {
				line, more, ok := strings.Cut(rest, "\n")
				if !ok {
					break
				}
				lines <- line
				rest = more
			}
			if err != nil {
				return
			}
		}
	}()
	wait := func(prefix string) string {
		t.Helper()
		for line := range lines {
			if strings.HasPrefix(line, prefix) {
				return line
			}
			t.Log(line)
		}
		t.Fatalf("the child ended before saying %q", prefix)
		return ""
	}
	wait("polling ready")
	d := attachT(t, kerneltest.TempFile(t, 1<<20).Name(), loopctl.Options{})
	seq, _ := d.DiskSeq()
	if got, want := wait("event "), fmt.Sprintf("event bound %d %d", d.Number(), seq); got != want {
		t.Fatalf("polling Monitor: %q, want %q", got, want)
	}
	if err := d.Detach(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got, want := wait("event "), fmt.Sprintf("event unbound %d %d", d.Number(), seq); got != want {
		t.Fatalf("polling Monitor: %q, want %q", got, want)
	}
}

// pollingChild is TestKernelMonitorPolling's Monitor, in its namespaces:
// it reports the bind and unbind events it sees of bound devices' numbers.
func pollingChild(t *testing.T) {
	m, err := Open()
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if !m.Polling() {
		t.Fatal("not polling in a user namespace's network namespace")
	}
	m.SetPollInterval(10 * time.Millisecond)
	fmt.Println("polling ready")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for seen := 0; seen < 2; {
		e, err := m.Next(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if e.Kind == EventBound || e.Kind == EventUnbound {
			fmt.Printf("event %s %d %d\n", e.Kind, e.Number, e.DiskSeq)
			seen++
		}
	}
}

// TestKernelMonitorChurn: goroutines attaching and detaching, and
// losetup beside them, while a Monitor reads: every binding the
// goroutines made is reported Bound once and Unbound once, in that order,
// where the kernel numbers bindings (5.15 and later), unless a loss is
// reported; and for every device, Bound and Unbound alternate.
func TestKernelMonitorChurn(t *testing.T) {
	m := openMonitor(t)
	dir := t.TempDir()
	deadline := time.Now().Add(kerneltest.ChurnDuration(t) / 3)
	type binding struct {
		n   int
		seq uint64
	}
	made := make(chan binding, 1<<16)
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			f, err := os.Create(filepath.Join(dir, fmt.Sprintf("monitor-%d.img", g)))
			if err != nil {
				t.Error(err)
				return
			}
			defer f.Close()
			f.Truncate(1 << 20)
			for time.Now().Before(deadline) {
				d, err := loopctl.AttachFile(context.Background(), f, loopctl.Options{})
				if err != nil {
					t.Error(err)
					return
				}
				seq, _ := d.DiskSeq()
				made <- binding{d.Number(), seq}
				if err := d.Detach(context.Background()); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	var losetups, refused int
	wg.Go(func() { losetups, refused = losetupChurn(t, dir, deadline) })

	type report struct{ bound, unbound int }
	seen := map[binding]*report{}
	state := map[int]bool{} // by device: bound, as reported
	lost := false
	handle := func(e Event) {
		switch e.Kind {
		case EventLost:
			lost = true
			clear(state)
			return
		case EventBound, EventUnbound:
		default:
			return
		}
		bound := e.Kind == EventBound
		if was, ok := state[e.Number]; ok && was == bound {
			t.Errorf("loop%d reported %s twice in a row (%+v)", e.Number, e.Kind, e)
		}
		state[e.Number] = bound
		r := seen[binding{e.Number, e.DiskSeq}]
		if r == nil {
			r = &report{}
			seen[binding{e.Number, e.DiskSeq}] = r
		}
		if bound {
			r.bound++
		} else {
			r.unbound++
		}
	}
	// Read while the churn runs; then until every binding the goroutines
	// made is reported gone (where the kernel numbers bindings), and past
	// a sentinel, for any reported twice.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		wg.Wait()
		cancel()
	}()
	for {
		e, err := m.Next(ctx)
		if err != nil {
			if ctx.Err() != nil {
				break
			}
			t.Fatal(err)
		}
		handle(e)
	}
	close(made)
	var all []binding
	for b := range made {
		all = append(all, b)
	}
	numbered := kerneltest.AtLeast(t, 5, 15)
	if numbered && !lost {
		left := map[binding]bool{}
		for _, b := range all {
			if r := seen[b]; r == nil || r.unbound == 0 {
				left[b] = true
			}
		}
		if len(left) > 0 {
			readUntil(t, m, func(e Event) bool {
				handle(e)
				if e.Kind == EventUnbound {
					delete(left, binding{e.Number, e.DiskSeq})
				}
				return len(left) == 0 || lost
			})
		}
	}
	readPastSentinel(t, m, handle)
	count := len(all)
	for _, b := range all {
		if !numbered || lost {
			break
		}
		if r := seen[b]; r == nil || r.bound != 1 || r.unbound != 1 {
			t.Errorf("loop%d's binding %d: reported %+v, want bound and unbound once", b.n, b.seq, r)
		}
	}
	t.Logf("%d bindings made by the goroutines beside %d of losetup's (%d refused by the kernel), %d bindings reported, lost: %v, on %s",
		count, losetups, refused, len(seen), lost, kerneltest.Release())
	if count == 0 {
		t.Fatal("no binding made")
	}
}

// TestKernelMonitorHoldsNothing: a Monitor's looks at a device that
// changed, and its rescans, open what they read and close it: the
// process's descriptors are the same after each event as before.
func TestKernelMonitorHoldsNothing(t *testing.T) {
	m := openMonitor(t)
	f := kerneltest.TempFile(t, 1<<20)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// Each event is waited for before the next change: before Linux 5.15,
	// with no disk sequence numbers, the Monitor tells a change by the
	// state it reads.
	next := func(kind EventKind, n int) error {
		for {
			e, err := m.Next(ctx)
			if err != nil {
				return fmt.Errorf("waiting for %v of loop%d: %w", kind, n, err)
			}
			if e.Kind == kind && e.Number == n {
				return nil
			}
		}
	}
	// Attach keeps the control device it shares (see loopctl.Attach):
	// the count starts after it.
	d, err := loopctl.AttachFile(context.Background(), f, loopctl.Options{Flags: loopctl.FlagAutoClear})
	if err != nil {
		t.Fatal(err)
	}
	n := d.Number()
	d.Close()
	countDescriptors(t, "the Monitor's look at a bind", func() error { return next(EventBound, n) })
	kerneltest.WaitUnbound(t, n)
	countDescriptors(t, "the Monitor's look at an unbind", func() error { return next(EventUnbound, n) })
	countDescriptors(t, "a rescan", func() error {
		m.mu.Lock()
		defer m.mu.Unlock()
		return m.lost()
	})
}
