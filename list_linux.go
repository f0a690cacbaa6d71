package loopctl

import (
	"bytes"
	"errors"
	"io/fs"
	"os"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/sysfs"
)

func (s *system) findByBackingFile(path string) ([]Status, error) {
	st, err := stat(path)
	if err != nil {
		return nil, newError("find", path, &os.PathError{Op: "stat", Path: path, Err: err})
	}
	return s.list(&match{file: backingFileID{dev: uint64(st.Dev), ino: uint64(st.Ino)}, byFile: true})
}

// A backingFileID is a file's device and inode.
type backingFileID struct{ dev, ino uint64 }

// A match is what a look wants of the bindings it reads: those of one
// file (device and inode), or those with one owner reference
// (lo_file_name). A nil *match wants them all.
type match struct {
	file   backingFileID
	byFile bool
	ref    string
}

// ofInfo tells whether the binding LOOP_GET_STATUS64 answered info for is
// one m wants.
func (m *match) ofInfo(info *unix.LoopInfo64) bool {
	switch {
	case m == nil:
		return true
	case m.byFile && m.file != (backingFileID{info.Device, info.Inode}):
		return false
	case m.ref != "":
		name := info.File_name[:]
		if i := bytes.IndexByte(name, 0); i >= 0 {
			name = name[:i]
		}
		return string(name) == m.ref
	}
	return true
}

// list returns the bound devices that want matches, in order of number.
func (s *system) list(want *match) ([]Status, error) {
	return s.readDevices(want)
}

// devicesPerWorker is the share of the devices below which another
// goroutine costs more than it saves: a bound device costs 10-25 µs of
// system calls, a goroutine's start and its thread's wake-up tens of
// microseconds. One batch: from 16 devices on, a look is read by two.
const devicesPerWorker = 8

// readersPerProc is how many reading goroutines a look starts for each
// of GOMAXPROCS: more than one, so that while the runtime hands the P of
// a reader in a long syscall to another thread (sysmon does it after 20
// microseconds), that thread has a reader to run. Measured with 4,096
// devices on 2 cores: 1.18× C's time on 2 threads with two a P, 1.26×
// with one.
const readersPerProc = 2

// maxReaders bounds the reading goroutines whatever GOMAXPROCS: each holds
// up to two descriptors during the look, and a process's file table grows
// past 64 entries only by waiting for an RCU grace period, which a look
// must not make a small program pay.
const maxReaders = 16

// A reader is one goroutine's share of a look: its buffers, and its
// error.
type reader struct {
	scratch
	err error // the first error, which ends the look
}

// readDevices returns the status of each bound loop device that want
// matches, in order of number, read with readStatus. The reads are
// independent syscalls on different devices, so with many devices they
// are spread over up to two goroutines a P (readersPerProc, maxReaders),
// each taking the next batch of devices as it finishes one. An error ends
// every reader's work, and is returned; each has closed what it opened by
// then.
func (s *system) readDevices(want *match) ([]Status, error) {
	dir, err := s.openBlockDir()
	if err != nil {
		return nil, newError("list", s.sysfs+"/block", err)
	}
	defer closeFD(dir.fd)
	nums, err := sysfs.LoopNumbersIn(dir.fd)
	if err != nil {
		return nil, newError("list", dir.path, &os.PathError{Op: "getdents64", Path: dir.path, Err: err})
	}
	// Device nums[i]'s status goes to found[i], and BackingFile, never
	// empty for a device found, tells which were. The array is made when
	// the first device is found: a look at thousands of devices none of
	// them bound makes none.
	var found []Status
	var made sync.Once
	put := func(i int, st Status) {
		made.Do(func() { found = make([]Status, len(nums)) })
		found[i] = st
	}
	const batch = 8
	var next atomic.Int64
	var failed atomic.Bool
	// Each reader is an allocation of its own: in one array, the fields
	// one reader writes for every device would share cache lines with
	// those the next reader's ioctls fill.
	readers := make([]*reader, max(1, min(readersPerProc*runtime.GOMAXPROCS(0), maxReaders, (len(nums)+devicesPerWorker-1)/devicesPerWorker)))
	work := func(r *reader) {
		for !failed.Load() {
			i := int(next.Add(batch)) - batch
			if i >= len(nums) {
				return
			}
			for j := i; j < min(i+batch, len(nums)); j++ {
				st, ok, err := s.readStatus(dir, nums[j], want, &r.scratch)
				if err != nil {
					r.err = newError("list", DevicePath(nums[j]), err)
					failed.Store(true)
					return
				}
				if ok {
					put(j, st)
				}
			}
		}
	}
	var wg sync.WaitGroup
	for w := range readers {
		readers[w] = new(reader)
		if w > 0 {
			wg.Go(func() { work(readers[w]) })
		}
	}
	work(readers[0])
	wg.Wait()
	for _, r := range readers {
		if r.err != nil {
			return nil, r.err
		}
	}
	return compact(found), nil
}

