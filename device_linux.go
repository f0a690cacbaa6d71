package loopctl

import (
	"context"
	"errors"
	"math"
	"os"
	"strconv"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/sysfs"
)

// blockAnswers are the block layer's answers about a device: BLKSSZGET's,
// BLKGETSIZE64's and BLKGETDISKSEQ's. A look through many devices keeps
// one each reader (scratch).
type blockAnswers struct {
	blockSize int32
	size      uint64
	diskSeq   uint64
}

// read sets st.BlockSize, st.Size and st.DiskSeq from the device open as
// h on system s.
func (z *blockAnswers) read(s *system, h handle, st *Status) error {
	if err := ioctlPtr(h, unix.BLKSSZGET, unsafe.Pointer(&z.blockSize)); err != nil {
		return inStep("BLKSSZGET", err)
	}
	if err := ioctlPtr(h, uint(unix.BLKGETSIZE64), unsafe.Pointer(&z.size)); err != nil {
		return inStep("BLKGETSIZE64", err)
	}
	if err := s.readDiskSeq(h, &z.diskSeq); err != nil {
		return err
	}
	st.BlockSize, st.Size, st.DiskSeq = uint32(z.blockSize), z.size, z.diskSeq
	return nil
}

// readDiskSeq sets *seq from BLKGETDISKSEQ on the block device open as h:
// 0, and no error, on a kernel that does not know the request (EINVAL or
// ENOTTY, before 5.15), which s remembers, so that no later read asks.
func (s *system) readDiskSeq(h handle, seq *uint64) error {
	*seq = 0
	if !s.has(featDiskSeq) {
		return nil
	}
	err := ioctlPtr(h, uint(unix.BLKGETDISKSEQ), unsafe.Pointer(seq))
	if err == unix.EINVAL || err == unix.ENOTTY {
		s.lacks(featDiskSeq)
		*seq = 0
		return nil
	}
	if err != nil {
		return inStep("BLKGETDISKSEQ", err)
	}
	return nil
}

func statusFromInfo(info *unix.LoopInfo64) Status {
	name := unix.ByteSliceToString(info.File_name[:])
	return Status{
		Number:        int(info.Number),
		BackingFile:   name,
		Ref:           name,
		BackingDevice: info.Device,
		BackingInode:  info.Inode,
		Offset:        info.Offset,
		SizeLimit:     info.Sizelimit,
		Flags:         Flags(info.Flags),
	}
}

// loopInfo builds the loop_info64 that binds a file named name with o:
// lo_file_name is o.Ref, or else the name's first 63 bytes.
func loopInfo(name string, o Options) unix.LoopInfo64 {
	info := unix.LoopInfo64{Offset: o.Offset, Sizelimit: o.SizeLimit, Flags: uint32(o.Flags)}
	if o.Ref != "" {
		name = o.Ref
	}
	copy(info.File_name[:unix.LO_NAME_SIZE-1], name)
	return info
}

// setUp runs bind, which binds d's device through h, once partitions an
// earlier binding left on the device are deleted (stalePartitions). It
// deletes them, and binds, under the device's exclusive lock, as Attach
// does, so that no process that follows the protocol binds the device
// meanwhile: a lock other processes hold for a moment (udev's probe), and
// a partition one has open, are waited for, up to about a second each,
// as a busy kernel is (retryWhile); then d holds the lock it held before.
// A device without such partitions, the common case, is bound at once.
func (d *Device) setUp(h handle, bind func() error) error {
	parts, err := d.sys.stalePartitions(d.number)
	if err != nil {
		return err
	}
	if len(parts) == 0 {
		return bind()
	}
	d.lock.mu.Lock()
	defer d.lock.mu.Unlock()
	if held := LockMode(d.lock.mode.Load()); held != LockExclusive {
		err := d.sys.retryWhile(func() error { return h.flock(unix.LOCK_EX | unix.LOCK_NB) },
			func(err error) bool { return err == unix.EWOULDBLOCK })
		if err == unix.EWOULDBLOCK {
			return errLockHeld
		}
		if err != nil {
			return inStep("flock", err)
		}
		// Back to the lock d held: from exclusive, never refused.
		defer h.flock(flockOf[held])
	}
	// A partition udev probes is in use for a moment: tried again as
	// the lock is.
	err = d.sys.retryWhile(func() error { return d.sys.dropPartitions(h, d.number, parts) }, partitionBusy)
	if err != nil {
		return err
	}
	return bind()
}

