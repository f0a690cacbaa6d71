package uevent

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"slices"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/sysfs"
	"github.com/loopctl/loopctl/internal/userns"
)

// A monitorState is what a Monitor keeps on Linux.
type monitorState struct {
	root string // where sysfs is: sysfs.Root, or a test's tree

	mu      sync.Mutex
	pending []Event
	last    map[int]devState // by device: what was last reported of it
	buf     []byte
	oob     []byte
}

// A devState is what a Monitor knows of a device: bound or not, its disk
// sequence number, its size and its partitions (polling keeps the last
// two).
type devState struct {
	bound   bool
	diskSeq uint64
	size    uint64
	parts   []int
}

// defaultPollInterval is how often a polling Monitor looks, unless told.
const defaultPollInterval = time.Second

// monitorRcvBuf is the receive buffer asked for: a burst of 1,000 binds
// is some 3,000 events of about 1.5 KiB each in the kernel's accounting.
const monitorRcvBuf = 16 << 20

// open opens a Monitor of the devices in the sysfs tree at root, polling
// it, or listening to the kernel's uevents.
func open(root string, polling bool) (*Monitor, error) {
	m := &Monitor{polling: polling, done: make(chan struct{}),
		monitorState: monitorState{root: root, buf: make([]byte, 1<<16), oob: make([]byte, unix.CmsgSpace(unix.SizeofUcred))}}
	m.every.Store(int64(defaultPollInterval))
	if !polling {
		f, err := openNetlinkGroup(kernelGroup, monitorRcvBuf)
		if err != nil {
			return nil, newError("monitor", "", err)
		}
		m.f = f
	}
	last, err := m.scan(polling)
	if err != nil {
		m.Close()
		return nil, err
	}
	m.last = last
	return m, nil
}

// receive reads one message and queues the events it makes.
func (m *Monitor) receive(ctx context.Context) error {
	n, oobn, from, err := recvNetlink(ctx, m.f, m.buf, m.oob)
	switch {
	case err == unix.ENOBUFS || err == unix.EMSGSIZE:
		// Dropped by the kernel, or cut short: lost either way.
		return m.lost()
	case errors.Is(err, fs.ErrClosed) || err != nil && m.closed.Load():
		return newError("monitor", "", fs.ErrClosed)
	case err == ctx.Err() && err != nil:
		return err
	case err != nil:
		return newError("monitor", "", recvError(err))
	}
	if !fromKernel(from, m.oob[:oobn]) {
		return nil
	}
	// A synthetic event (udev writes "change" to a device's uevent file
	// when a writer closes it; udevadm trigger does too) reports no
	// change, and its disk sequence number is the device's, not a
	// binding's: the kernel sent an event of its own for every change.
	if e, ok := parseUevent(m.buf[:n]); ok && !e.synthetic {
		return m.translate(e)
	}
	return nil
}

// lost queues an EventLost and takes the devices' state afresh, so that
// what is reported next follows from what is now.
func (m *Monitor) lost() error {
	last, err := m.scan(false)
	if err != nil {
		return err
	}
	m.last = last
	m.pending = append(m.pending, Event{Kind: EventLost, Number: -1})
	return nil
}

// translate queues the events uevent e makes, checked against the kernel.
// An error reading the kernel's state ends it, and the event is lost.
func (m *Monitor) translate(e uevent) error {
	ev := Event{Number: e.number, Partition: e.partition, DiskSeq: e.diskSeq, Seq: e.seq}
	if e.partition != 0 {
		switch e.action {
		case "add":
			ev.Kind = EventPartitionAdded
		case "remove":
			ev.Kind = EventPartitionRemoved
		default:
			return nil
		}
		m.pending = append(m.pending, ev)
		return nil
	}
	switch e.action {
	case "add":
		ev.Kind = EventAdded
		m.last[e.number] = devState{diskSeq: e.diskSeq}
		m.pending = append(m.pending, ev)
		return nil
	case "remove":
		if last := m.last[e.number]; last.bound {
			m.pending = append(m.pending, Event{Kind: EventUnbound, Number: e.number, DiskSeq: last.diskSeq, Seq: e.seq})
		}
		delete(m.last, e.number)
		ev.Kind = EventRemoved
		m.pending = append(m.pending, ev)
		return nil
	}
	if e.resize {
		ev.Kind = EventResized
		m.pending = append(m.pending, ev)
		return nil
	}
	now, err := readDevState(m.root, e.number, false)
	if err != nil {
		return newError("monitor", "", err)
	}
	events, last := changes(m.last[e.number], now, e, ev)
	m.pending = append(m.pending, events...)
	m.last[e.number] = last
	return nil
}

