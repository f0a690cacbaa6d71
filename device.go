package loopctl

import (
	"context"
	"errors"
	"io"
	"io/fs"
	"os"
	"sync/atomic"
	"syscall"
)

// A Device is an open loop block device, /dev/loopN, bound or not. It is
// safe for concurrent use.
//
// The methods that change the device (SetFD, Configure, ClearFD,
// SetStatus, SetCapacity, SetBlockSize, SetDirectIO, ChangeFD, Detach)
// need it open for writing, or CAP_SYS_ADMIN: the Device of a read-only
// binding from [Attach] or [OpenBinding] is open read-only, and without
// the capability such a call fails with an error matching
// [fs.ErrPermission] that says so ([OpenDevice] opens one for writing).
type Device struct {
	h           handle
	sys         *system
	number      int
	path        string
	shared      bool // found bound by Attach with Reuse
	closed      atomic.Bool
	deviceState // what the platform keeps of the device
}

var _ io.Closer = (*Device)(nil)

// OpenDevice opens /dev/loopN read-write, so that every method works
// without CAP_SYS_ADMIN too (a read-only binding from [Attach] or
// [OpenBinding] is held through a read-only descriptor instead, which a
// mount beside it needs on some kernels). A device just made, which stays
// root's until udev gives it to the disk group, is opened once udev has,
// within 10 s; a refusal that waiting cannot change matches
// [fs.ErrPermission] and says what is missing. A missing node matches
// [fs.ErrNotExist], with a [*NodeMissingError] where the device exists (a
// container's /dev: see [MakeNode]). A device being torn down refuses the
// open with an error matching [ErrNotBound].
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
// matching [ErrNotLoop], refused before the node is opened.
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

// Shared reports whether [Attach], with [Options.Reuse], returned a device
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
// with options. A bound device is an error matching [ErrBusy].
//
// f must be a regular file or a block device, as for [Attach]: anything
// else is refused before the ioctl with an error matching [fs.ErrInvalid].
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
// error matching [ErrNotBound].
//
// The kernel detaches at the last close, not in the call, whenever
// another opener holds the device (a mount, udev probing it, another
// Device): ClearFD then only sets [FlagAutoClear], and the device stays bound
// and usable until the last of them closes it. Since Linux 6.11 that holds
// even for the only opener: ClearFD sets FlagAutoClear and starts the
// teardown, the device refuses new opens (ENXIO, see [OpenDevice]) and
// reports ErrNotBound to Status, List leaves it out, and the binding is
// gone when Close returns. Before 6.11 the only opener's ClearFD detached
// at once.
func (d *Device) ClearFD() error {
	_, err := d.ioctl("clear fd", reqClearFD, 0)
	return err
}

// SetCapacity makes a bound device re-read its backing file's size
// (LOOP_SET_CAPACITY), after the file has grown or shrunk.
func (d *Device) SetCapacity() error {
	_, err := d.ioctl("set capacity", reqSetCapacity, 0)
	return err
}

// SetDirectIO turns direct I/O to the backing file on or off with
// LOOP_SET_DIRECT_IO. Turning it on needs a backing file system that
// supports O_DIRECT (tmpfs does since Linux 6.6), and an offset and block
// size aligned to the blocks of the disk under it; the kernel's refusal is
// an error matching [ErrNoDirectIO]. A kernel that refuses the change while
// the device is held exclusively (mounted) answers with an error matching
// [ErrBusy] that says so.
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

// Close closes the device. It does not unbind it, unless [FlagAutoClear] is
// set and this was the last opener. Close is idempotent; every other method
// returns an error matching [fs.ErrClosed] after it.
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

// Status returns the device's binding: its numbers and flags, block size,
// size and disk sequence number, and the backing file's full path (sysfs;
// the kernel keeps only 64 bytes of it). An unbound device is an error
// matching [ErrNotBound].
func (d *Device) Status() (Status, error) { return d.readStatus() }

