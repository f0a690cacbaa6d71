package loopctl

import (
	"math"
	"math/bits"
	"strconv"
	"strings"
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
// both, matching [fs.ErrInvalid].
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
	// components, as recent util-linux refuses them: a service that binds
	// a path under a directory its users can write to cannot then be led
	// to bind another file (/dev/sda). It is checked on the file Attach
	// binds, so a rename between the check and the bind changes nothing.
	// Only Attach opens a path; AttachFile and Configure refuse it.
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
