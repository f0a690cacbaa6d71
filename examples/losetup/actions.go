//go:build linux

package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io/fs"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"github.com/loopctl/loopctl"
	"golang.org/x/sys/unix"
)

// do carries out the action; it returns what util-linux counts as
// failures, so that any is exit status 1.
func (c *config) do(o *out) int {
	switch c.act {
	case actCreate:
		return c.create(o)
	case actDelete:
		return c.detach(o)
	case actDeleteAll:
		return c.detachAll(o)
	case actFindFree:
		return c.findFree(o)
	case actShow:
		return c.show(o)
	case actShowOne:
		return c.showOne(o)
	case actSetCapacity:
		return c.onDevice(o, "set capacity", func(d *loopctl.Device) error { return d.SetCapacity() })
	case actSetDirectIO:
		return c.onDevice(o, "set direct io", func(d *loopctl.Device) error { return d.SetDirectIO(c.useDIO) })
	case actSetBlockSize:
		return c.onDevice(o, "set logical block size", func(d *loopctl.Device) error {
			if c.blockSize > 1<<32-1 {
				return syscall.EINVAL
			}
			return d.SetBlockSize(uint32(c.blockSize))
		})
	case actAdd, actRemove, actGetFree:
		return c.control(o)
	}
	return 0
}

// onDevice opens c.device and runs f on it, or says that what failed.
func (c *config) onDevice(o *out, what string, f func(*loopctl.Device) error) int {
	d, err := loopctl.OpenDevicePath(c.device)
	if err == nil {
		err = f(d)
		d.Close()
	}
	if err != nil {
		o.warn(err, "%s: %s failed", c.device, what)
		return 1
	}
	return 0
}

// usedDevices returns every bound device, in the order sysfs lists them,
// as util-linux walks them: the kernel's order (a hash of the names), not
// the numbers'.
func usedDevices() ([]loopctl.Status, error) {
	list, err := loopctl.List()
	if err != nil {
		return nil, err
	}
	sysfsOrder(list)
	return list, nil
}

// sysfsOrder sorts list, which is in order of number, in the order
// /sys/block lists the devices. It reads the directory's records itself,
// finds each loop device's name in list by its number, and moves the
// statuses into that order in place: a string for every block device's
// name, or a map of ranks to sort by, or a second copy of thousands of
// statuses, would cost a one-shot listing more than its system calls.
func sysfsOrder(list []loopctl.Status) {
	if len(list) < 2 {
		return
	}
	fd, err := unix.Open("/sys/block", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return // in order of number
	}
	defer unix.Close(fd)
	from := make([]int, 0, len(list)) // from[k]: the index in list of the k-th in sysfs's order
	buf := make([]byte, 64<<10)
	for {
		n, err := unix.ReadDirent(fd, buf)
		if err != nil {
			return // in order of number
		}
		if n <= 0 {
			break
		}
		// d_ino (8 bytes), d_off (8), d_reclen (2), d_type (1), d_name.
		for b := buf[:n]; len(b) > 19; {
			reclen := int(binary.NativeEndian.Uint16(b[16:18]))
			if reclen <= 19 || reclen > len(b) {
				break
			}
			if m, ok := loopNumber(b[19:reclen]); ok {
				if i, found := slices.BinarySearchFunc(list, m, func(s loopctl.Status, m int) int { return s.Number - m }); found {
					from = append(from, i)
				}
			}
			b = b[reclen:]
		}
	}
	if len(from) != len(list) {
		return // a device came or went: in order of number
	}
	// Each cycle of the permutation, moved along; from[k] = -1 once
	// list[k] holds its status.
	for start := range from {
		if from[start] < 0 {
			continue
		}
		first, k := list[start], start
		for from[k] != start {
			list[k], from[k], k = list[from[k]], -1, from[k]
		}
		list[k], from[k] = first, -1
	}
}

// loopNumber parses a directory entry's NUL-padded name, "loopN".
func loopNumber(name []byte) (int, bool) {
	if end := bytes.IndexByte(name, 0); end >= 0 {
		name = name[:end]
	}
	digits, ok := bytes.CutPrefix(name, []byte("loop"))
	if !ok || len(digits) == 0 || len(digits) > 7 {
		return 0, false
	}
	n := 0
	for _, c := range digits {
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + int(c-'0')
	}
	return n, true
}

