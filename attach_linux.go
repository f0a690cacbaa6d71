package loopctl

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/sysfs"
)

func (s *system) attachPath(ctx context.Context, path string, o Options) (*Device, error) {
	const op = "attach"
	if err := ctx.Err(); err != nil {
		return nil, newError(op, path, err)
	}
	if err := o.validate(); err != nil {
		return nil, newError(op, path, err)
	}
	fd, err := s.openBackingFile(ctx, path, o)
	if err != nil {
		return nil, newError(op, path, err)
	}
	defer closeFD(fd)
	return s.attach(ctx, uintptr(fd), path, o)
}

func (s *system) attachFile(ctx context.Context, f *os.File, o Options) (*Device, error) {
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
	if o.NoSymlinks {
		return nil, newError(op, name, invalid("Options.NoSymlinks is for a path: the caller opened this file"))
	}
	var d *Device
	err := withFile(op, name, f, func(fd uintptr) error {
		if err := checkBackingFile(fd, name, o); err != nil {
			return newError(op, name, err)
		}
		if readOnlyFD(fd) {
			// The kernel binds a file open read-only read-only: asked
			// so, the binding is made and held through a read-only
			// descriptor of the device, and Reuse shares it as such.
			o.Flags |= FlagReadOnly
		}
		var err error
		d, err = s.attach(ctx, fd, name, o)
		return err
	})
	return d, err
}

// maxAttempts bounds how many devices one Attach tries: each lost race
// means another process bound or tore down a device, so only a crowd this
// large, or a device held busy while unbound, exhausts it.
const maxAttempts = 256

// attach finds a free device and binds the file open as fd to it,
// retrying lost races.
func (s *system) attach(ctx context.Context, fd uintptr, name string, o Options) (*Device, error) {
	const op = "attach"
	var err error
	if o.BlockSize, err = backingBlockSize(ctx, fd, o); err != nil {
		return nil, newError(op, name, err)
	}
	var tried map[int]bool
	for attempt := 0; ; attempt++ {
		d, n, lost, err := s.attachOnce(ctx, fd, name, o, tried)
		if err == nil {
			return d, nil
		}
		if !lost {
			return nil, newError(op, name, err)
		}
		s.lostRaces.Add(1)
		if attempt+1 == maxAttempts {
			return nil, newError(op, name, gaveUp(err))
		}
		if tried == nil {
			tried = map[int]bool{}
		}
		tried[n] = true
		if err := backoff(ctx, attempt, s.bindPause); err != nil {
			return nil, newError(op, name, err)
		}
	}
}

// gaveUp ends an Attach that lost maxAttempts races. It matches ErrBusy,
// and wraps the last race's error.
func gaveUp(last error) error {
	return &cause{text: "gave up after " + strconv.Itoa(maxAttempts) + " lost races, the last: " + errorText(last),
		errs: []error{last}, is: ErrBusy}
}

// attachOnce is one attempt, under the attach lock: ask for a free device
// (skipping those tried already when another is free) and bind to it. It
// returns the device's number, and whether err means a lost race.
func (s *system) attachOnce(ctx context.Context, fd uintptr, name string, o Options, tried map[int]bool) (d *Device, n int, lost bool, err error) {
	var c *Control
	if !s.noAttachLock {
		if c, err = s.lockAttach(ctx); err != nil {
			return nil, -1, false, err
		}
		defer s.unlockAttach(c)
	} else if c, err = s.sharedControl(); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, -1, false, err
	}
	if o.Reuse {
		// Under the lock, so that two processes attaching one file with
		// Reuse end with one device between them.
		if d, err := s.sharedDevice(fd, name, o); d != nil || err != nil {
			return d, -1, false, err
		}
	}
	n, err = s.freeDevice(c, tried)
	if err != nil {
		return nil, -1, false, err
	}
	d, lost, err = s.tryAttach(ctx, c, n, fd, name, o)
	return d, n, lost, err
}

// tryAttach binds the file open as fd to device n under an exclusive flock
// of the device, and reports whether a failure means that another process
// got to the device first (see lostOpen and lostBind).
func (s *system) tryAttach(ctx context.Context, c *Control, n int, fd uintptr, name string, o Options) (*Device, bool, error) {
	// A read-only binding is made and held through a read-only
	// descriptor: a kernel that refuses to mount a device with writers
	// (CONFIG_BLK_DEV_WRITE_MOUNTED=n) mounts it while the Device is open.
	mode := readWrite
	if o.Flags&FlagReadOnly != 0 { // asked, or the file is open read-only
		mode = readOnly
	}
	d, err := s.openGranted(ctx, n, mode)
	if err != nil {
		var missing *NodeMissingError
		if !errors.As(err, &missing) || !stillFree(c, n) {
			return nil, lostOpen(err), err
		}
		// No race: the device is there and free, its node is not.
		if !o.MakeNode {
			return nil, false, err
		}
		if d, err = s.makeAndOpen(n, mode); err != nil {
			return nil, false, err
		}
	}
	if err := lockDevice(ctx, d); err != nil {
		d.Close()
		if err == unix.EWOULDBLOCK {
			// Held by a tool setting it up.
			return nil, true, newError("lock", d.path, inStep("held by another process", unix.EWOULDBLOCK))
		}
		if err == ctx.Err() {
			return nil, false, err
		}
		return nil, false, newError("lock", d.path, err)
	}
	// Partitions an earlier binding left would show over this one.
	if parts, err := s.stalePartitions(n); err != nil || len(parts) > 0 {
		if err == nil {
			err = s.dropPartitions(d.h, n, parts)
		}
		if err != nil {
			d.Close()
			// In use, or bound meanwhile: the device is not free.
			return nil, errors.Is(err, unix.EBUSY), newError("configure", d.path, err)
		}
	}
	bindWith := d.h
	seq, err := s.configure(bindWith, d.path, fd, name, o)
	if mode == readOnly && errors.Is(err, errReadOnlyDescriptor) {
		// Without CAP_SYS_ADMIN the kernel binds only through a
		// descriptor open for writing: bind through one opened for the
		// moment, and hold the read-only one, and its lock.
		if bindWith, err = s.openDevice(d.path, readWrite); err != nil {
			d.Close()
			return nil, lostOpen(err), err
		}
		defer bindWith.Close()
		seq, err = s.configure(bindWith, d.path, fd, name, o)
	}
	if err != nil {
		d.Close() // also drops the lock
		return nil, lostBind(err), newError("configure", d.path, err)
	}
	d.seq.Store(seq)
	if o.MakeNode && o.Flags&FlagPartScan != 0 {
		if err := s.makePartitionNodes(d); err != nil {
			err = undo(bindWith, err)
			d.Close()
			return nil, false, err
		}
	}
	// The lock taken for the setup becomes the one the caller asked for:
	// from exclusive to shared, or none, without a moment unlocked.
	if o.Lock != LockExclusive {
		if err := d.h.flock(flockOf[o.Lock]); err != nil {
			// The binding is ours: undo it rather than hand out a device
			// locked otherwise than asked.
			op, step := "unlock", "LOCK_UN"
			if o.Lock == LockShared {
				op, step = "lock", "LOCK_SH"
			}
			err = undo(bindWith, newError(op, d.path, inStep(step, err)))
			d.Close()
			return nil, false, err
		}
	}
	d.lock.mode.Store(int32(o.Lock))
	return d, false, nil
}

