//go:build !loopctl_stub

package loopctl

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/call"

	"github.com/loopctl/loopctl/internal/sysfs"
)

// A Monitor reports changes of loop devices: devices added and removed,
// bound and unbound, resized, partitions added and removed. It listens to
// the kernel's uevents (a NETLINK_KOBJECT_UEVENT socket), and where those
// cannot arrive (a network namespace owned by a user namespace other than
// the machine's: a container with its own user namespace) it polls sysfs.
// It is safe for concurrent use; Next calls take turns.
type Monitor struct {
	f       *os.File // the uevent socket; nil when polling
	polling bool
	closed  atomic.Bool
	done    chan struct{} // closed by Close: wakes a polling Next
	every   atomic.Int64  // the polling interval, in nanoseconds

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

// OpenMonitor starts watching the loop devices. It listens to the kernel's
// uevents where they can arrive, and polls sysfs elsewhere (see Polling);
// as root the uevent socket's receive buffer is made large enough for a
// burst of a thousand binds. Events from before OpenMonitor are not
// reported: List tells how things stand.
func OpenMonitor() (*Monitor, error) {
	m := &Monitor{buf: make([]byte, 1<<16), oob: make([]byte, unix.CmsgSpace(unix.SizeofUcred)), done: make(chan struct{})}
	m.every.Store(int64(defaultPollInterval))
	if kernelEventsArrive() {
		f, err := openNetlinkGroup(1, monitorRcvBuf)
		if err != nil {
			return nil, newError("monitor", "uevent socket", err)
		}
		m.f = f
	} else {
		m.polling = true
	}
	last, err := scanDevices(m.polling)
	if err != nil {
		m.Close()
		return nil, newError("monitor", sysfsRoot+"/block", err)
	}
	m.last = last
	return m, nil
}

// kernelEventsArrive tells whether this process's network namespace is
// owned by the machine's own user namespace, the only one kernel uevents
// reach. Where that cannot be told (no /proc, a kernel before 4.11), it
// assumes they do.
func kernelEventsArrive() bool {
	initial, err := initialUserNS("/proc/self/ns/net")
	return err != nil || initial
}

// openNetlinkGroup opens a uevent socket on multicast group g (1: the
// kernel's events; 2: udev's), with the senders' credentials passed,
// non-blocking for the runtime's poller, and a receive buffer of rcvBuf
// bytes where that is not 0 (forced as root, else as large as allowed).
func openNetlinkGroup(g uint32, rcvBuf int) (*os.File, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, unix.NETLINK_KOBJECT_UEVENT)
	if err != nil {
		return nil, os.NewSyscallError("socket", err)
	}
	if rcvBuf != 0 && unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, rcvBuf) != nil {
		unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, rcvBuf)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PASSCRED, 1); err != nil {
		unix.Close(fd)
		return nil, os.NewSyscallError("setsockopt", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: g}); err != nil {
		unix.Close(fd)
		return nil, os.NewSyscallError("bind", err)
	}
	return os.NewFile(uintptr(fd), "uevent"), nil
}

// Polling reports whether the Monitor polls sysfs, kernel uevents not
// reaching this process's network namespace. A polling Monitor reports a
// change at its next look (SetPollInterval), with Seq 0, and sees only
// states: a device bound and unbound again between two looks goes
// unseen, except by its disk sequence number, which a look after the
// unbind shows moved on (Linux 5.15 and later; the events of such a
// binding are then its Bound and Unbound).
func (m *Monitor) Polling() bool { return m.polling }

// SetPollInterval sets how often a polling Monitor looks at sysfs: 1 s
// unless set; at least a millisecond.
func (m *Monitor) SetPollInterval(d time.Duration) { m.every.Store(int64(max(d, time.Millisecond))) }

// Close stops the Monitor; a Next waiting, on the socket or for the next
// poll, returns an error matching fs.ErrClosed. Close is idempotent.
func (m *Monitor) Close() error {
	if m == nil || m.closed.Swap(true) {
		return nil
	}
	close(m.done)
	if m.f != nil {
		return newError("close", "uevent socket", m.f.Close())
	}
	return nil
}

