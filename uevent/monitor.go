package uevent

import (
	"context"
	"os"
	"sync/atomic"
	"time"
)

// A Monitor reports changes of loop devices: devices added and removed,
// bound and unbound, resized, partitions added and removed. It listens to
// the kernel's uevents (a NETLINK_KOBJECT_UEVENT socket), and where those
// cannot arrive (a network namespace owned by a user namespace other than
// the machine's: a container with its own user namespace) it polls sysfs.
// It is safe for concurrent use; Next calls take turns.
type Monitor struct {
	f            *os.File // the uevent socket; nil when polling
	polling      bool
	closed       atomic.Bool
	done         chan struct{} // closed by Close: wakes a polling Next
	every        atomic.Int64  // the polling interval, in nanoseconds
	monitorState               // what the platform keeps
}

// Open starts watching the loop devices. It listens to the kernel's
// uevents where they can arrive, and polls sysfs elsewhere (see Polling);
// as root the uevent socket's receive buffer is made large enough for a
// burst of a thousand binds. Events from before Open are not reported:
// loopctl.List tells how things stand.
func Open() (*Monitor, error) { return openHost() }

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
// poll, returns an error matching [fs.ErrClosed]. Close is idempotent.
func (m *Monitor) Close() error {
	if m == nil || m.closed.Swap(true) {
		return nil
	}
	if m.done != nil { // a zero Monitor has none
		close(m.done)
	}
	if m.f != nil {
		return newError("close", "", m.f.Close())
	}
	return nil
}

// Next returns the next event, waiting for one as long as ctx allows. A
// device's change is reported as [EventBound] or [EventUnbound] by what
// sysfs shows and by its disk sequence number, so that each binding's
// Bound and Unbound come once and in order, even for a binding gone when
// its event is read (before Linux 5.15, which numbers no binding, such a
// binding is not seen). Only the kernel's messages are read. Where the
// kernel dropped events (a full receive buffer) Next returns an
// [EventLost]: [loopctl.List] tells how things stand.
func (m *Monitor) Next(ctx context.Context) (Event, error) { return m.next(ctx) }
