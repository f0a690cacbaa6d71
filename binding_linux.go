package loopctl

import (
	"context"
	"errors"
	"os"
	"strconv"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/call"

	"github.com/loopctl/loopctl/internal/sysfs"
)

// Bindings, not numbers. A loop device's number is reused as soon as the
// device is free, so a Status from List, or "loop7" kept in a state file
// across a restart, may name another program's binding by the time it is
// used. The kernel's disk sequence number (Status.DiskSeq, since Linux
// 5.15) is raised at every bind and unbind, and with the number names one
// binding; an open of the device pins the binding, for another process's
// detach then waits for the last close. So OpenBinding opens first and
// checks after, and Detach and Sweep go through it.

func (s *system) openBinding(st Status) (*Device, error) {
	mode := readWrite
	if st.Flags&FlagReadOnly != 0 {
		mode = readOnly
	}
	return s.openBindingMode(st, mode)
}

// openBindingMode is OpenBinding, opening the device read-write or
// read-only.
func (s *system) openBindingMode(st Status, mode int) (*Device, error) {
	const op = "open binding"
	if err := checkNumber(op, "", st.Number, 0); err != nil {
		return nil, err
	}
	path := DevicePath(st.Number)
	d, err := s.openDeviceMode(st.Number, mode)
	if errors.Is(err, ErrNotBound) || errors.Is(err, unix.ENODEV) {
		return nil, newError(op, path, changed("it is being detached or removed", err))
	}
	if err != nil {
		return nil, err
	}
	seq, err := d.sameBinding(st)
	if err != nil {
		d.Close()
		return nil, newError(op, path, err)
	}
	d.seq.Store(seq)
	return d, nil
}

// sameBinding tells whether d, open, is the binding s describes, and
// returns its disk sequence number; changed's error when it is not.
func (d *Device) sameBinding(s Status) (uint64, error) {
	info := new(unix.LoopInfo64)
	if err := ioctlPtr(d.h, reqGetStatus64, unsafe.Pointer(info)); err != nil {
		if err == unix.ENXIO {
			return 0, changed("it is not bound", err)
		}
		return 0, inStep("LOOP_GET_STATUS64", err)
	}
	var seq uint64
	if err := d.sys.readDiskSeq(d.h, &seq); err != nil {
		return 0, err
	}
	switch {
	case s.DiskSeq != 0 && seq != 0:
		if seq != s.DiskSeq {
			return 0, seqChanged(seq, s.DiskSeq)
		}
	case info.Device != s.BackingDevice || info.Inode != s.BackingInode:
		return 0, changed("bound to another file", nil)
	case info.Offset != s.Offset || info.Sizelimit != s.SizeLimit:
		return 0, changed("bound to another range of the file", nil)
	}
	return seq, nil
}

// changed says how a device is no longer the binding a Status described,
// and err, the errno that told, if one did. It matches ErrChanged.
func changed(why string, err error) error {
	c := &cause{text: ErrChanged.Error() + ": " + why, is: ErrChanged}
	if err != nil {
		c.paren, c.errs = true, []error{err}
	}
	return c
}

// seqChanged says that a device's binding has disk sequence number has,
// not want, the one a Status described. It matches ErrChanged.
func seqChanged(has, want uint64) error {
	return changed("disk sequence number "+strconv.FormatUint(has, 10)+", not "+strconv.FormatUint(want, 10), nil)
}

func (s *system) findByRef(ref string) ([]Status, error) {
	if err := validRef(ref); err != nil || ref == "" {
		if err == nil {
			err = invalid("an empty owner reference")
		}
		return nil, newError("find", "", err)
	}
	return s.list(&match{ref: ref})
}

// A detaching is a detach under way: device n's binding, and a
// descriptor of its loop/backing_file, which reads ENODEV once the
// binding is gone, or, without sysfs, the binding's status, which the
// device stops answering to.
type detaching struct {
	sys      *system
	op, path string
	n        int
	attr     int
	status   Status
}

// startDetach clears d's binding and closes d, and returns what waits for
// the binding to go.
func (d *Device) startDetach(op string) (*detaching, error) {
	h, err := d.handle(op)
	if err != nil {
		return nil, err
	}
	w := &detaching{sys: d.sys, op: op, path: d.path, n: d.number, attr: -1}
	if fd, err := openFD(d.sys.sysfsLoopAttr(d.number, "backing_file"), unix.O_RDONLY); err == nil {
		var fs unix.Statfs_t
		if unix.Fstatfs(fd, &fs) == nil && fs.Type == unix.SYSFS_MAGIC {
			w.attr = fd
		} else {
			closeFD(fd) // not sysfs (a /sys mounted otherwise): the file would read on after the unbind
		}
	}
	if w.attr < 0 {
		if w.status, err = d.Status(); err != nil {
			return nil, newError(op, d.path, err)
		}
	}
	if _, err := ioctl(h, reqClearFD, 0); err != nil {
		w.close()
		return nil, newError(op, d.path, inStep("LOOP_CLR_FD", err))
	}
	if err := d.Close(); err != nil {
		w.close()
		return nil, newError(op, d.path, err)
	}
	return w, nil
}

func (w *detaching) close() {
	if w.attr >= 0 {
		closeFD(w.attr)
		w.attr = -1
	}
}