// Next returns the next event, waiting for one as long as ctx allows.
//
// An uevent's kind is checked against the kernel: a device's "change" is
// reported as EventBound or EventUnbound by what sysfs shows of it, and
// by its disk sequence number (Linux 5.15 and later), which tells a
// binding from the next: a binding already gone when its event is read
// is reported Bound and then Unbound, in order. Each binding's Bound and
// Unbound are reported once, though the kernel sends two events for an
// unbind. Before Linux 5.15 a binding made and gone before its event is
// read is not seen.
//
// Only the kernel's messages are read (a sender port of 0, credentials of
// uid 0): another process of the machine sending to the group is not
// listened to. When the kernel dropped events, because the receive buffer
// was full, Next returns an Event of kind EventLost: what happened
// meanwhile is unknown, and List tells how things stand.
func (m *Monitor) Next(ctx context.Context) (Event, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for len(m.pending) == 0 {
		if m.closed.Load() {
			return Event{}, newError("monitor", "uevent socket", fs.ErrClosed)
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

// receive reads one message and queues the events it makes.
func (m *Monitor) receive(ctx context.Context) error {
	n, oobn, from, err := recvNetlink(ctx, m.f, m.buf, m.oob)
	switch {
	case err == unix.ENOBUFS || err == unix.EMSGSIZE:
		// Dropped by the kernel, or cut short: lost either way.
		return m.lost()
	case errors.Is(err, fs.ErrClosed) || err != nil && m.closed.Load():
		return newError("monitor", "uevent socket", fs.ErrClosed)
	case err == ctx.Err() && err != nil:
		return err
	case err != nil:
		return newError("monitor", "uevent socket", err)
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

// longAgo is a read deadline that has passed: it wakes a read at once.
var longAgo = time.Unix(1, 0)

// recvNetlink receives one message on the netlink socket f, waiting as
// long as ctx allows: ctx's error when it ends first, recvmsg's errno
// (ENOBUFS: messages were dropped) as it is, and EMSGSIZE for a message
// longer than buf (MSG_TRUNC), whose rest is lost.
func recvNetlink(ctx context.Context, f *os.File, buf, oob []byte) (n, oobn int, from unix.Sockaddr, err error) {
	if err := ctx.Err(); err != nil {
		return 0, 0, nil, err
	}
	deadline, _ := ctx.Deadline()
	if err := f.SetReadDeadline(deadline); err != nil {
		return 0, 0, nil, err
	}
	stop := context.AfterFunc(ctx, func() { f.SetReadDeadline(longAgo) })
	defer stop()
	rc, err := f.SyscallConn()
	if err != nil {
		return 0, 0, nil, err
	}
	var rerr error
	var flags int
	err = rc.Read(func(fd uintptr) bool {
		rerr = call.Retry(func() (err error) {
			n, oobn, flags, from, err = unix.Recvmsg(int(fd), buf, oob, 0)
			return err
		})
		return rerr != unix.EAGAIN
	})
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		// ctx's deadline, which the poller may see a moment before ctx
		// does, or its cancellation.
		<-ctx.Done()
		return 0, 0, nil, ctx.Err()
	case err != nil:
		return 0, 0, nil, err
	case rerr != nil:
		return 0, 0, nil, rerr
	case flags&unix.MSG_TRUNC != 0:
		return 0, 0, nil, unix.EMSGSIZE
	}
	return n, oobn, from, nil
}

// fromKernel tells whether a message came from the kernel: its sender's
// port is 0, and its credentials, which the kernel fills in for any
// sender, are uid 0's.
func fromKernel(from unix.Sockaddr, oob []byte) bool {
	sa, ok := from.(*unix.SockaddrNetlink)
	return ok && sa.Pid == 0 && fromRoot(oob)
}

// fromRoot tells whether a message's credentials are root's.
func fromRoot(oob []byte) bool {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return false
	}
	for i := range msgs {
		if cred, err := unix.ParseUnixCredentials(&msgs[i]); err == nil {
			return cred.Uid == 0
		}
	}
	return false
}

// lost queues an EventLost and takes the devices' state afresh, so that
// what is reported next follows from what is now.
func (m *Monitor) lost() error {
	last, err := scanDevices(false)
	if err != nil {
		return newError("monitor", sysfsRoot+"/block", err)
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
	now, err := readDevState(e.number, false)
	if err != nil {
		return newError("monitor", sysfs.LoopDir(sysfsRoot, e.number), err)
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
		return newError("monitor", sysfsRoot+"/block", fs.ErrClosed)
	case <-t.C:
	}
	now, err := scanDevices(true)
	if err != nil {
		return newError("monitor", sysfsRoot+"/block", err)
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

// scanDevices reads the state of every loop device in sysfs; with full,
// their sizes and partitions too.
func scanDevices(full bool) (map[int]devState, error) {
	nums, err := loopNumbers()
	if err != nil {
		return nil, err
	}
	out := make(map[int]devState, len(nums))
	for _, n := range nums {
		s, err := readDevState(n, full)
		if err != nil {
			return nil, err
		}
		out[n] = s
	}
	return out, nil
}

// readDevState reads from sysfs what the kernel shows of device n now:
// bound or not, its disk sequence number (0 before 5.15); with full, its
// size and partitions. What is missing is so (the device removed
// meanwhile, a kernel without diskseq); any other failure to read (EMFILE,
// say) is an error, never a state.
func readDevState(n int, full bool) (devState, error) {
	var s devState
	dir := sysfs.LoopDir(sysfsRoot, n)
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