// changes returns the Bound and Unbound events that a change uevent e
// makes of a device (ev is e's event, without a kind), given what was
// last reported of it, last, and what the kernel shows now; and what is
// then reported of it.
//
// The disk sequence number of a change is its binding's: a change with a
// number newer than the last reported is that binding's bind, and if the
// device's number has moved on since, the binding is gone too; a change
// with the number last reported bound is that binding's unbind once the
// device's number has moved on, or the device shows no binding; an older
// one was reported already. Before Linux 5.15, states alone.
func changes(last, now devState, e uevent, ev Event) ([]Event, devState) {
	bound := func(seq uint64) Event { ev.Kind, ev.DiskSeq = EventBound, seq; return ev }
	unbound := func(seq uint64) Event { ev.Kind, ev.DiskSeq = EventUnbound, seq; return ev }
	if e.diskSeq == 0 {
		switch {
		case now.bound && !last.bound:
			return []Event{bound(0)}, devState{bound: true}
		case !now.bound && last.bound:
			return []Event{unbound(0)}, devState{}
		}
		return nil, last
	}
	gone := now.diskSeq > e.diskSeq || !now.bound
	switch {
	case e.diskSeq < last.diskSeq:
		return nil, last // reported already
	case e.diskSeq == last.diskSeq:
		if last.bound && gone {
			return []Event{unbound(e.diskSeq)}, devState{diskSeq: e.diskSeq}
		}
		return nil, last
	}
	var out []Event
	if last.bound {
		out = append(out, unbound(last.diskSeq))
	}
	out = append(out, bound(e.diskSeq))
	if now.diskSeq > e.diskSeq {
		return append(out, unbound(e.diskSeq)), devState{diskSeq: e.diskSeq}
	}
	return out, devState{bound: true, diskSeq: e.diskSeq}
}

// poll waits for the polling interval, or ctx, then looks at sysfs and
// queues the differences from the last look.
func (m *Monitor) poll(ctx context.Context) error {
	t := time.NewTimer(time.Duration(m.every.Load()))
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-m.done:
		return newError("monitor", "", fs.ErrClosed)
	case <-t.C:
	}
	now, err := m.scan(true)
	if err != nil {
		return err
	}
	m.pending = append(m.pending, pollEvents(m.last, now)...)
	m.last = now
	return nil
}

// pollEvents returns the events that take the devices from the state
// before to the state now, in order of device number.
func pollEvents(before, now map[int]devState) []Event {
	nums := make([]int, 0, len(before)+len(now))
	for n := range before {
		nums = append(nums, n)
	}
	for n := range now {
		if _, ok := before[n]; !ok {
			nums = append(nums, n)
		}
	}
	slices.Sort(nums)
	var out []Event
	for _, n := range nums {
		b, wasThere := before[n]
		a, isThere := now[n]
		if !wasThere {
			out = append(out, Event{Kind: EventAdded, Number: n})
		}
		for _, p := range b.parts {
			if !isThere || !slices.Contains(a.parts, p) {
				out = append(out, Event{Kind: EventPartitionRemoved, Number: n, Partition: p, DiskSeq: b.diskSeq})
			}
		}
		rebound := b.bound && a.bound && a.diskSeq != b.diskSeq
		if b.bound && (!a.bound || rebound) {
			out = append(out, Event{Kind: EventUnbound, Number: n, DiskSeq: b.diskSeq})
		}
		if a.bound && (!b.bound || rebound) {
			out = append(out, Event{Kind: EventBound, Number: n, DiskSeq: a.diskSeq})
		} else if a.bound && a.size != b.size {
			out = append(out, Event{Kind: EventResized, Number: n, DiskSeq: a.diskSeq})
		}
		for _, p := range a.parts {
			if !slices.Contains(b.parts, p) {
				out = append(out, Event{Kind: EventPartitionAdded, Number: n, Partition: p, DiskSeq: a.diskSeq})
			}
		}
		if !isThere {
			out = append(out, Event{Kind: EventRemoved, Number: n})
		}
	}
	return out
}

// scan reads the state of every loop device in sysfs; with full, their
// sizes and partitions too.
func (m *Monitor) scan(full bool) (map[int]devState, error) {
	nums, err := sysfs.LoopNumbers(m.root)
	if err != nil {
		return nil, newError("monitor", "", err)
	}
	out := make(map[int]devState, len(nums))
	for _, n := range nums {
		s, err := readDevState(m.root, n, full)
		if err != nil {
			return nil, newError("monitor", "", err)
		}
		out[n] = s
	}
	return out, nil
}

// readDevState reads from the sysfs tree at root what the kernel shows of device n now:
// bound or not, its disk sequence number (0 before 5.15); with full, its
// size and partitions. What is missing is so (the device removed
// meanwhile, a kernel without diskseq); any other failure to read (EMFILE,
// say) is an error, never a state.
func readDevState(root string, n int, full bool) (devState, error) {
	var s devState
	dir := sysfs.LoopDir(root, n)
	_, err := os.Lstat(dir + "/loop")
	if s.bound = err == nil; err != nil && !errors.Is(err, fs.ErrNotExist) {
		return devState{}, err
	}
	var buf [sysfs.BufSize]byte
	read := func(attr string, v *uint64) error {
		b, err := sysfs.ReadFile(dir+"/"+attr, buf[:])
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err == nil {
			*v, _ = sysfs.Uint(b)
		}
		return err
	}
	if err := read("diskseq", &s.diskSeq); err != nil || !full {
		return s, err
	}
	if err := read("size", &s.size); err != nil {
		return devState{}, err
	}
	s.parts, err = sysfs.Partitions(dir, n)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return devState{}, err
	}
	return s, nil
}

// next is Next.
func (m *Monitor) next(ctx context.Context) (Event, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for len(m.pending) == 0 {
		if m.closed.Load() {
			return Event{}, newError("monitor", "", fs.ErrClosed)
		}
		var err error
		if m.polling {
			err = m.poll(ctx)
		} else {
			err = m.receive(ctx)
		}
		if err != nil {
			return Event{}, err
		}
	}
	e := m.pending[0]
	m.pending = m.pending[1:]
	return e, nil
}

// openHost opens a Monitor of this machine's loop devices.
func openHost() (*Monitor, error) { return open(sysfs.Root, !userns.EventsArrive()) }