// Configure binds f to the device as o asks, in one LOOP_CONFIGURE where
// the kernel has it (older calls otherwise, which clear their binding if a
// step fails). o and f are checked as [Attach] checks them, before any
// call, and what only [Attach] does ([Options.Reuse], MakeNode, NoSymlinks)
// is refused as invalid. No setting is dropped: a kernel that binds
// without the direct I/O [FlagDirectIO] asks for makes Configure clear the
// binding and fail with [ErrNoDirectIO]. With o.Lock the device is locked
// so before the bind. A bound device is an error matching [ErrBusy].
func (d *Device) Configure(f *os.File, o Options) error { return d.configure(f, o) }

// SetStatus changes what LOOP_SET_STATUS64 changes of a bound device: its
// offset, size limit, [FlagAutoClear], [FlagPartScan] (which cannot be
// cleared), and its owner reference (Ref; "" keeps it). Whatever else of s
// is set (not zero) and differs from the device is refused as invalid
// before the call, never dropped: [FlagReadOnly] is fixed at the bind,
// [FlagDirectIO] changes through [Device.SetDirectIO], BlockSize through
// [Device.SetBlockSize], the backing file through [Device.ChangeFD]; a
// Status of another device, or (DiskSeq) of another binding, matching
// [ErrChanged]. BackingFile and Size are what the kernel reports, not
// settings. A kernel that refuses the change while the device is held
// exclusively makes it an error matching [ErrBusy] that names the holder.
func (d *Device) SetStatus(s Status) error { return d.setStatus(s) }

// SetBlockSize sets a bound device's logical block size: a power of two
// from 512 up, the upper bound the kernel's (the page size on older
// kernels; KERNELS.md). A kernel that refuses the change while the device
// is held exclusively (mounted) makes it an error matching [ErrBusy] that
// names the holder.
func (d *Device) SetBlockSize(size uint32) error { return d.setBlockSize(size) }

// ChangeFD swaps the backing file of a bound read-only device for f,
// without unbinding (LOOP_CHANGE_FD): the way a live system's root image is
// replaced. The kernel takes a regular file or block device of the bound
// file's size; a device that is not read-only, or a file of another kind,
// is refused before the call.
func (d *Device) ChangeFD(f *os.File) error { return d.changeFD(f) }

// DiskSeq returns the disk sequence number of d's binding, which with the
// device's number names this one binding, where a number alone is reused;
// 0 on kernels without (before 5.15), with no error. For a binding d made
// or was opened for, it is the number read then; otherwise the kernel is
// asked. While d is open no other process can replace the binding.
func (d *Device) DiskSeq() (uint64, error) { return d.diskSeq() }

// Lock changes the lock d holds on its device to m (see [LockMode]);
// [LockNone] lets it go, and so does Close. It does not wait: a lock
// another process holds that m conflicts with (udev's, for the
// milliseconds of a probe) is an error matching [ErrBusy], and d keeps the
// lock it held.
func (d *Device) Lock(m LockMode) error { return d.setLock(m) }

// Detach detaches the device, closes it, and returns once the kernel has
// let go of the backing file, which the caller may then delete or unmount.
// While another opener holds the device (a mount, udev's probe) the detach
// waits for its close, and so does Detach, while ctx allows; then it fails
// with an error matching [ErrBusy] and ctx's error that names what holds
// the device, the detach left set for the last close. d is closed either
// way. A device shared through [Options.Reuse] is others' binding too.
func (d *Device) Detach(ctx context.Context) error { return d.detach(ctx) }

// Partitions returns the device's partitions, by number, from sysfs: those
// the kernel found in the partition table of a device bound with
// [FlagPartScan], and those added with BLKPG (partx --add). A device
// without any has none, and no error. A binding the package made shows no
// partition of an earlier binding, and with [FlagPartScan] each partition
// was added once, and is there with its node when the bind returns
// (RELIABILITY.md, "Partitions", says how).
func (d *Device) Partitions() ([]Partition, error) { return d.partitions() }

// Rescan makes the kernel read the device's partition table again, after
// the caller wrote a new one. A device bound without [FlagPartScan] is
// refused as invalid before the call. A partition in use is an error
// matching [ErrBusy] that names it; without CAP_SYS_ADMIN, one matching
// [fs.ErrPermission].
func (d *Device) Rescan() error { return d.rescan() }