// lostOpen tells whether the open of a device, named free a moment
// before, failed because another process got there first. ENXIO: the
// device is being torn down (bound and detached since, on Linux 6.11 and
// later, or being removed); ENODEV and ENOENT: it was removed. EBUSY: it
// is held exclusively. (A node missing while the device is there and
// free, in a container whose /dev is not devtmpfs, is no race: tryAttach
// tells it apart first.)
func lostOpen(err error) bool {
	var errno unix.Errno
	if !errors.As(err, &errno) {
		return false
	}
	switch errno {
	case unix.ENXIO, unix.ENODEV, unix.EBUSY, unix.ENOENT:
		return true
	}
	return false
}

// stillFree tells, after the node of device n was found missing while
// sysfs lists the device, whether the device is still there and free:
// the kernel stops naming a device as free the moment its removal starts,
// while its sysfs entry may linger a little longer. Without the control
// device, sysfs alone decides.
func stillFree(c *Control, n int) bool {
	if c == nil {
		return true
	}
	m, err := c.GetFree()
	return err != nil || m == n
}

// makeAndOpen makes the missing node of device n and opens it. A node it
// made that cannot be opened (a device cgroup refusing the device, a /dev
// that takes no device nodes) is of no use to anyone: it removes it again.
func (s *system) makeAndOpen(n, mode int) (*Device, error) {
	path := DevicePath(n)
	rdev, made, err := makeNodeOf(path, sysfs.LoopDir(s.sysfs, n)+"/dev")
	if err != nil {
		return nil, err
	}
	d, err := s.openDeviceMode(n, mode)
	if err == nil {
		return d, nil
	}
	if made && (errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES)) {
		removeNode(path, rdev)
		err = explainNodeOpen(err, rdev)
	}
	return nil, err
}

// makePartitionNodes makes the missing nodes of the partitions the kernel
// found on d.
func (s *system) makePartitionNodes(d *Device) error {
	parts, err := d.Partitions()
	if err != nil {
		return err
	}
	for _, p := range parts {
		if err := s.makePartitionNode(p); err != nil {
			return err
		}
	}
	return nil
}

// lostBind tells whether err from binding means that another process bound
// the device first: EBUSY from LOOP_CONFIGURE, or from LOOP_SET_FD in the
// fallback; not an EBUSY from a later step, whose failure undid a binding
// that was ours.
func lostBind(err error) bool {
	var c *cause
	if errors.As(err, &c) && c.step != "" {
		return c.step == stepSetFD && c.errs[0] == unix.EBUSY
	}
	return err == unix.EBUSY
}

// freeDevice names a device to try: LOOP_CTL_GET_FREE's answer, unless that
// was tried already in this Attach, and then an unbound device from sysfs
// that was not; without the control device (c is nil), always from sysfs.
func (s *system) freeDevice(c *Control, tried map[int]bool) (int, error) {
	if c != nil {
		n, err := c.GetFree()
		if err != nil || !tried[n] {
			return n, err
		}
		if m, ok := s.unboundDevice(tried); ok {
			return m, nil
		}
		return n, nil
	}
	if m, ok := s.unboundDevice(tried); ok {
		return m, nil
	}
	if len(tried) > 0 {
		// All unbound devices were tried: try them again after the backoff.
		if m, ok := s.unboundDevice(nil); ok {
			return m, nil
		}
	}
	return -1, newError("find free", s.sysfs+"/block", errNoFree)
}

// errNoFree reports that sysfs lists no unbound loop device.
var errNoFree = inStep("no unbound loop device", unix.EBUSY)

// unboundDevice returns the lowest-numbered loop device in sysfs that is not
// bound and not in skip.
func (s *system) unboundDevice(skip map[int]bool) (int, bool) {
	nums, err := s.loopNumbers()
	if err != nil {
		return -1, false
	}
	for _, n := range nums {
		if skip[n] {
			continue
		}
		if _, err := os.Lstat(s.sysfsLoopAttr(n, "")); errors.Is(err, fs.ErrNotExist) {
			return n, true
		}
	}
	return -1, false
}
