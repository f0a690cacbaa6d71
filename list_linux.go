//go:build !loopctl_stub

package loopctl

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io/fs"
	"os"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/sysfs"
)

// List returns the status of every bound loop device, by number, with the
// backing file's full path (a file unlinked since binding reads with a
// " (deleted)" suffix; see Status.Deleted).
//
// Where this process may open the devices (root, or the disk group), List
// asks each one, on a read-only open: LOOP_GET_STATUS64 gives the binding
// and the backing file's device and inode, BLKSSZGET and BLKGETSIZE64 the
// block size and the size; sysfs gives only the full path
// (/sys/block/loopN/loop/backing_file). A device being detached refuses
// the open (since Linux 6.11 until its last close; see Device.ClearFD) and
// is left out, as is one unbound while List reads it. Such an open can
// make a concurrent LOOP_CTL_REMOVE of the device fail with EBUSY, and its
// close can be the last one of a device whose owner cleared it while it
// was open elsewhere, which then runs that detach.
//
// Without that access, List reads everything from sysfs, which needs no
// privilege, and takes BackingDevice and BackingInode from a stat of the
// path (zero when it is deleted or out of reach). sysfs shows a device
// being detached as bound until its teardown ends, so such a device is
// then listed.
//
// The process keeps each backing_file it reads open, one close-on-exec
// descriptor a bound device, and reads it again at the next List,
// FindByBackingFile or Options.Reuse look: the kernel formats the
// attribute anew for each read, and opening it costs several times what
// reading it does. A look closes the descriptor of a device it finds
// unbound, bound anew (whose attribute is a new one) or removed.
func List() ([]Status, error) {
	return list(nil)
}

