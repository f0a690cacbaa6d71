package loopctl

import (
	"context"
	"errors"
	"io"
	"io/fs"
	"math"
	"math/bits"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
)

// Flags are a loop device's LO_FLAGS_* bits.
type Flags uint32

// The flags a device can carry. Their values are the kernel's.
const (
	FlagReadOnly  Flags = 1 << 0 // LO_FLAGS_READ_ONLY: writes fail with EPERM
	FlagAutoClear Flags = 1 << 2 // LO_FLAGS_AUTOCLEAR: detach when the last opener closes
	FlagPartScan  Flags = 1 << 3 // LO_FLAGS_PARTSCAN: scan the backing file for partitions
	FlagDirectIO  Flags = 1 << 4 // LO_FLAGS_DIRECT_IO: O_DIRECT on the backing file

	knownFlags = FlagReadOnly | FlagAutoClear | FlagPartScan | FlagDirectIO
)

var flagNames = [...]struct {
	f    Flags
	name string
}{
	{FlagReadOnly, "read-only"},
	{FlagAutoClear, "autoclear"},
	{FlagPartScan, "partscan"},
	{FlagDirectIO, "direct-io"},
}

// String names the flags joined by "|", such as "read-only|autoclear";
// unknown bits are shown in hex, and no flags as "0".
func (f Flags) String() string {
	if f == 0 {
		return "0"
	}
	var b strings.Builder
	for _, n := range flagNames {
		if f&n.f == 0 {
			continue
		}
		if b.Len() > 0 {
			b.WriteByte('|')
		}
		b.WriteString(n.name)
	}
	if rest := f &^ knownFlags; rest != 0 {
		if b.Len() > 0 {
			b.WriteByte('|')
		}
		b.WriteString("0x" + strconv.FormatUint(uint64(rest), 16))
	}
	return b.String()
}

// A LockMode is the BSD lock (flock(2)) a Device holds on its loop
// device for its owner. udev takes a shared lock of a block device, without
// waiting, before it probes the device after a change, and an exclusive
// one before it re-reads the device's partition table (BLKRRPART); it puts
// off its work on a device locked against it, until the lock is let go.
type LockMode int

// The locks a Device can hold (Options.Lock, Device.Lock).
const (
	// LockNone holds no lock: udev probes the device as soon as it
	// changes.
	LockNone LockMode = iota
	// LockShared holds flock(LOCK_SH): udev still probes the device, but
	// re-reads no partition table under its owner, which may write one.
	LockShared
	// LockExclusive holds flock(LOCK_EX): udev neither probes the device
	// nor re-reads its partition table, and no other process that follows
	// the protocol (systemd's tools, other loopctl programs) sets it up,
	// until the lock is let go: an image builder's time to write a
	// partition table or a file system.
	LockExclusive
)

func (m LockMode) String() string {
	switch m {
	case LockNone:
		return "none"
	case LockShared:
		return "shared"
	case LockExclusive:
		return "exclusive"
	}
	return "LockMode(" + strconv.Itoa(int(m)) + ")"
}

// BlockSizeAuto, as Options.BlockSize, binds with the block size the
// backing file was made for: for a regular file, the sector size at which
// it holds a GPT header (512, 1024, 2048 or 4096 bytes, probed from
// Options.Offset as systemd probes an image), and the kernel's default
// where it holds none; for a block device, that device's logical block
// size. An image with GPT headers at two sizes is an error that names
// both, matching fs.ErrInvalid.
const BlockSizeAuto uint32 = math.MaxUint32