// partitionBusy tells whether err from dropPartitions is a partition in
// use (partitionsInUse), rather than the device bound meanwhile.
func partitionBusy(err error) bool {
	var c *cause
	return errors.As(err, &c) && c.is == ErrBusy
}

// configure binds the file open as fd, named name, with valid options o,
// and returns the binding's disk sequence number (0 on kernels without),
// read right after the bind, by the binder: while it holds the device open
// no other process can replace the binding. With FlagDirectIO it checks
// that the kernel turned direct I/O on: older kernels leave it off, and
// report success, where the backing file system cannot do it. Then, as on
// any failure after the bind, it clears the binding it made.
func (s *system) configure(h handle, dev string, fd uintptr, name string, o Options) (uint64, error) {
	if err := s.bind(h, dev, fd, name, o); err != nil {
		return 0, err
	}
	if o.Flags&FlagDirectIO != 0 {
		info := new(unix.LoopInfo64)
		if err := ioctlPtr(h, reqGetStatus64, unsafe.Pointer(info)); err != nil {
			return 0, undo(h, inStep("LOOP_GET_STATUS64", err))
		}
		if info.Flags&unix.LO_FLAGS_DIRECT_IO == 0 {
			return 0, undo(h, errNoDirectIO)
		}
	}
	var seq uint64
	if err := s.readDiskSeq(h, &seq); err != nil {
		return 0, undo(h, err)
	}
	return seq, nil
}

// bind binds the device at dev, open as h, with one LOOP_CONFIGURE, or
// the calls before it on a kernel that lacks it (Linux before 5.8), which
// s then remembers, so that later binds go straight to the older
// sequence. On a kernel that may scan a partition table twice in
// LOOP_CONFIGURE (without featScanOnce), FlagPartScan is set after it
// (setPartScan).
func (s *system) bind(h handle, dev string, fd uintptr, name string, o Options) error {
	if s.has(featConfigure) {
		cfg := &unix.LoopConfig{Fd: uint32(fd), Size: o.BlockSize, Info: loopInfo(name, o)}
		if o.PreferDirectIO {
			// Where direct I/O is impossible the kernel binds buffered.
			cfg.Info.Flags |= unix.LO_FLAGS_DIRECT_IO
		}
		later := o.Flags&FlagPartScan != 0 && !s.has(featScanOnce)
		if later {
			cfg.Info.Flags &^= unix.LO_FLAGS_PARTSCAN
		}
		err := ioctlPtr(h, reqConfigure, unsafe.Pointer(cfg))
		if !lacksConfigure(h, err) {
			if err != nil || !later {
				return explainBlockSize(err, o.BlockSize)
			}
			return s.setPartScan(h, dev, name, o)
		}
		s.lacks(featConfigure)
	}
	return s.configureLegacy(h, fd, name, o)
}

// setPartScan turns on FlagPartScan, with LOOP_SET_STATUS64, of the device
// at dev, open as h, just bound without it, so that the kernel scans its
// partition table once. LOOP_CONFIGURE marks the disk for a scan; the
// first open of the disk after it runs that scan, which finds nothing
// while the flag is off, and clears the mark: setPartScan opens the disk
// once first, so that no open after the flag is set (udev's probe) scans
// beside LOOP_SET_STATUS64's own scan. On failure it clears the binding.
func (s *system) setPartScan(h handle, dev, name string, o Options) error {
	if err := s.runMarkedScan(dev); err != nil {
		return undo(h, err)
	}
	info := loopInfo(name, o)
	info.Flags &= uint32(legacyFlags)
	if err := s.retryAgain(func() error { return ioctlPtr(h, reqSetStatus64, unsafe.Pointer(&info)) }); err != nil {
		return undo(h, inStep("LOOP_SET_STATUS64", err))
	}
	return nil
}

// runMarkedScan opens the disk at dev and closes it: the open runs the
// partition scan LOOP_CONFIGURE marked the disk for (on kernels that
// lack featScanOnce), which finds nothing while FlagPartScan is off.
func (s *system) runMarkedScan(dev string) error {
	h, err := s.k.open(dev, readOnly|transient)
	if err != nil {
		return inStep("open", err)
	}
	return h.Close()
}

// undo clears the binding that configure made, after err.
func undo(h handle, err error) error {
	if _, cerr := ioctl(h, reqClearFD, 0); cerr != nil {
		err = errors.Join(err, inStep("LOOP_CLR_FD (rollback)", cerr))
	}
	return err
}

