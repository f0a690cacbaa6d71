//go:build !loopctl_stub

package loopctl

import (
	"context"
	"errors"
	"io/fs"
	"math/rand/v2"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Attach binds the file at path to a free loop device and returns the
// device, open. The file is opened read-only with FlagReadOnly and
// read-write otherwise: a file that cannot be opened for writing is an
// error matching fs.ErrPermission, never a silent switch to read-only.
// Attach closes its own descriptor of the file once the device holds it.
//
// Each attempt asks /dev/loop-control for a free device (LOOP_CTL_GET_FREE),
// opens it, takes a BSD flock(LOCK_EX) on it so that udev does not probe a
// half-set-up device, and binds with one LOOP_CONFIGURE. When another
// process wins the device (EBUSY, or a lock held elsewhere) Attach closes
// it and tries again with a fresh LOOP_CTL_GET_FREE, with bounded backoff
// that honours ctx; it never clears a binding it did not make. Without
// /dev/loop-control (an old kernel, a container) it scans sysfs for an
// unbound device instead. The control device is opened once per process
// and kept open.
//
// On any failure Attach leaves nothing behind: no binding of its own and no
// open descriptor. Invalid options (fs.ErrInvalid), a missing file
// (fs.ErrNotExist), a directory and a done ctx (ctx.Err()) fail before any
// device is touched.
//
// With FlagAutoClear the kernel detaches the device when its last opener
// closes it. The returned Device is an opener, so the binding lives until
// its Close (and any other opener's, such as a mount's, after it).
func Attach(ctx context.Context, path string, o Options) (*Device, error) {
	const op = "attach"
	if err := ctx.Err(); err != nil {
		return nil, newError(op, path, err)
	}
	if err := o.validate(); err != nil {
		return nil, newError(op, path, err)
	}
	mode := unix.O_RDWR
	if o.Flags&FlagReadOnly != 0 {
		mode = unix.O_RDONLY
	}
	// A bare descriptor: it lives only for this call, and is nobody else's
	// to close concurrently.
	fd, err := openFD(path, mode)
	if err != nil {
		return nil, newError(op, path, err)
	}
	defer closeFD(fd)
	// A directory opened read-write has failed with EISDIR already.
	if mode == unix.O_RDONLY {
		if err := checkBackingFile(uintptr(fd), path); err != nil {
			return nil, newError(op, path, err)
		}
	}
	return attach(ctx, uintptr(fd), path, o)
}

// AttachFile is Attach for a file the caller has open; f stays the
// caller's to close. A nil, closed or directory f is refused as invalid.
// With FlagReadOnly the device is read-only whatever f's mode; without it,
// a read-only f gives a read-only device, as the kernel decides.
func AttachFile(ctx context.Context, f *os.File, o Options) (*Device, error) {
	const op = "attach"
	name := ""
	if f != nil {
		name = f.Name()
	}
	if err := ctx.Err(); err != nil {
		return nil, newError(op, name, err)
	}
	if err := o.validate(); err != nil {
		return nil, newError(op, name, err)
	}
	var d *Device
	err := withFile(op, name, f, func(fd uintptr) error {
		if err := checkBackingFile(fd, name); err != nil {
			return newError(op, name, err)
		}
		var err error
		d, err = attach(ctx, fd, name, o)
		return err
	})
	return d, err
}

// checkBackingFile refuses a directory before any device is touched.
func checkBackingFile(fd uintptr, name string) error {
	st, err := fstat(fd)
	switch {
	case err != nil:
		return &os.PathError{Op: "stat", Path: name, Err: err}
	case st.Mode&unix.S_IFMT == unix.S_IFDIR:
		return invalid("%s is a directory", name)
	}
	return nil
}

// maxAttempts bounds how many devices one Attach tries: each lost race
// means another process bound a device, so only a crowd this large, or a
// device held busy while unbound, exhausts it.
const maxAttempts = 256

// attach finds a free device and binds the file open as fd to it,
// retrying lost races.
func attach(ctx context.Context, fd uintptr, name string, o Options) (*Device, error) {
	const op = "attach"
	var tried map[int]bool
	for attempt := 0; ; attempt++ {
		n, err := freeDevice(tried)
		if err != nil {
			return nil, newError(op, name, err)
		}
		d, err := tryAttach(n, fd, name, o)
		if err == nil {
			return d, nil
		}
		if !lostRace(err) || attempt+1 == maxAttempts {
			return nil, newError(op, name, err)
		}
		if tried == nil {
			tried = map[int]bool{}
		}
		tried[n] = true
		if err := backoff(ctx, attempt); err != nil {
			return nil, newError(op, name, err)
		}
	}
}

// lostRace tells whether err from tryAttach means that another process
// holds or took the device first: EBUSY from the open, the lock or the
// binding call itself (LOOP_CONFIGURE, or LOOP_SET_FD in the fallback); not
// an EBUSY from a later step, whose failure undid a binding that was ours.
func lostRace(err error) bool {
	var se *stepError
	if errors.As(err, &se) {
		return se.step == stepSetFD && se.err == unix.EBUSY
	}
	return errors.Is(err, unix.EBUSY)
}

// maxBackoff caps the pause between attempts; tests shorten it.
var maxBackoff = 20 * time.Millisecond

// backoff waits before attempt+1: not at all after the first lost race,
// which is the common one (GET_FREE then names another device), then
// exponentially with jitter up to maxBackoff. It returns early with
// ctx.Err().
func backoff(ctx context.Context, attempt int) error {
	if attempt == 0 {
		return ctx.Err()
	}
	d := min(50*time.Microsecond<<min(attempt, 10), maxBackoff)
	d = d/2 + rand.N(d/2+1)
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// tryAttach binds the file open as fd to device n under an exclusive
// flock. A lock held elsewhere reports EBUSY, like a device bound first by
// someone else.
func tryAttach(n int, fd uintptr, name string, o Options) (*Device, error) {
	d, err := OpenDevice(n)
	if err != nil {
		return nil, err
	}
	if err := d.h.flock(unix.LOCK_EX | unix.LOCK_NB); err != nil {
		d.Close()
		if err == unix.EWOULDBLOCK {
			return nil, newError("lock", d.path, unix.EBUSY)
		}
		return nil, newError("lock", d.path, err)
	}
	if err := configure(d.h, fd, name, o); err != nil {
		d.Close() // also drops the lock
		return nil, newError("configure", d.path, err)
	}
	if err := d.h.flock(unix.LOCK_UN); err != nil {
		// The binding is ours: undo it rather than hand out a device
		// that stays locked.
		err = errors.Join(newError("unlock", d.path, inStep("LOCK_UN", err)), d.ClearFD())
		d.Close()
		return nil, err
	}
	return d, nil
}

// freeDevice names a device to try: LOOP_CTL_GET_FREE's answer, unless that
// was tried already in this Attach, and then an unbound device from sysfs
// that was not; without /dev/loop-control, always from sysfs.
func freeDevice(tried map[int]bool) (int, error) {
	c, err := sharedControl()
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return -1, err
	}
	if c != nil {
		n, err := c.GetFree()
		if err != nil || !tried[n] {
			return n, err
		}
		if m, ok := unboundDevice(tried); ok {
			return m, nil
		}
		return n, nil
	}
	if m, ok := unboundDevice(tried); ok {
		return m, nil
	}
	if len(tried) > 0 {
		// All unbound devices were tried: try them again after the backoff.
		if m, ok := unboundDevice(nil); ok {
			return m, nil
		}
	}
	return -1, newError("find free", sysfsRoot+"/block", errNoFree)
}

// errNoFree reports that sysfs lists no unbound loop device.
var errNoFree = &stepError{step: "no unbound loop device", err: unix.EBUSY}

// unboundDevice returns the lowest-numbered loop device in sysfs that is not
// bound and not in skip.
func unboundDevice(skip map[int]bool) (int, bool) {
	nums, err := loopNumbers()
	if err != nil {
		return -1, false
	}
	for _, n := range nums {
		if skip[n] {
			continue
		}
		if _, err := os.Lstat(sysfsLoopAttr(n, "")); errors.Is(err, fs.ErrNotExist) {
			return n, true
		}
	}
	return -1, false
}

// The process-wide control device that Attach uses, opened on first need.
var shared struct {
	mu sync.Mutex
	c  *Control
}

// sharedControl returns the process's Control, opening it if need be. A
// missing /dev/loop-control is an error matching fs.ErrNotExist, asked
// again next time (the driver may be loaded later).
func sharedControl() (*Control, error) {
	shared.mu.Lock()
	defer shared.mu.Unlock()
	if shared.c == nil {
		c, err := Open()
		if err != nil {
			return nil, err
		}
		shared.c = c
	}
	return shared.c, nil
}

// resetShared closes the shared control device; tests that swap the kernel
// call it.
func resetShared() {
	shared.mu.Lock()
	defer shared.mu.Unlock()
	shared.c.Close()
	shared.c = nil
}