// Options say how a backing file is bound. The zero value binds the whole
// file, read-write, with the kernel's default block size.
type Options struct {
	Offset, SizeLimit uint64 // bytes; SizeLimit 0 = to the end of the file
	// BlockSize is the device's logical block size: a power of two from
	// 512 up, or BlockSizeAuto. 0 is the kernel's default: 512 bytes, but
	// since Linux 6.11 a device with direct I/O gets the logical block
	// size of the disk under the backing file (4096 on a 4Kn disk).
	BlockSize uint32
	Flags     Flags

	// Reuse makes Attach return a device already bound to the same file
	// (the same device and inode) as these Options would bind it, rather
	// than bind another, and refuse with an error matching ErrOverlap
	// (an *OverlapError that names the difference) to bind a range of
	// the file that overlaps another device's otherwise bound: one
	// device per image, as losetup --nooverlap. Device.Shared tells which
	// happened. Everything asked is compared: Offset, SizeLimit, the
	// flags (direct I/O as the kernel gave it), Ref, and the block size.
	// What was left unsaid is not: a device with or without direct I/O
	// serves PreferDirectIO, and one of any block size serves BlockSize
	// 0. Only Attach can reuse; Configure refuses Reuse.
	Reuse bool

	// Ref is an owner reference written into the device's lo_file_name
	// in place of the backing file's path, as systemd and util-linux
	// 2.40 (losetup --loop-ref) do: a name that says whose the binding
	// is, for FindByRef and Sweep, and for udev, whose rules make
	// /dev/disk/by-loop-ref/REF from it. At most 63 bytes, no NUL;
	// checked before any ioctl. Empty: the path's first 63 bytes go
	// there, as losetup writes them.
	Ref string

	// PreferDirectIO binds with direct I/O to the backing file where the
	// kernel can (the file system takes O_DIRECT, and Offset and the
	// block size are aligned to its blocks), and buffered elsewhere, in
	// one bind and with no error; Status.Flags has FlagDirectIO when the
	// device got it. Direct I/O keeps the backing file's pages out of the
	// page cache, which a buffered device fills beside its own: the same
	// data cached twice (BENCHMARKS.md measures both). FlagDirectIO, which
	// demands direct I/O, overrides it.
	PreferDirectIO bool

	// MakeNode makes Attach create the node of the device it binds,
	// /dev/loopN, when the device exists but its node does not: a
	// container whose /dev is a tmpfs rather than devtmpfs, where the
	// kernel makes no nodes. The node gets the device number sysfs gives
	// and mode 0660, as MakeNode makes it, under the attach lock. With
	// FlagPartScan, Attach also makes the nodes of the partitions the
	// kernel found, and with Reuse the node of a device it shares. A
	// node Attach makes stays, as devtmpfs would keep it, unless it
	// cannot be opened (a device cgroup refusing the device), when
	// Attach removes it again. Without MakeNode a missing node fails
	// Attach at once with a *NodeMissingError. Making a node needs
	// CAP_MKNOD in the initial user namespace, and the container's device
	// rules must allow block devices 7:* (and 259:* for partitions).
	// Configure, whose device is open already, refuses MakeNode.
	MakeNode bool

	// Lock is the lock the returned Device holds on the loop device
	// (see LockMode), taken before the binding is made and held until
	// Device.Lock changes it or the Device is closed. With Reuse, a
	// device shared is locked without waiting: another holder's lock is
	// an error matching ErrBusy.
	Lock LockMode

	// NoSymlinks refuses a path with a symbolic link in any of its
	// components (openat2's RESOLVE_NO_SYMLINKS; before Linux 5.6 a walk
	// of the components with O_NOFOLLOW), as util-linux 2.42.2 refuses
	// them: a service that binds a path under a directory its users can
	// write to cannot then be led to bind another file (/dev/sda). It
	// is checked on the file Attach binds, so a rename between the
	// check and the bind changes nothing. Only Attach opens a path;
	// AttachFile and Configure refuse NoSymlinks.
	NoSymlinks bool

	// RegularFileOnly refuses a backing file that is not a regular file
	// (a block device, which Attach otherwise takes), checked on the
	// file Attach binds.
	RegularFileOnly bool
}

// maxRef is the longest Ref: lo_file_name holds 64 bytes, NUL included.
const maxRef = 63

// validate refuses, before any ioctl, what the kernel would refuse or
// silently misread.
func (o Options) validate() error {
	if rest := o.Flags &^ knownFlags; rest != 0 {
		return invalid("unknown flag bits %#x", uint32(rest))
	}
	if o.BlockSize != BlockSizeAuto {
		if err := validBlockSize(o.BlockSize, true); err != nil {
			return err
		}
	}
	if o.Lock < LockNone || o.Lock > LockExclusive {
		return invalid("unknown lock mode %d", int(o.Lock))
	}
	if err := validRef(o.Ref); err != nil {
		return err
	}
	if o.Offset > math.MaxInt64 || o.SizeLimit > math.MaxInt64 {
		// The kernel's answer is EOVERFLOW: the error carries it, as
		// tools such as losetup report it.
		return invalid("%w: offset %d or size limit %d exceeds %d",
			syscall.EOVERFLOW, o.Offset, o.SizeLimit, int64(math.MaxInt64))
	}
	return nil
}