// explainBlockSize explains the kernel's EINVAL for a block size above the
// page size: kernels before 6.15 (6.12 among them) take none, later ones
// up to 64 KiB.
func explainBlockSize(err error, size uint32) error {
	if err != unix.EINVAL || int(size) <= os.Getpagesize() {
		return err
	}
	return explain("block size "+strconv.FormatUint(uint64(size), 10)+" is above what this kernel takes: the page size ("+
		strconv.Itoa(os.Getpagesize())+") before Linux 6.15, 64 KiB since", unix.EINVAL, nil)
}

// errCycle explains EBADF from binding a file: it is the device itself,
// or a loop device stacked on it, and the kernel refuses such a cycle.
var errCycle error = explain("it is this loop device, or a loop device stacked on it: a cycle, which the kernel refuses", unix.EBADF, nil)

// lacksConfigure tells whether err, LOOP_CONFIGURE's answer, means that the
// kernel does not know the request. ENOTTY says so plainly; EINVAL is what
// kernels before 5.8 answer to unknown loop requests, but also what a newer
// kernel answers to a bad argument. The kernel settles it: asked again with
// no file, one that knows the request looks the file up first and answers
// EBADF, with no other effect.
func lacksConfigure(h handle, err error) bool {
	switch err {
	case unix.ENOTTY, unix.ENOSYS:
		return true
	case unix.EINVAL:
		probe := unix.LoopConfig{Fd: math.MaxUint32}
		return ioctlPtr(h, reqConfigure, unsafe.Pointer(&probe)) != unix.EBADF
	}
	return false
}

// stepSetFD names the binding step of the fallback in its errors.
const stepSetFD = "LOOP_SET_FD"

// legacyFlags are the flags LOOP_SET_STATUS64 can set.
const legacyFlags = FlagAutoClear | FlagPartScan

// configureLegacy binds with the calls that predate LOOP_CONFIGURE. Once its
// LOOP_SET_FD has succeeded the binding is its own, and a later failure
// clears it.
func (s *system) configureLegacy(h handle, fd uintptr, name string, o Options) error {
	if o.Flags&FlagReadOnly != 0 {
		// LOOP_SET_FD makes the device read-only only for a read-only file.
		ro, done, err := s.reopenReadOnly(fd)
		if err != nil {
			return inStep("reopen read-only", err)
		}
		defer done()
		fd = ro
	}
	if _, err := ioctl(h, reqSetFD, fd); err != nil {
		return inStep(stepSetFD, err)
	}
	if err := s.legacySettings(h, name, o); err != nil {
		return undo(h, err)
	}
	return nil
}

func (s *system) legacySettings(h handle, name string, o Options) error {
	info := loopInfo(name, o)
	info.Flags &= uint32(legacyFlags)
	if err := s.retryAgain(func() error { return ioctlPtr(h, reqSetStatus64, unsafe.Pointer(&info)) }); err != nil {
		return inStep("LOOP_SET_STATUS64", err)
	}
	if o.BlockSize != 0 {
		err := s.retryAgain(func() error {
			_, err := ioctl(h, reqSetBlockSize, uintptr(o.BlockSize))
			return err
		})
		if err != nil {
			return inStep("LOOP_SET_BLOCK_SIZE", explainBlockSize(err, o.BlockSize))
		}
	}
	switch {
	case o.Flags&FlagDirectIO != 0:
		if _, err := ioctl(h, reqSetDirectIO, 1); err != nil {
			return inStep("LOOP_SET_DIRECT_IO", explainDirectIO(err))
		}
	case o.PreferDirectIO:
		// EINVAL: the kernel cannot, and the device stays buffered.
		if _, err := ioctl(h, reqSetDirectIO, 1); err != nil && err != unix.EINVAL {
			return inStep("LOOP_SET_DIRECT_IO", err)
		}
	}
	return nil
}

// explainDirectIO explains LOOP_SET_DIRECT_IO's EINVAL to turn direct I/O
// on: the kernel could not.
func explainDirectIO(err error) error {
	if err == unix.EINVAL {
		return errNoDirectIO
	}
	return err
}

// status reads LOOP_GET_STATUS64 into info for op.
func (d *Device) status(op string, h handle, info *unix.LoopInfo64) error {
	return newError(op, d.path, ioctlPtr(h, reqGetStatus64, unsafe.Pointer(info)))
}

