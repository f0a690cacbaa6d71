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

// List returns the status of every bound loop device, by number. It reads
// sysfs (/sys/block/loopN/loop/), so it is fast with hundreds of devices
// and needs no privilege. BackingFile is the full path; a backing file
// unlinked since binding reads with a " (deleted)" suffix (see
// Status.Deleted). BackingDevice and BackingInode come from a stat of that
// path, or, when it is deleted or out of reach, from the device itself
// (LOOP_GET_STATUS64, which needs root; without it they stay zero).
//
// A device unbound while List reads it is left out, and so is one being
// detached: sysfs shows it bound until the kernel's teardown ends, so List
// opens each device with FlagAutoClear for a moment, which only root may
// (see Device.ClearFD; without root such a device is listed as bound). A
// close of List's can then be the last one, which runs the detach that the
// device's owner asked for.
func List() ([]Status, error) {
	nums, err := loopNumbers()
	if err != nil {
		return nil, newError("list", sysfsRoot+"/block", err)
	}
	var buf [sysfs.BufSize]byte
	var out []Status
	for _, n := range nums {
		s, ok, err := sysfsStatus(n, buf[:])
		if err != nil {
			return nil, newError("list", DevicePath(n), err)
		}
		if ok {
			out = append(out, s)
		}
	}
	return out, nil
}

// FindByBackingFile returns the status of every bound loop device whose
// backing file is the file at path: the same device and inode, whatever
// name it was bound by (a hard link, a renamed file, a relative path).
func FindByBackingFile(path string) ([]Status, error) {
	st, err := stat(path)
	if err != nil {
		return nil, newError("find", path, &os.PathError{Op: "stat", Path: path, Err: err})
	}
	all, err := List()
	if err != nil {
		return nil, err
	}
	return slices.DeleteFunc(all, func(s Status) bool {
		return s.BackingDevice != uint64(st.Dev) || s.BackingInode != uint64(st.Ino)
	}), nil
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

// sysfsStatus reads device n's binding from sysfs into a Status. It reports
// false for an unbound device, and for one unbound or being torn down while
// it reads.
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
	if s.Flags&FlagAutoClear != 0 && tornDown(n) {
		return Status{}, false, nil
	}
	s.BackingDevice, s.BackingInode = backingID(s)
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

// tornDown tells whether bound device n, which has FlagAutoClear, is being
// detached: sysfs shows such a device as bound until its teardown ends, and
// only its open tells, failing with ENXIO. LOOP_CLR_FD sets FlagAutoClear
// before it starts a teardown, so devices without it need no look. Opening
// needs root; without it the device is taken as bound.
func tornDown(n int) bool {
	h, err := sys.open(DevicePath(n), probe)
	if err != nil {
		return errors.Is(err, syscall.ENXIO)
	}
	h.Close()
	return false
}

// backingID returns the device and inode of s's backing file: from a stat
// of its path, or from LOOP_GET_STATUS64 when the path is deleted or gone.
func backingID(s Status) (dev, ino uint64) {
	if !s.Deleted() {
		if st, err := stat(s.BackingFile); err == nil {
			return uint64(st.Dev), uint64(st.Ino)
		}
	}
	h, err := sys.open(DevicePath(s.Number), readOnly)
	if err != nil {
		return 0, 0
	}
	defer h.Close()
	var info unix.LoopInfo64
	if ioctlPtr(h, reqGetStatus64, unsafe.Pointer(&info)) != nil {
		return 0, 0
	}
	return info.Device, info.Inode
}