// wait waits until the binding is gone, or ctx ends. No event tells the
// last close of a device, so it looks again after the pauses Attach makes
// between attempts (backoff).
func (w *detaching) wait(ctx context.Context) error {
	defer w.close()
	for attempt := 1; ; attempt++ {
		gone, err := w.gone()
		if err != nil || gone {
			return err
		}
		if err := backoff(ctx, attempt, w.sys.bindPause); err != nil {
			return newError(w.op, w.path, heldBy(w.sys.holdersOf(w.n, 0), err))
		}
	}
}

// gone tells whether the binding has gone: its backing_file reads ENODEV
// (its loop/ directory was removed), ENOENT or nothing. Without sysfs, the
// device refuses an open, being torn down, or is bound anew.
func (w *detaching) gone() (bool, error) {
	if w.attr < 0 {
		d, err := w.sys.openBinding(w.status)
		if errors.Is(err, ErrChanged) || errors.Is(err, os.ErrNotExist) {
			return true, nil
		}
		if err != nil {
			return false, err
		}
		d.Close() // maybe the last close, which detaches
		return false, nil
	}
	var buf [sysfs.BufSize]byte
	n, err := call.RetryN(func() (int, error) { return unix.Pread(w.attr, buf[:], 0) })
	switch {
	case err == unix.ENODEV || err == unix.ENOENT || err == nil && (n == 0 || buf[0] == '\n'):
		return true, nil
	case err != nil:
		return false, newError(w.op, w.path, &os.PathError{Op: "read", Path: w.sys.sysfsLoopAttr(w.n, "backing_file"), Err: err})
	}
	return false, nil
}

// heldBy ends a Detach or Sweep whose context ended (ctxErr) while
// another opener kept the device bound, holders naming what the kernel
// says holds it. It matches ErrBusy, ctxErr and EBUSY.
func heldBy(holders []string, ctxErr error) error {
	by := "another process has it open (a program, or udev probing it)"
	if len(holders) > 0 {
		by = "held by " + strings.Join(holders, ", ")
	}
	return &cause{text: "still bound: " + by + "; the kernel detaches it at its last close: " + ctxErr.Error(),
		errs: []error{ctxErr, unix.EBUSY}, is: ErrBusy}
}

// holdersOf names what the kernel says holds device n, or for m > 0 its
// partition m alone: devices stacked on it (holders/ in sysfs), and file
// systems mounted on it, or for the device on one of its partitions too
// (/proc/self/mountinfo).
func (s *system) holdersOf(n, m int) []string {
	dir := sysfs.LoopDir(s.sysfs, n)
	type node struct{ dir, path, stacked string }
	var nodes []node
	if m == 0 {
		nodes = append(nodes, node{dir, DevicePath(n), "it"})
		parts, _ := sysfs.Partitions(dir, n)
		for _, p := range parts {
			name := sysfs.PartitionName(n, p)
			nodes = append(nodes, node{dir + "/" + name, "/dev/" + name, ""})
		}
	} else {
		name := sysfs.PartitionName(n, m)
		nodes = append(nodes, node{dir + "/" + name, "/dev/" + name, "it"})
	}
	var held []string
	devs := map[string]string{}
	for _, nd := range nodes {
		if nd.stacked != "" {
			if ents, err := os.ReadDir(nd.dir + "/holders"); err == nil {
				for _, e := range ents {
					held = append(held, "/dev/"+e.Name()+" (stacked on "+nd.stacked+")")
				}
			}
		}
		if b, err := os.ReadFile(nd.dir + "/dev"); err == nil {
			devs[strings.TrimSpace(string(b))] = nd.path
		}
	}
	if b, err := os.ReadFile("/proc/self/mountinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			// ID PARENT MAJ:MIN ROOT MOUNTPOINT ...
			if f := strings.Fields(line); len(f) > 4 {
				if dev, ok := devs[f[2]]; ok {
					held = append(held, "a file system on "+dev+" mounted at "+f[4])
				}
			}
		}
	}
	return held
}

func (s *system) sweep(ctx context.Context, ref string) ([]Status, error) {
	const op = "sweep"
	found, err := s.findByRef(ref)
	if err != nil {
		return nil, err
	}
	var swept []Status
	var waits []*detaching
	var errs []error
	for _, st := range found {
		// Read-write: a caller in the disk group, without CAP_SYS_ADMIN,
		// detaches only through a descriptor open for writing.
		d, err := s.openBindingMode(st, readWrite)
		if errors.Is(err, ErrChanged) {
			continue // detached, or bound anew, since
		}
		if err != nil {
			errs = append(errs, err)
			continue
		}
		cur, err := d.Status()
		if err != nil || cur.Ref != ref {
			d.Close() // its reference was rewritten since
			continue
		}
		w, err := d.startDetach(op)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		swept, waits = append(swept, cur), append(waits, w)
	}
	for _, w := range waits {
		if err := w.wait(ctx); err != nil {
			errs = append(errs, err)
		}
	}
	return swept, errors.Join(errs...)
}

// detach is Detach.
func (d *Device) detach(ctx context.Context) error {
	const op = "detach"
	w, err := d.startDetach(op)
	if err != nil {
		return err
	}
	return w.wait(ctx)
}