// unsettable refuses what of s SetStatus cannot change, where s sets it
// (not zero) otherwise than the device, open as h, has it (info).
func (d *Device) unsettable(h handle, s Status, info *unix.LoopInfo64) error {
	switch {
	case s.Number != 0 && s.Number != d.number:
		return invalid("the Status is of loop%d, not of %s", s.Number, d.path)
	case (s.BackingDevice != 0 || s.BackingInode != 0) && (s.BackingDevice != info.Device || s.BackingInode != info.Inode):
		return invalid("the backing file cannot change through LOOP_SET_STATUS64: ChangeFD changes it")
	case s.BlockSize == 0 && s.DiskSeq == 0:
		return nil
	}
	var cur Status
	if err := new(blockAnswers).read(d.sys, h, &cur); err != nil {
		return err
	}
	switch {
	case s.BlockSize != 0 && s.BlockSize != cur.BlockSize:
		return invalid("block size %d cannot change through LOOP_SET_STATUS64 (the device has %d): SetBlockSize changes it", s.BlockSize, cur.BlockSize)
	case s.DiskSeq != 0 && cur.DiskSeq != 0 && s.DiskSeq != cur.DiskSeq:
		return seqChanged(cur.DiskSeq, s.DiskSeq)
	}
	return nil
}