// compact returns the statuses of found whose BackingFile is set, in
// order: in found's own array when they are most of it, else in one of
// their size, so that a few devices found among thousands hold no more
// memory than they need; nil when there are none.
func compact(found []Status) []Status {
	n := 0
	for i := range found {
		if found[i].BackingFile != "" {
			n++
		}
	}
	switch {
	case n == 0:
		return nil
	case n == len(found):
		return found
	}
	out := found[:0]
	if n < len(found)/2 {
		out = make([]Status, 0, n)
	}
	for i := range found {
		if found[i].BackingFile != "" {
			out = append(out, found[i])
		}
	}
	return out[:n:n]
}

// A blockDir is the open sysfs directory of the loop devices.
type blockDir struct {
	fd   int
	path string
	// sysfs is true when the directory is on sysfs, whose lookups wait for
	// nothing (see sysfs.ExistsAt); a /sys mounted otherwise may wait.
	sysfs bool
}

// openBlockDir opens the directory where the loop devices' sysfs entries
// are: /sys/devices/virtual/block. /sys/block lists the same devices, but
// as symbolic links to there, and resolving one costs the kernel about as
// much as the read of the attribute itself. Where that directory is
// missing (an unusual sysfs), /sys/block serves.
func (s *system) openBlockDir() (blockDir, error) {
	var err error
	for _, path := range []string{s.sysfs + "/devices/virtual/block", s.sysfs + "/block"} {
		var fd int
		if fd, err = openFD(path, unix.O_RDONLY|unix.O_DIRECTORY); err == nil {
			var fs unix.Statfs_t
			onSysfs := unix.Fstatfs(fd, &fs) == nil && fs.Type == unix.SYSFS_MAGIC
			return blockDir{fd, path, onSysfs}, nil
		}
		if !errors.Is(err, fs.ErrNotExist) {
			break // out of descriptors, say: /sys/block would fail alike
		}
	}
	return blockDir{}, err
}

// A scratch is one reader's buffers, so that reading a device allocates
// only the Status's own strings.
type scratch struct {
	info  unix.LoopInfo64 // LOOP_GET_STATUS64's answer
	block blockAnswers
	attr  [sysfs.BufSize]byte // an attribute's text
	name  [64]byte            // loopN/loop/backing_file, NUL-terminated
	// nameRead is whether the backing_file of the device read last was
	// read; see readStatus.
	nameRead bool
}

// loopAttr returns the name of device n's loop/backing_file relative to
// the devices' directory, NUL-terminated, in sc.name, and the length of
// the part "loopN/loop".
func (sc *scratch) loopAttr(n int) (name []byte, dirLen int) {
	name = strconv.AppendInt(append(sc.name[:0], "loop"...), int64(n), 10)
	name = append(name, "/loop"...)
	dirLen = len(name)
	return append(name, "/backing_file\x00"...), dirLen
}

