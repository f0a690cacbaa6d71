package loopctl

import (
	"context"
	"errors"
	"io/fs"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// flockOf is the flock(2) operation that gives a Device each LockMode,
// without waiting.
var flockOf = [...]int{LockNone: unix.LOCK_UN, LockShared: unix.LOCK_SH | unix.LOCK_NB, LockExclusive: unix.LOCK_EX | unix.LOCK_NB}

// lockDevice takes flock(LOCK_EX) on device d, which LOOP_CTL_GET_FREE
// named unbound. Another process may hold the lock. A shared holder is
// udev probing the device after a change: it takes LOCK_SH|LOCK_NB for the
// milliseconds its probe takes, and skips a device locked otherwise.
// lockDevice waits for it, as systemd's tools do, while ctx allows, so
// that Attach binds the device the kernel named, as losetup does. An
// exclusive holder is a tool setting the device up, which will bind it:
// EWOULDBLOCK, a lost race.
func lockDevice(ctx context.Context, d *Device) error {
	err := d.h.flock(unix.LOCK_EX | unix.LOCK_NB)
	if err != unix.EWOULDBLOCK {
		return err
	}
	if err := d.h.flock(unix.LOCK_SH | unix.LOCK_NB); err != nil {
		return err
	}
	// Holding a shared lock beside the prober's, ask for the exclusive
	// one: the kernel drops the shared lock and waits for the others'.
	if ctx.Done() == nil {
		return d.h.flock(unix.LOCK_EX)
	}
	got := make(chan error, 1)
	go func() { got <- d.h.flock(unix.LOCK_EX) }()
	select {
	case err := <-got:
		return err
	case <-ctx.Done():
		// The caller closes d: the flock in flight keeps the descriptor
		// until it returns, and the close then drops the lock.
		return ctx.Err()
	}
}

// The attach lock. This process's attachers take turns, so that they do
// not all chase the number LOOP_CTL_GET_FREE gives them at once; the turn
// is a one-slot channel, so that waiting for it honours a context. The
// holder of the turn then takes flock(LOCK_EX) on /dev/loop-control, the
// lock systemd's loop-util holds across LOOP_CTL_GET_FREE, open and bind,
// so that other processes that follow the convention (systemd's tools,
// losetup under flock(1), other loopctl programs) take turns with it. The
// control device's lock is taken first and the device's second, always, as
// systemd does.
//
// lockAttach takes this process's turn and then the lock of the process's
// control device, which it returns: nil without a control device, when the
// turn alone is taken. It honours ctx while it waits for either.
func (s *system) lockAttach(ctx context.Context) (*Control, error) {
	select {
	case s.turn <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	c, err := s.sharedControl()
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, nil
		}
		<-s.turn
		return nil, err
	}
	err = c.h.flock(unix.LOCK_EX | unix.LOCK_NB)
	if err == unix.EWOULDBLOCK {
		if ctx.Done() != nil {
			if err := s.waitControlLock(ctx, c); err != nil {
				return nil, err
			}
			return c, nil
		}
		err = c.h.flock(unix.LOCK_EX) // a context that never ends
	}
	if err != nil {
		<-s.turn
		return nil, newError("lock", ControlPath, err)
	}
	return c, nil
}

// waitControlLock waits, holding the turn, for the control device's lock
// that another process holds. A blocking flock cannot be interrupted, so
// it runs in a goroutine that hands the lock over, or, when ctx ends first,
// releases the lock as soon as it gets it, and then the turn: until then no
// other attacher of this process may use the control device's lock, which
// they all share.
func (s *system) waitControlLock(ctx context.Context, c *Control) error {
	got := make(chan error) // the hand-over: no buffer
	abandoned := make(chan struct{})
	s.lockWaiters.Add(1)
	go func() {
		defer s.lockWaiters.Done()
		err := c.h.flock(unix.LOCK_EX)
		select {
		case got <- err:
		case <-abandoned:
			if err == nil {
				s.unlockControl(c)
			}
			<-s.turn
		}
	}()
	select {
	case err := <-got:
		if err != nil {
			<-s.turn
			return newError("lock", ControlPath, err)
		}
		return nil
	case <-ctx.Done():
		close(abandoned)
		return ctx.Err()
	}
}

// unlockAttach releases what lockAttach took.
func (s *system) unlockAttach(c *Control) {
	if c != nil {
		s.unlockControl(c)
	}
	<-s.turn
}

// unlockControl releases the control device's lock. Should the device
// refuse LOCK_UN, closing it is what surely releases the lock: the next
// Attach opens it again.
func (s *system) unlockControl(c *Control) {
	if c.h.flock(unix.LOCK_UN) == nil {
		return
	}
	s.shared.mu.Lock()
	if s.shared.c == c {
		s.shared.c = nil
	}
	s.shared.mu.Unlock()
	c.Close()
}

// sharedControl returns the system's shared Control (for host, the
// process's), opening it if need be. A missing /dev/loop-control is an
// error matching fs.ErrNotExist, asked again next time (the driver may be
// loaded later).
func (s *system) sharedControl() (*Control, error) {
	s.shared.mu.Lock()
	defer s.shared.mu.Unlock()
	if s.shared.c == nil {
		c, err := s.open()
		if err != nil {
			return nil, err
		}
		s.shared.c = c
	}
	return s.shared.c, nil
}

// A deviceState is what a Device keeps on Linux.
type deviceState struct {
	// seq is the disk sequence number of the binding this Device made
	// (Attach, Configure, SetFD) or was opened for (OpenBinding): 0 if
	// none, or on a kernel without.
	seq  atomic.Uint64
	lock lockState // the LockMode the Device holds
}

// A lockState is the LockMode a Device holds, and what orders its
// changes.
type lockState struct {
	mu   sync.Mutex
	mode atomic.Int32
}

// errLockHeld is why a lock could not be taken without waiting.
var errLockHeld error = explain("another process holds a lock of the device that this one conflicts with "+
	"(udev, while it probes the device, holds a shared one for a few milliseconds)", unix.EWOULDBLOCK, ErrBusy)

// setLock is Lock.
func (d *Device) setLock(m LockMode) error {
	const op = "lock"
	h, err := d.handle(op)
	if err != nil {
		return err
	}
	if m < LockNone || m > LockExclusive {
		return newError(op, d.path, invalid("unknown lock mode %d", int(m)))
	}
	d.lock.mu.Lock()
	defer d.lock.mu.Unlock()
	err = h.flock(flockOf[m])
	if err == unix.EWOULDBLOCK {
		// The kernel lets go of the lock it changes before it finds the
		// conflict: take back the one d held.
		if prev := LockMode(d.lock.mode.Load()); prev != LockNone {
			if perr := h.flock(flockOf[prev]); perr != nil {
				d.lock.mode.Store(int32(LockNone))
				err = errors.Join(errLockHeld, inStep("taking back the "+prev.String()+" lock", perr))
				return newError(op, d.path, err)
			}
		}
		return newError(op, d.path, errLockHeld)
	}
	if err != nil {
		return newError(op, d.path, inStep("flock", err))
	}
	d.lock.mode.Store(int32(m))
	return nil
}