// loopNumber checks, without opening it, that path (after symlinks) is a
// whole loop disk, and returns its number and device number. The sysfs
// loop/ directory exists only while a device is bound, so the test is where
// /sys/dev/block/MAJ:MIN leads: to .../block/loopN for a whole loop disk,
// to .../block/loopN/loopNpM for a partition.
func (s *system) loopNumber(path string) (int, uint64, error) {
	st, err := stat(path)
	if err != nil {
		return -1, 0, newError("open", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return -1, 0, newError("open", path, ErrNotLoop)
	}
	rdev := uint64(st.Rdev)
	target, err := os.Readlink(sysfs.DevBlockPath(s.sysfs, unix.Major(rdev), unix.Minor(rdev)))
	if err != nil {
		return -1, 0, newError("open", path, ErrNotLoop)
	}
	n, ok := sysfs.WholeLoopDisk(target)
	if !ok || n > MaxNumber {
		return -1, 0, newError("open", path, ErrNotLoop)
	}
	return n, rdev, nil
}

// readStatus is Status.
func (d *Device) readStatus() (Status, error) {
	const op = "status"
	h, err := d.handle(op)
	if err != nil {
		return Status{}, err
	}
	var info unix.LoopInfo64
	if err := d.status(op, h, &info); err != nil {
		return Status{}, err
	}
	s := statusFromInfo(&info)
	if err := new(blockAnswers).read(d.sys, h, &s); err != nil {
		return Status{}, newError(op, d.path, err)
	}
	var buf [sysfs.BufSize]byte
	// Empty, or gone, once a teardown that began since has let go of the
	// file: lo_file_name then stands. Any other failure (EMFILE) is an
	// error, not a reason to give the short name.
	b, err := sysfs.ReadFile(d.sys.sysfsLoopAttr(s.Number, "backing_file"), buf[:])
	if err := unbinding(err); err != nil {
		return Status{}, newError(op, d.path, err)
	}
	if v := sysfs.Value(b); v != "" {
		s.BackingFile = v
	}
	return s, nil
}

// configure is Configure.
func (d *Device) configure(f *os.File, o Options) error {
	const op = "configure"
	h, err := d.handle(op)
	if err != nil {
		return err
	}
	if err := o.validate(); err != nil {
		return newError(op, d.path, err)
	}
	switch {
	case o.Reuse:
		return newError(op, d.path, invalid("Options.Reuse: only Attach, which chooses the device, can share one"))
	case o.MakeNode:
		return newError(op, d.path, invalid("Options.MakeNode: the device is open already"))
	case o.NoSymlinks:
		return newError(op, d.path, invalid("Options.NoSymlinks is for a path: the caller opened this file"))
	}
	return withFile(op, d.path, f, func(fd uintptr) error {
		if err := checkBackingFile(fd, f.Name(), o); err != nil {
			return newError(op, d.path, err)
		}
		var err error
		if o.BlockSize, err = backingBlockSize(context.Background(), fd, o); err != nil {
			return newError(op, d.path, err)
		}
		prev := LockMode(d.lock.mode.Load())
		if o.Lock != prev {
			if err := d.Lock(o.Lock); err != nil {
				return err
			}
		}
		var seq uint64
		err = d.setUp(h, func() (err error) {
			seq, err = d.sys.configure(h, d.path, fd, f.Name(), o)
			return err
		})
		if err != nil {
			if o.Lock != prev {
				d.Lock(prev) // as it was: a lock d held, given back without waiting
			}
			return newError(op, d.path, err)
		}
		d.seq.Store(seq)
		return nil
	})
}

// setStatus is SetStatus.
func (d *Device) setStatus(s Status) error {
	const op = "set status"
	h, err := d.handle(op)
	if err != nil {
		return err
	}
	if err := (Options{Offset: s.Offset, SizeLimit: s.SizeLimit, Flags: s.Flags, Ref: s.Ref}).validate(); err != nil {
		return newError(op, d.path, err)
	}
	var info unix.LoopInfo64
	if err := d.status(op, h, &info); err != nil {
		return err
	}
	have := Flags(info.Flags)
	if err := d.unsettable(h, s, &info); err != nil {
		return newError(op, d.path, err)
	}
	if fixed := (have ^ s.Flags) &^ legacyFlags; fixed != 0 {
		return newError(op, d.path, invalid("%v cannot change through LOOP_SET_STATUS64 (the device has %v)", fixed, have))
	}
	if have&FlagPartScan != 0 && s.Flags&FlagPartScan == 0 {
		return newError(op, d.path, invalid("partscan cannot be cleared"))
	}
	if have&FlagPartScan == 0 && s.Flags&FlagPartScan != 0 && !d.sys.has(featScanOnce) {
		// So that the scan this call makes is the only one (setPartScan).
		if err := d.sys.runMarkedScan(d.path); err != nil {
			return newError(op, d.path, err)
		}
	}
	// info keeps lo_file_name unless s names a reference: the call writes
	// what it is given.
	info.Offset, info.Sizelimit, info.Flags = s.Offset, s.SizeLimit, uint32(s.Flags&legacyFlags)
	if s.Ref != "" {
		info.File_name = [unix.LO_NAME_SIZE]uint8{}
		copy(info.File_name[:unix.LO_NAME_SIZE-1], s.Ref)
	}
	return newError(op, d.path, d.heldExclusively(d.sys.retryAgain(func() error {
		return ioctlPtr(h, reqSetStatus64, unsafe.Pointer(&info))
	}), "offset, size limit and flags"))
}

// setBlockSize is SetBlockSize.
func (d *Device) setBlockSize(size uint32) error {
	const op = "set block size"
	h, err := d.handle(op)
	if err != nil {
		return err
	}
	if err := validBlockSize(size, false); err != nil {
		return newError(op, d.path, err)
	}
	return newError(op, d.path, d.heldExclusively(explainBlockSize(d.sys.retryAgain(func() error {
		_, err := ioctl(h, reqSetBlockSize, uintptr(size))
		return err
	}), size), "block size"))
}

// changeFD is ChangeFD.
func (d *Device) changeFD(f *os.File) error {
	const op = "change fd"
	h, err := d.handle(op)
	if err != nil {
		return err
	}
	return withFile(op, d.path, f, func(fd uintptr) error {
		if err := checkBackingFile(fd, f.Name(), Options{}); err != nil {
			return newError(op, d.path, err)
		}
		var info unix.LoopInfo64
		if err := d.status(op, h, &info); err != nil {
			return err
		}
		if info.Flags&unix.LO_FLAGS_READ_ONLY == 0 {
			return newError(op, d.path, invalid("LOOP_CHANGE_FD needs a read-only device"))
		}
		_, err = ioctl(h, reqChangeFD, fd)
		switch err {
		case nil:
			var seq uint64
			if err := d.sys.readDiskSeq(h, &seq); err != nil {
				d.seq.Store(0) // the kernel will be asked
				return nil
			}
			d.seq.Store(seq)
			return nil
		case unix.EINVAL:
			err = inStep("LOOP_CHANGE_FD refused "+f.Name()+" (it must be the same size as the bound file)", err)
		case unix.EBADF:
			err = fileErr(inStep("backing file "+f.Name(), errCycle))
		}
		return newError(op, d.path, err)
	})
}

// diskSeq is DiskSeq.
func (d *Device) diskSeq() (uint64, error) {
	const op = "disk seq"
	h, err := d.handle(op)
	if err != nil {
		return 0, err
	}
	if seq := d.seq.Load(); seq != 0 {
		return seq, nil
	}
	var seq uint64
	if err := d.sys.readDiskSeq(h, &seq); err != nil {
		return 0, newError(op, d.path, err)
	}
	return seq, nil
}