// validRef accepts an owner reference that fits lo_file_name: at most 63
// bytes, no NUL.
func validRef(ref string) error {
	if len(ref) > maxRef || strings.IndexByte(ref, 0) >= 0 {
		return invalid("owner reference %q: at most %d bytes, no NUL", ref, maxRef)
	}
	return nil
}

// validBlockSize accepts powers of two from 512 up, and 0 where the kernel
// default is meant. The upper bound is the kernel's to judge.
func validBlockSize(size uint32, zeroOK bool) error {
	if size == 0 && zeroOK {
		return nil
	}
	if size < 512 || bits.OnesCount32(size) != 1 {
		return invalid("block size %d is not a power of two >= 512", size)
	}
	return nil
}

// Status describes a bound loop device.
type Status struct {
	Number                      int
	BackingFile                 string // full path, from sysfs, as seen in the binder's mount namespace (see the package documentation, In a container); where sysfs is missing, lo_file_name: the path's first 63 bytes, or the binder's Ref
	BackingDevice, BackingInode uint64 // st_dev and st_ino of the backing file
	Offset, SizeLimit           uint64
	Flags                       Flags
	BlockSize                   uint32 // logical block size in bytes: losetup's LOG-SEC
	Size                        uint64 // in bytes: the file's size less Offset, at most SizeLimit, in whole 512-byte sectors

	// DiskSeq is the device's disk sequence number, which the kernel
	// raises at every bind and unbind of a loop device (and at
	// LOOP_CHANGE_FD), unique while the machine runs: with Number it
	// names this one binding, where a number alone is reused as soon as
	// the device is free (see OpenBinding). 0 on kernels before 5.15,
	// which have none.
	DiskSeq uint64

	// Ref is the device's lo_file_name, verbatim: the owner reference
	// the binder gave (Options.Ref, losetup --loop-ref), or, for a
	// device bound without one, the first 63 bytes of the backing
	// file's path, which loopctl and losetup write there. Empty where
	// it was read from sysfs, which does not show it (List and
	// FindByBackingFile without the right to open the devices).
	Ref string
}

// A Partition is a partition of a loop device: one the kernel found in the
// device's partition table (FlagPartScan), or was given with BLKPG.
type Partition struct {
	Number      int    // M of /dev/loopNpM
	Path        string // /dev/loopNpM
	Start, Size uint64 // in bytes, Start from the start of the device
}

// deletedSuffix is what the kernel appends to the path of an unlinked file.
const deletedSuffix = " (deleted)"

// Deleted reports whether the backing file has been unlinked since it was
// bound; BackingFile then ends in " (deleted)", as the kernel shows it.
func (s Status) Deleted() bool { return strings.HasSuffix(s.BackingFile, deletedSuffix) }

// A Device is an open loop block device, /dev/loopN, bound or not. It is
// safe for concurrent use.
type Device struct {
	h      handle
	sys    *system
	number int
	path   string
	shared bool // found bound by Attach with Reuse
	closed atomic.Bool
	// seq is the disk sequence number of the binding this Device made
	// (Attach, Configure, SetFD) or was opened for (OpenBinding): 0 if
	// none, or on a kernel without.
	seq  atomic.Uint64
	lock lockState // the LockMode the Device holds
}

var _ io.Closer = (*Device)(nil)