// show lists every bound device, or those of c.file (-j), one line each or
// as a table.
func (c *config) show(o *out) int {
	var list []loopctl.Status
	var err error
	if c.file != "" {
		list, err = c.associated()
	} else {
		list, err = usedDevices()
	}
	if err != nil {
		o.warn(err, "failed to list loop devices")
		return 1
	}
	rows := make([]row, 0, len(list))
	for _, s := range list {
		rows = append(rows, row{path: loopctl.DevicePath(s.Number), s: s, bound: true})
	}
	if c.list {
		o.table(c, rows)
		return 0
	}
	for _, r := range rows {
		o.oneLine(r)
	}
	return 0
}

// associated returns the devices bound to c.file, as util-linux's
// loopcxt_is_used finds them: the same file (device and inode) if it
// exists, else the same name; and with -o, at that offset.
func (c *config) associated() ([]loopctl.Status, error) {
	var list []loopctl.Status
	var err error
	var st unix.Stat_t
	if unix.Stat(c.file, &st) == nil {
		list, err = loopctl.FindByBackingFile(c.file)
	} else if list, err = loopctl.List(); err == nil {
		list = slices.DeleteFunc(list, func(s loopctl.Status) bool { return s.BackingFile != c.file })
	}
	if err != nil {
		return nil, err
	}
	if c.hasOffset {
		list = slices.DeleteFunc(list, func(s loopctl.Status) bool { return s.Offset != c.offset })
	}
	sysfsOrder(list)
	return list, nil
}

// showOne prints one device, as a line or a table.
func (c *config) showOne(o *out) int {
	d, err := loopctl.OpenDevicePath(c.device)
	if err != nil {
		o.warn(err, "%s", c.device)
		return 1
	}
	defer d.Close()
	s, err := d.Status()
	bound := err == nil
	if err != nil && !errors.Is(err, loopctl.ErrNotBound) {
		o.warn(err, "%s", c.device)
		return 1
	}
	r := row{path: c.device, s: s, bound: bound}
	if c.list {
		o.table(c, []row{r})
		return 0
	}
	if !bound {
		// util-linux finds no backing file in sysfs.
		o.warn(syscall.ENOENT, "%s", c.device)
		return 1
	}
	o.oneLine(r)
	return 0
}

// detach detaches c.device and the other devices named. As util-linux
// 2.38 does, a further name that is no loop device is said so, and the
// device before it is detached again.
func (c *config) detach(o *out) int {
	failed := c.detachOne(o, c.device)
	last := c.device
	for _, path := range c.devices {
		if p, err := c.loopDevice(path, false); err != nil {
			o.errw.Write([]byte(err.Error() + "\n"))
		} else {
			last = p
		}
		failed += c.detachOne(o, last)
	}
	return failed
}

func (c *config) detachOne(o *out, path string) int {
	d, err := loopctl.OpenDevicePath(path)
	if err == nil {
		err = d.ClearFD()
		d.Close()
	}
	if err != nil {
		o.warn(err, "%s: detach failed", path)
		return 1
	}
	return 0
}

// detachAll detaches every bound device.
func (c *config) detachAll(o *out) int {
	list, err := usedDevices()
	if err != nil {
		return 1
	}
	failed := 0
	for _, s := range list {
		failed += c.detachOne(o, loopctl.DevicePath(s.Number))
	}
	return failed
}

// findFree prints the device LOOP_CTL_GET_FREE names.
func (c *config) findFree(o *out) int {
	n, err := freeDevice()
	if err != nil {
		o.warn(err, "cannot find an unused loop device")
		return 1
	}
	o.w.Write([]byte(loopctl.DevicePath(n) + "\n"))
	return 0
}

func freeDevice() (int, error) {
	ctl, err := loopctl.Open()
	if err != nil {
		return -1, err
	}
	defer ctl.Close()
	return ctl.GetFree()
}

// create binds c.file to a free device (-f) or to c.device, as util-linux
// does: read-write, or read-only when the file cannot be written.
func (c *config) create(o *out) int {
	opts := loopctl.Options{Offset: c.offset, SizeLimit: c.sizeLimit, Flags: c.flags, Ref: c.ref}
	if c.blockSize > 1<<32-1 {
		o.warn(syscall.EINVAL, "%s: failed to set up loop device", c.file)
		return 1
	}
	opts.BlockSize = uint32(c.blockSize)
	hasDevice := c.act == actCreate && c.device != ""
	if c.noOverlap {
		if done, failed := c.reuse(o, opts, hasDevice); done {
			return failed
		}
	}
	var d *loopctl.Device
	var err error
	if hasDevice {
		d, err = c.bindTo(o, opts)
	} else {
		d, err = c.bindFree(o, opts)
	}
	if err != nil {
		return 1
	}
	d.Close() // the binding stays: losetup binds without autoclear
	if c.showDev {
		o.w.Write([]byte(d.Path() + "\n"))
	}
	c.warnSize(o)
	return 0
}

