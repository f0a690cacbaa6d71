//go:build !loopctl_stub

package loopctl

import (
	"errors"
	"io/fs"
	"os"
	"slices"
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
	return list(&backingFileID{dev: uint64(st.Dev), ino: uint64(st.Ino)})
}

// A backingFileID is a file's device and inode.
type backingFileID struct{ dev, ino uint64 }

// list returns the bound devices, only those of the file id if it is not
// nil.
func list(id *backingFileID) ([]Status, error) {
	nums, err := loopNumbers()
	if err != nil {
		return nil, newError("list", sysfsRoot+"/block", err)
	}
	var buf [sysfs.BufSize]byte
	var out []Status
	for _, n := range nums {
		s, ok, err := readStatus(n, id, buf[:])
		if err != nil {
			return nil, newError("list", DevicePath(n), err)
		}
		if ok {
			out = append(out, s)
		}
	}
	return out, nil
}

// readStatus reads device n's Status, reporting false when it is not bound
// (to the file id, if not nil), from the device if this process may open
// it, else from sysfs. buf is scratch space for sysfs reads.
func readStatus(n int, id *backingFileID, buf []byte) (Status, bool, error) {
	h, err := sys.open(DevicePath(n), probe)
	if errors.Is(err, syscall.ENXIO) {
		return Status{}, false, nil // being torn down
	}
	if err != nil {
		s, ok, err := sysfsStatus(n, buf)
		return s, ok && (id == nil || *id == backingFileID{s.BackingDevice, s.BackingInode}), err
	}
	defer h.Close()
	var info unix.LoopInfo64
	if err := ioctlPtr(h, reqGetStatus64, unsafe.Pointer(&info)); err != nil {
		if errors.Is(err, syscall.ENXIO) {
			return Status{}, false, nil // unbound
		}
		return Status{}, false, inStep("LOOP_GET_STATUS64", err)
	}
	if id != nil && *id != (backingFileID{info.Device, info.Inode}) {
		return Status{}, false, nil
	}
	s := statusFromInfo(&info)
	if err := readSizes(h, &s); err != nil {
		return Status{}, false, err
	}
	b, err := sysfs.ReadFile(sysfsLoopAttr(n, "backing_file"), buf)
	if err != nil || len(b) == 0 || b[0] == '\n' {
		// Unbound since, or its teardown has let go of the file already.
		return Status{}, false, unbinding(err)
	}
	s.BackingFile = sysfs.Value(b)
	return s, true, nil
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

// loopNumbers returns the numbers of the loop devices sysfs lists, in order.
func loopNumbers() ([]int, error) {
	f, err := os.Open(sysfsRoot + "/block")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	names, err := f.Readdirnames(-1)
	if err != nil {
		return nil, err
	}
	var nums []int
	for _, name := range names {
		if n, ok := sysfs.LoopNumber(name); ok {
			nums = append(nums, n)
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

// sysfsStatus reads device n's binding from sysfs into a Status, for a
// process that may not open the device. It reports false for an unbound
// device, and for one unbound or being torn down while it reads.
func sysfsStatus(n int, buf []byte) (Status, bool, error) {
	b, err := sysfs.ReadFile(sysfsLoopAttr(n, "backing_file"), buf)
	if err != nil || len(b) == 0 || b[0] == '\n' {
		// An empty name: the kernel has let go of the file already.
		return Status{}, false, unbinding(err)
	}
	s := Status{Number: n, BackingFile: sysfs.Value(b)}
	var sectors, blockSize uint64
	dir := sysfs.LoopDir(sysfsRoot, n)
	for _, a := range [...]struct {
		path string
		u    *uint64
		flag Flags
	}{
		{sysfsLoopAttr(n, "offset"), &s.Offset, 0},
		{sysfsLoopAttr(n, "sizelimit"), &s.SizeLimit, 0},
		{sysfsLoopAttr(n, "autoclear"), nil, FlagAutoClear},
		{sysfsLoopAttr(n, "partscan"), nil, FlagPartScan},
		{sysfsLoopAttr(n, "dio"), nil, FlagDirectIO},
		{dir + "/ro", nil, FlagReadOnly},
		{dir + "/size", &sectors, 0},
		{dir + "/queue/logical_block_size", &blockSize, 0},
	} {
		b, err := sysfs.ReadFile(a.path, buf)
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
			return Status{}, false, &os.PathError{Op: "parse", Path: a.path, Err: err}
		}
	}
	s.Size, s.BlockSize = sectors*512, uint32(blockSize)
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