// FindByBackingFile returns the status of every bound loop device whose
// backing file is the file at path: the same device and inode, whatever
// name it was bound by (a hard link, a renamed file, a relative path). It
// reads what List reads, and on a device of another file stops at
// LOOP_GET_STATUS64.
func FindByBackingFile(path string) ([]Status, error) {
	st, err := stat(path)
	if err != nil {
		return nil, newError("find", path, &os.PathError{Op: "stat", Path: path, Err: err})
	}
	return list(&match{file: backingFileID{dev: uint64(st.Dev), ino: uint64(st.Ino)}, byFile: true})
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

// list returns the bound devices that want matches.
func list(want *match) ([]Status, error) {
	reads, err := readDevices(want)
	if err != nil {
		return nil, newError("list", sysfsRoot+"/block", err)
	}
	bound := 0
	for i := range reads {
		r := &reads[i]
		if r.err != nil {
			return nil, newError("list", DevicePath(r.n), r.err)
		}
		if r.ok {
			bound++
		}
	}
	if bound == 0 {
		return nil, nil
	}
	out := make([]Status, 0, bound)
	for i := range reads {
		if reads[i].ok {
			out = append(out, reads[i].s)
		}
	}
	return out, nil
}

// A deviceRead is what readStatus found of device n.
type deviceRead struct {
	n   int
	s   Status
	ok  bool // bound (to the file asked for)
	err error
}

// devicesPerWorker is the share of the devices below which another
// goroutine costs more than it saves: each device takes a few microseconds
// of syscalls, a goroutine about one to start.
const devicesPerWorker = 32

// readDevices reads every loop device that sysfs lists with readStatus, in
// order of number. The reads are independent syscalls on different
// devices, so with many devices they are spread over up to GOMAXPROCS
// goroutines, each taking the next batch of devices as it finishes one.
func readDevices(want *match) ([]deviceRead, error) {
	dir, err := openBlockDir()
	if err != nil {
		return nil, err
	}
	defer closeFD(dir.fd)
	nums, err := loopNumbersIn(dir.fd)
	if err != nil {
		return nil, &os.PathError{Op: "readdirent", Path: dir.path, Err: err}
	}
	reads := make([]deviceRead, len(nums))
	look := backingFiles.begin(dir)
	const batch = 8
	var next atomic.Int64
	workers := min(runtime.GOMAXPROCS(0), (len(nums)+devicesPerWorker-1)/devicesPerWorker)
	// Each reader's scratch is an allocation of its own: in one array, the
	// fields one reader writes for every device would share cache lines with
	// those the next reader's ioctls fill.
	scratches := make([]*scratch, max(workers, 1))
	for w := range scratches {
		scratches[w] = &scratch{look: look}
	}
	work := func(sc *scratch) {
		for {
			i := int(next.Add(batch)) - batch
			if i >= len(nums) {
				return
			}
			for j := i; j < min(i+batch, len(nums)); j++ {
				r := &reads[j]
				r.n = nums[j]
				r.s, r.ok, r.err = readStatus(dir, r.n, want, sc)
			}
		}
	}
	var wg sync.WaitGroup
	for w := 1; w < workers; w++ {
		wg.Go(func() { work(scratches[w]) })
	}
	work(scratches[0])
	wg.Wait()
	backingFiles.end(look, nums, scratches)
	return reads, nil
}

// A blockDir is the open sysfs directory of the loop devices.
type blockDir struct {
	fd   int
	path string
	// sysfs is true when the directory is on sysfs, whose attributes
	// backingFile may hold open (a fake tree in tests is not).
	sysfs bool
}

// openBlockDir opens the directory where the loop devices' sysfs entries
// are: /sys/devices/virtual/block. /sys/block lists the same devices, but
// as symbolic links to there, and resolving one costs the kernel about as
// much as the read of the attribute itself. Where that directory is
// missing (an unusual sysfs), /sys/block serves.
func openBlockDir() (blockDir, error) {
	var err error
	for _, path := range []string{sysfsRoot + "/devices/virtual/block", sysfsRoot + "/block"} {
		var fd int
		if fd, err = openFD(path, unix.O_RDONLY|unix.O_DIRECTORY); err == nil {
			var fs unix.Statfs_t
			onSysfs := unix.Fstatfs(fd, &fs) == nil && fs.Type == unix.SYSFS_MAGIC
			return blockDir{fd, path, onSysfs}, nil
		}
	}
	return blockDir{}, err
}

// A scratch is one reader's buffers, so that reading a device allocates
// only the Status's own strings, and its share of a look at backingFiles.
type scratch struct {
	info  unix.LoopInfo64 // LOOP_GET_STATUS64's answer
	block blockAnswers
	attr  [sysfs.BufSize]byte // an attribute's text
	probe probeBuf
	name  [64]byte // loopN/loop/backing_file, NUL-terminated
	// look is the reader's share of a look at backingFiles: fd is the
	// descriptor held for the device being read, if hasFD; changes are the
	// descriptors to hold and to close once the look is over; found counts
	// the devices read that had one.
	look    *heldLook
	fd      int
	hasFD   bool
	changes []heldChange
	found   int
}

// readStatus reads device n's Status, reporting false when it is not bound
// (as want wants it), from the device if this process may open it, else
// from sysfs. block is the devices' sysfs directory. An owner reference is
// only in the device: a look for one fails with the open's error where
// the device cannot be opened.
//
// The backing file's name is read while the device is open: a device
// cleared meanwhile is torn down only at its last close, so the name and
// the answers of LOOP_GET_STATUS64 are of one binding.
func readStatus(block blockDir, n int, want *match, sc *scratch) (Status, bool, error) {
	sc.lookUp(n)
	h, err := sys.probe(n, &sc.probe)
	if errors.Is(err, syscall.ENXIO) {
		sc.drop(n)
		return Status{}, false, nil // being torn down
	}
	if err != nil && want != nil && want.ref != "" {
		return Status{}, false, err
	}
	if err != nil {
		s, ok, err := sysfsStatus(block, n, sc)
		return s, ok && (want == nil || !want.byFile || want.file == backingFileID{s.BackingDevice, s.BackingInode}), err
	}
	defer h.Close()
	info := &sc.info
	if err := ioctlPtr(h, reqGetStatus64, unsafe.Pointer(info)); err != nil {
		if errors.Is(err, syscall.ENXIO) {
			sc.drop(n)
			return Status{}, false, nil // unbound
		}
		return Status{}, false, inStep("LOOP_GET_STATUS64", err)
	}
	if !want.ofInfo(info) {
		return Status{}, false, nil
	}
	ref := info.File_name
	info.File_name[0] = 0 // sysfs has the whole name
	s := statusFromInfo(info)
	if err := sc.block.read(h, &s); err != nil {
		return Status{}, false, err
	}
	file, ok, err := backingFile(block, n, sc)
	if !ok {
		return Status{}, false, err
	}
	s.BackingFile, s.Ref = file, refOf(&ref, file)
	return s, true, nil
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

// backingFile reads loop/backing_file of device n relative to block. It
// reports false, with a nil error, for a device that is not bound: no
// loop/ directory, or one unbound meanwhile, or an empty name, once a
// teardown has let go of the file.
//
// On sysfs it reads the attribute through the descriptor backingFiles
// holds, and holds the one it opens otherwise: opening a sysfs attribute
// costs the kernel several times what reading it again costs, and this
// read is a large part of List's work. A descriptor held from an earlier
// binding reads ENODEV (its loop/ directory went at the unbinding), and is
// replaced.
func backingFile(block blockDir, n int, sc *scratch) (string, bool, error) {
	name := strconv.AppendInt(append(sc.name[:0], "loop"...), int64(n), 10)
	name = append(append(name, "/loop/backing_file"...), 0)
	if sc.hasFD {
		b, err := sysfs.Reread(sc.fd, block.path, name, sc.attr[:])
		if !errors.Is(err, syscall.ENODEV) {
			return backingName(b, err)
		}
		sc.drop(n)
	}
	fd, err := sysfs.OpenAttrAt(block.fd, block.path, name)
	if err != nil {
		return "", false, unbinding(err)
	}
	b, err := sysfs.Reread(fd, block.path, name, sc.attr[:])
	if err != nil || !block.sysfs {
		closeFD(fd)
	} else {
		sc.changes = append(sc.changes, heldChange{n: n, fd: fd, put: true})
	}
	return backingName(b, err)
}

// backingName is backingFile's answer for the attribute's text b, read
// with err.
func backingName(b []byte, err error) (string, bool, error) {
	if err != nil || len(b) == 0 || b[0] == '\n' {
		return "", false, unbinding(err)
	}
	return sysfs.Value(b), true, nil
}

// backingFiles holds the descriptors backingFile keeps, one a device that
// a look (List, FindByBackingFile, Reuse) found bound, until a look finds
// the device unbound, bound anew or gone.
var backingFiles heldFiles

// heldFiles is a set of open attributes by device number, all in one
// directory.
//
// A look holds mu for reading from its start to its end, and reads fds
// freely meanwhile; what it finds to change it changes at its end, holding
// mu for writing. So no descriptor is ever closed while a look may read
// it, and a look costs the set two atomic operations, and a lock only when
// bindings have changed.
type heldFiles struct {
	mu  sync.RWMutex
	dir string      // the directory of the attributes
	fds map[int]int // descriptor by device number
}

// A heldLook is a look at heldFiles, in dir. fds does not change while the
// look holds the read lock.
type heldLook struct {
	fds map[int]int // nil if those held are in another directory
	dir string
}

// A heldChange is a descriptor that a look opened, to hold, or found of an
// earlier binding, to close.
type heldChange struct {
	n, fd int
	put   bool
}

// begin starts a look at the attributes in dir, if it is on sysfs (a fake
// tree in tests is not, and holds nothing); end ends it.
func (c *heldFiles) begin(dir blockDir) *heldLook {
	if !dir.sysfs {
		return nil
	}
	c.mu.RLock()
	look := &heldLook{dir: dir.path}
	if c.dir == dir.path {
		look.fds = c.fds
	}
	return look
}

// lookUp finds the descriptor held for device n, which the reader reads
// next.
func (sc *scratch) lookUp(n int) {
	sc.fd, sc.hasFD = -1, false
	if sc.look != nil {
		if sc.fd, sc.hasFD = sc.look.fds[n]; sc.hasFD {
			sc.found++
		}
	}
}

// drop asks the look's end to close the descriptor held for device n, the
// device being read.
func (sc *scratch) drop(n int) {
	if sc.hasFD {
		sc.changes = append(sc.changes, heldChange{n: n, fd: sc.fd})
		sc.hasFD = false
	}
}

// end ends look, which listed the devices nums (in order), making the
// changes its readers found: it closes descriptors of earlier bindings,
// of devices unbound and of devices not in nums (removed), and holds those
// opened, unless another look held one for the device first.
func (c *heldFiles) end(look *heldLook, nums []int, readers []*scratch) {
	if look == nil {
		return
	}
	found, changed := 0, look.fds == nil
	for i := range readers {
		found += readers[i].found
		changed = changed || len(readers[i].changes) > 0
	}
	removed := found < len(look.fds) // some held device not listed
	c.mu.RUnlock()
	if !changed && !removed {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.dir != look.dir {
		c.closeIf(func(int) bool { return true })
		c.dir = look.dir
	}
	if c.fds == nil {
		c.fds = make(map[int]int)
	}
	for i := range readers {
		for _, ch := range readers[i].changes {
			if !ch.put && c.fds[ch.n] == ch.fd {
				delete(c.fds, ch.n)
				closeFD(ch.fd)
			}
		}
	}
	for i := range readers {
		for _, ch := range readers[i].changes {
			if !ch.put {
				continue
			}
			if _, ok := c.fds[ch.n]; ok {
				closeFD(ch.fd)
			} else {
				c.fds[ch.n] = ch.fd
			}
		}
	}
	c.closeIf(func(n int) bool {
		_, listed := slices.BinarySearch(nums, n)
		return !listed
	})
}

// closeIf closes the descriptors of the devices n for which gone is true.
// The caller holds c.mu for writing.
func (c *heldFiles) closeIf(gone func(n int) bool) {
	for n, fd := range c.fds {
		if gone(n) {
			delete(c.fds, n)
			closeFD(fd)
		}
	}
}

// maxAddTries bounds addUnused: each EEXIST means another process took the
// number between the sysfs read and LOOP_CTL_ADD.
const maxAddTries = 64

// addUnused creates the lowest-numbered loop device that sysfs does not
// list: what LOOP_CTL_ADD -1 does on kernels that have it.
func (c *Control) addUnused() (int, error) {
	var err error
	for range maxAddTries {
		var nums []int
		if nums, err = loopNumbers(); err != nil {
			return -1, newError("add", sysfsRoot+"/block", err)
		}
		n := 0
		for _, m := range nums { // in order
			if m == n {
				n++
			}
		}
		if n > MaxNumber {
			return -1, newError("add", ControlPath, inStep("every device number is taken", syscall.ENOSPC))
		}
		var r int
		if r, err = c.ioctl("add", DevicePath(n), reqCtlAdd, uintptr(n)); !errors.Is(err, syscall.EEXIST) {
			return r, err
		}
	}
	return -1, err
}

// remove is Remove of a valid number: LOOP_CTL_REMOVE, tried again while
// the kernel refuses it for a device that is open but not bound.
func (c *Control) remove(n int) error {
	path := DevicePath(n)
	bound := false
	err := retryWhile(func() error {
		_, err := c.ioctl("remove", path, reqCtlRemove, uintptr(n))
		return err
	}, func(err error) bool {
		if !errors.Is(err, syscall.EBUSY) {
			return false
		}
		_, serr := os.Lstat(sysfsLoopAttr(n, ""))
		bound = serr == nil
		return !bound
	})
	if e, ok := err.(*Error); ok && e.Err == syscall.EBUSY {
		e.Err = errOpen
		if bound {
			e.Err = errBound
		}
	}
	return err
}

// Why LOOP_CTL_REMOVE answers EBUSY.
var (
	errBound error = &explained{text: "the device is bound: detach it, and let its last opener close it, first",
		errno: syscall.EBUSY, is: ErrBusy}
	errOpen error = &explained{text: "the device is open: udev probing it, or another process", errno: syscall.EBUSY, is: ErrBusy}
)

// loopNumbers returns the numbers of the loop devices sysfs lists, in order.
func loopNumbers() ([]int, error) {
	block := sysfsRoot + "/block"
	dir, err := openFD(block, unix.O_RDONLY|unix.O_DIRECTORY)
	if err != nil {
		return nil, err
	}
	defer closeFD(dir)
	nums, err := loopNumbersIn(dir)
	if err != nil {
		return nil, &os.PathError{Op: "readdirent", Path: block, Err: err}
	}
	return nums, nil
}

// loopNumbersIn returns the numbers of the loop devices listed in dir, an
// open sysfs directory of block devices, in order. It reads the
// linux_dirent64 records itself: unix.ParseDirent would make a string of
// every name.
func loopNumbersIn(dir int) ([]int, error) {
	var buf [8192]byte
	var nums []int
	for {
		n, err := unix.ReadDirent(dir, buf[:])
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return nil, err
		}
		if n <= 0 {
			break
		}
		// d_ino (8 bytes), d_off (8), d_reclen (2), d_type (1), d_name.
		const nameOff = 19
		for b := buf[:n]; len(b) > nameOff; {
			reclen := int(binary.NativeEndian.Uint16(b[16:18]))
			if reclen <= nameOff || reclen > len(b) {
				break
			}
			name := b[nameOff:reclen]
			if i := bytes.IndexByte(name, 0); i >= 0 {
				name = name[:i]
			}
			if m, ok := sysfs.LoopNumber(unsafe.String(unsafe.SliceData(name), len(name))); ok {
				nums = append(nums, m)
			}
			b = b[reclen:]
		}
	}
	slices.Sort(nums)
	return nums, nil
}

// sysfsLoopAttr returns the path of attribute attr of device n's loop/
// directory, or of the directory itself for "".
func sysfsLoopAttr(n int, attr string) string {
	if attr == "" {
		return sysfs.LoopDir(sysfsRoot, n) + "/loop"
	}
	return sysfs.LoopDir(sysfsRoot, n) + "/loop/" + attr
}

// sysfsStatus reads device n's binding from sysfs, relative to block (the
// devices' sysfs directory), into a Status, for a process that may not
// open the device. It reports false for an unbound device, and for one
// unbound or being torn down while it reads.
func sysfsStatus(block blockDir, n int, sc *scratch) (Status, bool, error) {
	file, ok, err := backingFile(block, n, sc)
	if !ok {
		return Status{}, false, err
	}
	name := "loop" + strconv.Itoa(n)
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
		b, err := sysfs.ReadFileAt(block.fd, block.path, name+a.attr, sc.attr[:])
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
			return Status{}, false, &os.PathError{Op: "parse", Path: block.path + "/" + name + a.attr, Err: err}
		}
	}
	s.Size, s.BlockSize = sectors*512, uint32(blockSize)
	// Kernels before 5.15 have no diskseq: 0.
	if b, err := sysfs.ReadFileAt(block.fd, block.path, name+"/diskseq", sc.attr[:]); err == nil {
		if s.DiskSeq, err = sysfs.Uint(b); err != nil {
			return Status{}, false, &os.PathError{Op: "parse", Path: block.path + "/" + name + "/diskseq", Err: err}
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