// readStatus reads device n's Status, reporting false when it is not bound
// (as want wants it), from the device if this process may open it, else
// from sysfs. block is the devices' sysfs directory. An owner reference is
// only in the device: a look for one fails with the open's error where
// the device cannot be opened.
//
// An unbound device is told from sysfs, without opening it: it has no
// loop/ directory. An faccessat of the directory tells it at the least
// cost. But the backing_file of a device the look wants is read anyway,
// and opening it tells too: so after a device whose backing_file it read
// (bound, for List; of the file or reference sought, for a search) a
// reader opens the next one's first, and asks faccessat after any other.
// Bound devices come in runs, since LOOP_CTL_GET_FREE hands out the
// lowest free number, and so do a file's devices, bound one after
// another: either way is mostly a call the look would make next.
//
// The backing file's name is read while the device is open: a device
// cleared meanwhile is torn down only at its last close, so the name and
// the answers of LOOP_GET_STATUS64 are of one binding. An attribute opened
// before the device may be of an earlier binding (the device unbound and
// bound anew in between); it then reads ENODEV, and is opened again.
//
// Whatever it returns, readStatus has closed what it opened.
func (s *system) readStatus(block blockDir, n int, want *match, sc *scratch) (Status, bool, error) {
	name, dirLen := sc.loopAttr(n)
	attr := -1
	defer func() {
		if attr >= 0 {
			closeFD(attr)
		}
	}()
	wasRead := sc.nameRead
	sc.nameRead = false
	if wasRead {
		fd, bound, err := sysfs.OpenAttrIfAt(block.fd, block.path, name)
		if !bound {
			return Status{}, false, unbinding(err)
		}
		attr = fd
	} else {
		name[dirLen] = 0
		bound, err := sysfs.ExistsAt(block.fd, block.path, name[:dirLen+1], block.sysfs)
		name[dirLen] = '/'
		if !bound {
			return Status{}, false, err
		}
	}
	h, err := s.k.open(DevicePath(n), readOnly|transient)
	switch {
	case err == nil:
		defer h.Close()
	case errors.Is(err, syscall.ENXIO) || errors.Is(err, syscall.ENODEV):
		return Status{}, false, nil // being torn down, or removed
	case readSysfsInstead(err) && (want == nil || want.ref == ""):
		st, ok, err := sysfsStatus(block, n, name, &attr, sc)
		return st, ok && (want == nil || !want.byFile || want.file == backingFileID{st.BackingDevice, st.BackingInode}), err
	default:
		return Status{}, false, err
	}
	info := &sc.info
	if err := ioctlPtr(h, reqGetStatus64, unsafe.Pointer(info)); err != nil {
		if errors.Is(err, syscall.ENXIO) {
			return Status{}, false, nil // unbound
		}
		return Status{}, false, inStep("LOOP_GET_STATUS64", err)
	}
	if !want.ofInfo(info) {
		return Status{}, false, nil
	}
	ref := info.File_name
	info.File_name[0] = 0 // sysfs has the whole name
	st := statusFromInfo(info)
	if err := sc.block.read(s, h, &st); err != nil {
		return Status{}, false, err
	}
	file, ok, err := sc.backingFile(block, name, &attr)
	if !ok {
		return Status{}, false, err
	}
	st.BackingFile, st.Ref = file, refOf(&ref, file)
	sc.nameRead = true
	return st, true, nil
}

// readSysfsInstead tells whether err, from opening a device, means that
// the device is out of this process's reach, so that sysfs must tell what
// it can: no right to open it (EACCES, EPERM), or no node (ENOENT: a
// container's /dev; or the device was removed, which sysfs then shows).
// Any other error (EMFILE, ENFILE, ENOMEM) is not a reason to read a
// device another way.
func readSysfsInstead(err error) bool {
	return errors.Is(err, syscall.EACCES) || errors.Is(err, syscall.EPERM) || errors.Is(err, syscall.ENOENT)
}

// refOf returns lo_file_name, name, as a string: a slice of the backing
// file's path where it is that path's start, as it is unless the binder
// gave an owner reference, so that it costs no allocation.
func refOf(name *[unix.LO_NAME_SIZE]byte, file string) string {
	n := bytes.IndexByte(name[:], 0)
	if n < 0 {
		n = len(name)
	}
	if n <= len(file) && file[:n] == unsafe.String(&name[0], n) {
		return file[:n]
	}
	return string(name[:n])
}