// bindFree binds c.file to a free device with Attach, which retries lost
// races. Like util-linux, it falls back to a read-only binding when the
// file cannot be written (EACCES, EROFS): the library never does that by
// itself.
func (c *config) bindFree(o *out, opts loopctl.Options) (*loopctl.Device, error) {
	attach := func(opts loopctl.Options) (*loopctl.Device, error) {
		return loopctl.Attach(context.Background(), c.file, opts)
	}
	d, err := withReadOnlyFallback(attach, opts)
	if err != nil {
		if fromControl(err) {
			o.warn(err, "cannot find an unused loop device")
		} else {
			o.warn(err, "%s: failed to set up loop device", c.file)
		}
		return nil, err
	}
	return d, nil
}

// withReadOnlyFallback runs bind with opts, and again read-only if the
// file could not be opened for writing.
func withReadOnlyFallback(bind func(loopctl.Options) (*loopctl.Device, error), opts loopctl.Options) (*loopctl.Device, error) {
	d, err := bind(opts)
	var pe *fs.PathError
	if err != nil && opts.Flags&loopctl.FlagReadOnly == 0 && errors.As(err, &pe) &&
		(errors.Is(err, syscall.EACCES) || errors.Is(err, syscall.EROFS)) {
		opts.Flags |= loopctl.FlagReadOnly
		return bind(opts)
	}
	return d, err
}

// fromControl tells whether err came from finding a free device, rather
// than from the file or the binding.
func fromControl(err error) bool {
	for err != nil {
		if e, ok := err.(*loopctl.Error); ok && e.Path == loopctl.ControlPath {
			return true
		}
		err = errors.Unwrap(err)
	}
	return false
}

// bindTo binds c.file to c.device, making the device first if its node is
// missing. As util-linux words it, a failure is said of the device when the
// device cannot be opened at all, and of the file otherwise.
func (c *config) bindTo(o *out, opts loopctl.Options) (*loopctl.Device, error) {
	c.addMissing()
	mode := os.O_RDWR
	if opts.Flags&loopctl.FlagReadOnly != 0 {
		mode = os.O_RDONLY
	}
	f, err := os.OpenFile(c.file, mode, 0)
	if err != nil && mode == os.O_RDWR && (errors.Is(err, syscall.EACCES) || errors.Is(err, syscall.EROFS)) {
		opts.Flags |= loopctl.FlagReadOnly
		f, err = os.OpenFile(c.file, os.O_RDONLY, 0)
	}
	if err != nil {
		o.warn(err, "%s: failed to set up loop device", c.errorName())
		return nil, err
	}
	defer f.Close()
	d, err := loopctl.OpenDevicePath(c.device)
	if errors.Is(err, loopctl.ErrNotLoop) {
		err = syscall.ENOTTY // what the kernel answers a loop request there
	}
	if err != nil {
		o.warn(err, "%s: failed to set up loop device", c.errorName())
		return nil, err
	}
	if err := d.Configure(f, opts); err != nil {
		d.Close()
		o.warn(err, "%s: failed to set up loop device", c.file)
		return nil, err
	}
	return d, nil
}

// addMissing creates the device named for a binding, as util-linux does,
// when its node is missing and its name is /dev/loopN. A failure shows
// later, when the device is opened.
func (c *config) addMissing() {
	if _, err := os.Stat(c.device); !errors.Is(err, fs.ErrNotExist) {
		return
	}
	n, ok := strings.CutPrefix(c.device, "/dev/loop")
	if !ok {
		return
	}
	number, err := strconv.Atoi(n)
	if err != nil || number < 0 || strconv.Itoa(number) != n {
		return
	}
	ctl, err := loopctl.Open()
	if err != nil {
		return
	}
	defer ctl.Close()
	ctl.Add(number)
}

// errorName is the name a failed binding is reported under, as util-linux
// chooses it: the device when it cannot be opened at all, else the file.
func (c *config) errorName() string {
	fd, err := unix.Open(c.device, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return c.device
	}
	unix.Close(fd)
	return c.file
}