// OpenDevice opens /dev/loopN read-write, so that every method works for a
// caller without CAP_SYS_ADMIN too (the kernel changes a loop device only
// through a descriptor open for writing, or for CAP_SYS_ADMIN). A
// descriptor open for writing keeps a file system from being mounted on
// the device where the kernel refuses to mount a device with writers
// (CONFIG_BLK_DEV_WRITE_MOUNTED=n, bdev_allow_write_mounted=0): Attach of
// a read-only binding, and OpenBinding of one, hold a read-only one.
//
// An open refused (EACCES) while udev runs and has not processed the
// device yet is made again once udev has, within 10 s: a device that
// LOOP_CTL_GET_FREE or LOOP_CTL_ADD has just made is root's, mode 0600,
// until udev's rules give it to the disk group, a few milliseconds later.
// Otherwise the error matches fs.ErrPermission and says what is missing
// (udev, or a group of this process).
//
// A missing node is an error matching fs.ErrNotExist, holding a
// *NodeMissingError when the device exists (a container's /dev): MakeNode
// makes the node. A device that the kernel is tearing down (detached by
// its last close, or being removed) refuses the open: the error then says
// so and matches ErrNotBound and ENXIO.
func OpenDevice(n int) (*Device, error) {
	return host.openGranted(context.Background(), n, readWrite)
}

// openDeviceMode is OpenDevice, opening the node read-write or read-only.
func (s *system) openDeviceMode(n, mode int) (*Device, error) {
	if err := checkNumber("open", "", n, 0); err != nil {
		return nil, err
	}
	path := DevicePath(n)
	h, err := s.openDevice(path, mode)
	if err != nil {
		return nil, nodeOpenError(path, s.missingNode(n, err))
	}
	return &Device{h: h, sys: s, number: n, path: path}, nil
}

// openDevice opens the loop device at path, read-write or read-only,
// explaining ENXIO.
func (s *system) openDevice(path string, mode int) (handle, error) {
	h, err := s.k.open(path, mode)
	if err == nil {
		return h, nil
	}
	var pe *os.PathError
	if errors.As(err, &pe) && pe.Err == syscall.ENXIO {
		return nil, &os.PathError{Op: pe.Op, Path: pe.Path, Err: errTornDown}
	}
	return nil, err
}

// OpenDevicePath opens the loop device at path, following symlinks. Only a
// whole loop block device is accepted, bound or not: anything else (a
// partition, /dev/null, a regular file, /dev/loop-control) is an error
// matching ErrNotLoop, refused before the node is opened.
func OpenDevicePath(path string) (*Device, error) { return host.openDevicePath(path) }

func (s *system) openDevicePath(path string) (*Device, error) {
	n, rdev, err := s.loopNumber(path)
	if err != nil {
		return nil, err
	}
	h, err := s.openDevice(path, readWrite)
	if err != nil {
		return nil, nodeOpenError(path, err)
	}
	// The path may have been switched between the check and the open.
	if got, err := h.rdev(); err != nil || got != rdev {
		h.Close()
		return nil, newError("open", path, ErrNotLoop)
	}
	return &Device{h: h, sys: s, number: n, path: path}, nil
}

// Shared reports whether Attach, with Options.Reuse, returned a device
// that was bound already, by this process or another, rather than one it
// bound. Such a binding is not the caller's alone: Close lets go of it,
// and the caller should not ClearFD it under the others.
func (d *Device) Shared() bool { return d.shared }

// Number returns the device number N of /dev/loopN.
func (d *Device) Number() int { return d.number }

// Path returns the path the device was opened by.
func (d *Device) Path() string { return d.path }

// SetFD binds f to the device with LOOP_SET_FD, with no offset, size limit
// or flags; the device is read-only when f is. Configure binds in one step
// with options. A bound device is an error matching ErrBusy.
//
// f must be a regular file or a block device, as for Attach: anything
// else is refused before the ioctl with an error matching fs.ErrInvalid.
//
// Without CAP_SYS_ADMIN it needs d open for writing, which the Device of a
// read-only binding from Attach or OpenBinding is not (see OpenDevice).
func (d *Device) SetFD(f *os.File) error {
	const op = "set fd"
	h, err := d.handle(op)
	if err != nil {
		return err
	}
	return withFile(op, d.path, f, func(fd uintptr) error {
		if err := checkBackingFile(fd, f.Name(), Options{}); err != nil {
			return newError(op, d.path, err)
		}
		return newError(op, d.path, d.setUp(h, func() error {
			_, err := ioctl(h, reqSetFD, fd)
			return err
		}))
	})
}