// backingFile reads the attribute loop/backing_file, name relative to
// block, through *attr, which it opens first if it is -1; the caller
// closes it. It reports false, with a nil error, for a device that is not
// bound: no loop/ directory, or one unbound meanwhile, or an empty name,
// once a teardown has let go of the file. A descriptor of an earlier
// binding reads ENODEV (its loop/ directory went at the unbinding), and
// is replaced.
func (sc *scratch) backingFile(block blockDir, name []byte, attr *int) (string, bool, error) {
	for again := *attr >= 0; ; again = false {
		if *attr < 0 {
			fd, err := sysfs.OpenAttrAt(block.fd, block.path, name)
			if err != nil {
				return "", false, unbinding(err)
			}
			*attr = fd
		}
		b, err := sysfs.Reread(*attr, block.path, name, sc.attr[:])
		if again && errors.Is(err, syscall.ENODEV) {
			closeFD(*attr)
			*attr = -1
			continue
		}
		if err != nil || len(b) == 0 || b[0] == '\n' {
			return "", false, unbinding(err)
		}
		return sysfs.Value(b), true, nil
	}
}

// loopNumbers returns the numbers of the loop devices sysfs lists, in order.
func (s *system) loopNumbers() ([]int, error) { return sysfs.LoopNumbers(s.sysfs) }

// sysfsLoopAttr returns the path of attribute attr of device n's loop/
// directory, or of the directory itself for "".
func (s *system) sysfsLoopAttr(n int, attr string) string { return sysfs.LoopAttr(s.sysfs, n, attr) }

// sysfsStatus reads device n's binding from sysfs, relative to block (the
// devices' sysfs directory), into a Status, for a process that may not
// open the device. name and attr are backingFile's. It reports false for
// an unbound device, and for one unbound or being torn down while it
// reads.
func sysfsStatus(block blockDir, n int, name []byte, attr *int, sc *scratch) (Status, bool, error) {
	file, ok, err := sc.backingFile(block, name, attr)
	if !ok {
		return Status{}, false, err
	}
	dev := "loop" + strconv.Itoa(n)
	s := Status{Number: n, BackingFile: file}
	var sectors, blockSize uint64
	for _, a := range [...]struct {
		attr string
		u    *uint64
		flag Flags
	}{
		{"/loop/offset", &s.Offset, 0},
		{"/loop/sizelimit", &s.SizeLimit, 0},
		{"/loop/autoclear", nil, FlagAutoClear},
		{"/loop/partscan", nil, FlagPartScan},
		{"/loop/dio", nil, FlagDirectIO},
		{"/ro", nil, FlagReadOnly},
		{"/size", &sectors, 0},
		{"/queue/logical_block_size", &blockSize, 0},
	} {
		b, err := sysfs.ReadFileAt(block.fd, block.path, dev+a.attr, sc.attr[:])
		if err != nil {
			return Status{}, false, unbinding(err)
		}
		if a.u != nil {
			*a.u, err = sysfs.Uint(b)
		} else {
			var on bool
			if on, err = sysfs.Bool(b); on {
				s.Flags |= a.flag
			}
		}
		if err != nil {
			return Status{}, false, &os.PathError{Op: "parse", Path: block.path + "/" + dev + a.attr, Err: err}
		}
	}
	s.Size, s.BlockSize = sectors*512, uint32(blockSize)
	// Kernels before 5.15 have no diskseq: 0.
	if b, err := sysfs.ReadFileAt(block.fd, block.path, dev+"/diskseq", sc.attr[:]); err == nil {
		if s.DiskSeq, err = sysfs.Uint(b); err != nil {
			return Status{}, false, &os.PathError{Op: "parse", Path: block.path + "/" + dev + "/diskseq", Err: err}
		}
	}
	if !s.Deleted() {
		s.BackingDevice, s.BackingInode = backingID(s.BackingFile)
	}
	return s, true, nil
}

// unbinding returns nil for an error reading an attribute of a device that
// went unbound meanwhile: its loop/ directory gone (ENOENT), or removed
// while the attribute was open (ENODEV). Any other error it returns.
func unbinding(err error) error {
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ENODEV) {
		return nil
	}
	return err
}

// backingID returns the device and inode of the file at path, or zeros
// when it is deleted or out of reach.
func backingID(path string) (dev, ino uint64) {
	st, err := stat(path)
	if err != nil {
		return 0, 0
	}
	return uint64(st.Dev), uint64(st.Ino)
}