// reuse does --nooverlap, with Options.Reuse: util-linux reuses a device
// of the file with the same offset and size limit (unless it is read-only
// and read-write is asked), and refuses any other overlapping one. It
// reports whether it has done the work, and the failures.
func (c *config) reuse(o *out, opts loopctl.Options, hasDevice bool) (done bool, failed int) {
	if hasDevice {
		found, _ := loopctl.FindByBackingFile(c.file)
		for _, s := range found {
			if overlaps(s.Offset, s.SizeLimit, opts.Offset, opts.SizeLimit) {
				o.warnx("%s: overlapping loop device exists", c.file)
				return true, 1
			}
		}
		return false, 0
	}
	opts.Reuse = true
	d, err := withReadOnlyFallback(func(opts loopctl.Options) (*loopctl.Device, error) {
		return loopctl.Attach(context.Background(), c.file, opts)
	}, opts)
	var oe *loopctl.OverlapError
	switch {
	case errors.As(err, &oe) && oe.Status.Offset == opts.Offset && oe.Status.SizeLimit == opts.SizeLimit:
		if oe.Status.Flags&loopctl.FlagReadOnly != 0 && opts.Flags&loopctl.FlagReadOnly == 0 {
			o.warnx("%s: overlapping read-only loop device exists", c.file)
			return true, 1
		}
		// The same range, otherwise set: util-linux reuses it.
		if d, err = loopctl.OpenDevicePath(oe.Device); err != nil {
			o.warnx("%s: failed to re-use loop device", c.file)
			return true, 1
		}
	case errors.As(err, &oe):
		o.warnx("%s: overlapping loop device exists", c.file)
		return true, 1
	case err != nil:
		o.warn(err, "%s: failed to set up loop device", c.file)
		return true, 1
	}
	defer d.Close()
	if s, err := d.Status(); err == nil && s.Flags&loopctl.FlagAutoClear != 0 {
		// A device reused stays, as util-linux has it.
		s.Flags &^= loopctl.FlagAutoClear
		if err := d.SetStatus(s); err != nil {
			o.warnx("%s: failed to re-use loop device", c.file)
			return true, 1
		}
	}
	if c.showDev {
		o.w.Write([]byte(d.Path() + "\n"))
	}
	c.warnSize(o)
	return true, 0
}

// overlaps tells whether two bindings of a file share a byte; a size limit
// of 0 reaches to the end of the file.
func overlaps(off1, limit1, off2, limit2 uint64) bool {
	end := func(off, limit uint64) uint64 {
		if limit == 0 || off+limit < off {
			return 1<<64 - 1
		}
		return off + limit
	}
	return off1 < end(off2, limit2) && off2 < end(off1, limit1)
}

// warnSize warns, as util-linux does after a binding, of a file (or the
// part of it bound) that is not a whole number of 512-byte sectors.
func (c *config) warnSize(o *out) {
	size := c.sizeLimit
	if size == 0 {
		var st unix.Stat_t
		if unix.Stat(c.file, &st) != nil || st.Mode&unix.S_IFMT == unix.S_IFBLK {
			return
		}
		size = uint64(st.Size)
		if c.hasOffset {
			size -= c.offset
		}
	}
	switch {
	case size < 512:
		o.warnx("%s: Warning: file is smaller than 512 bytes; the loop device may be useless or invisible for system tools.", c.file)
	case size%512 != 0:
		o.warnx("%s: Warning: file does not fit into a 512-byte sector; the end of the file will be ignored.", c.file)
	}
}

// control does what util-linux does not: --add, --remove, --get-free, with
// the library's own messages.
func (c *config) control(o *out) int {
	ctl, err := loopctl.Open()
	if err != nil {
		o.warnx("%v", err)
		return 1
	}
	defer ctl.Close()
	n := loopctl.AnyNumber
	if c.act != actGetFree && !(c.act == actAdd && c.number == "any") {
		// "-1" is the library's AnyNumber: here only "any" means that.
		if n, err = strconv.Atoi(c.number); err != nil || c.act == actAdd && n < 0 {
			o.warnx("invalid device number: '%s'", c.number)
			return 1
		}
	}
	switch c.act {
	case actAdd:
		n, err = ctl.Add(n)
	case actRemove:
		err = ctl.Remove(n)
	case actGetFree:
		n, err = ctl.GetFree()
	}
	if err != nil {
		o.warnx("%v", err)
		return 1
	}
	if c.act != actRemove {
		o.w.Write([]byte(loopctl.DevicePath(n) + "\n"))
	}
	return 0
}