// ClearFD detaches the device with LOOP_CLR_FD. An unbound device is an
// error matching ErrNotBound.
//
// The kernel detaches at the last close, not in the call, whenever
// another opener holds the device (a mount, udev probing it, another
// Device): ClearFD then only sets FlagAutoClear, and the device stays bound
// and usable until the last of them closes it. Since Linux 6.11 that holds
// even for the only opener: ClearFD sets FlagAutoClear and starts the
// teardown, the device refuses new opens (ENXIO, see OpenDevice) and
// reports ErrNotBound to Status, List leaves it out, and the binding is
// gone when Close returns. Before 6.11 the only opener's ClearFD detached
// at once.
//
// Without CAP_SYS_ADMIN it needs d open for writing, which the Device of a
// read-only binding from Attach or OpenBinding is not (see OpenDevice).
func (d *Device) ClearFD() error {
	_, err := d.ioctl("clear fd", reqClearFD, 0)
	return err
}

// SetCapacity makes a bound device re-read its backing file's size
// (LOOP_SET_CAPACITY), after the file has grown or shrunk.
//
// Without CAP_SYS_ADMIN it needs d open for writing, which the Device of a
// read-only binding from Attach or OpenBinding is not (see OpenDevice).
func (d *Device) SetCapacity() error {
	_, err := d.ioctl("set capacity", reqSetCapacity, 0)
	return err
}

// SetDirectIO turns direct I/O to the backing file on or off with
// LOOP_SET_DIRECT_IO. Turning it on needs a backing file system that
// supports O_DIRECT (tmpfs does since Linux 6.6), and an offset and block
// size aligned to the blocks of the disk under it; the kernel's refusal is
// an error matching ErrNoDirectIO. A kernel that refuses the change while
// the device is held exclusively (mounted) answers with an error matching
// ErrBusy that says so.
//
// Without CAP_SYS_ADMIN it needs d open for writing, which the Device of a
// read-only binding from Attach or OpenBinding is not (see OpenDevice).
func (d *Device) SetDirectIO(on bool) error {
	const op = "set direct io"
	h, err := d.handle(op)
	if err != nil {
		return err
	}
	var arg uintptr
	if on {
		arg = 1
	}
	_, err = ioctl(h, reqSetDirectIO, arg)
	if on && err == syscall.EINVAL {
		err = errNoDirectIO
	}
	return newError(op, d.path, d.heldExclusively(err, "direct I/O"))
}

// Close closes the device. It does not unbind it, unless FlagAutoClear is
// set and this was the last opener. Close is idempotent; every other method
// returns an error matching fs.ErrClosed after it.
func (d *Device) Close() error {
	if d == nil || d.h == nil || d.closed.Swap(true) {
		return nil
	}
	return newError("close", d.path, d.h.Close())
}

// handle returns the open handle, or an error matching fs.ErrClosed.
func (d *Device) handle(op string) (handle, error) {
	if d == nil || d.h == nil || d.closed.Load() {
		path := ""
		if d != nil {
			path = d.path
		}
		return nil, &Error{Op: op, Path: path, Err: fs.ErrClosed}
	}
	return d.h, nil
}

func (d *Device) ioctl(op string, req uint, arg uintptr) (int, error) {
	h, err := d.handle(op)
	if err != nil {
		return -1, err
	}
	r, err := ioctl(h, req, arg)
	if err != nil {
		return -1, &Error{Op: op, Path: d.path, Err: err}
	}
	return r, nil
}

// withFile runs fn with the descriptor of f held open, so that a concurrent
// Close of f cannot hand the number to another file mid-call. A nil or
// closed f is refused as invalid input.
func withFile(op, path string, f *os.File, fn func(fd uintptr) error) error {
	if f == nil {
		return newError(op, path, invalid("nil backing file"))
	}
	rc, err := f.SyscallConn()
	if err != nil {
		return newError(op, path, invalid("backing file %s: %w", f.Name(), fs.ErrClosed))
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = fn(fd) }); err != nil {
		return newError(op, path, invalid("backing file %s: %w", f.Name(), fs.ErrClosed))
	}
	return ferr
}
