package loopctl

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/sysfs"
)

// readPartition reads partition m from its sysfs directory dir. It reports
// false for a partition removed while it reads.
func readPartition(dir string, m int, buf []byte) (Partition, bool, error) {
	p := Partition{Number: m, Path: "/dev/" + filepath.Base(dir)}
	for _, a := range [...]struct {
		name string
		v    *uint64
	}{{"start", &p.Start}, {"size", &p.Size}} {
		path := dir + "/" + a.name
		b, err := sysfs.ReadFile(path, buf)
		if err != nil {
			return Partition{}, false, unbinding(err)
		}
		sectors, err := sysfs.Uint(b)
		if err != nil {
			return Partition{}, false, &os.PathError{Op: "parse", Path: path, Err: err}
		}
		*a.v = sectors * 512
	}
	return p, true, nil
}

// errRescanNeedsAdmin explains EACCES from BLKRRPART.
var errRescanNeedsAdmin error = explain("reading a partition table again (BLKRRPART) needs CAP_SYS_ADMIN, "+
	"whatever the device's mode: a partition table written by a user in the disk group is read at the next binding", unix.EACCES, nil)

// scanRefused explains EBUSY from BLKRRPART of device n: a partition is
// in use, or the disk is held exclusively (a file system on it).
func (s *system) scanRefused(n int) error {
	if held := s.holdersOf(n, 0); len(held) > 0 {
		return explain("in use: "+strings.Join(held, ", "), unix.EBUSY, ErrBusy)
	}
	parts, err := sysfs.Partitions(sysfs.LoopDir(s.sysfs, n), n)
	if err != nil || len(parts) == 0 {
		return unix.EBUSY
	}
	return s.partitionsInUse(n, parts)
}

// reqBLKPG is BLKPG, _IO(0x12, 105), which x/sys does not define: made
// from BLKRRPART, _IO(0x12, 95), so that it has the architecture's
// encoding of _IO (another on powerpc and mips).
const reqBLKPG = unix.BLKRRPART + 105 - 95

// stalePartitions returns the numbers of the partitions that device n,
// about to be bound, keeps from an earlier binding, on a kernel that
// leaves them (without featDropsHandPartitions); none on another. A
// device's sysfs directory links two more than its subdirectories, so
// once a listing has shown what every loop disk has (sysfs.DiskDir), one
// stat tells a disk with nothing more (no partition, no binding) without
// a listing. A device gone from sysfs has none: its bind will fail.
func (s *system) stalePartitions(n int) ([]int, error) {
	if s.has(featDropsHandPartitions) {
		return nil, nil
	}
	if clean := s.cleanDiskLinks.Load(); clean != 0 {
		links, err := sysfs.DiskLinks(s.sysfs, n)
		if err != nil || links == clean {
			return nil, ignoreGone(err)
		}
	}
	parts, others, err := sysfs.DiskDir(sysfs.LoopDir(s.sysfs, n), n)
	if err != nil {
		return nil, ignoreGone(err)
	}
	if len(parts) == 0 {
		s.cleanDiskLinks.Store(uint64(others) + 2)
	}
	return parts, nil
}

// ignoreGone is err, or nil where it says that what was looked for is
// gone.
func ignoreGone(err error) error {
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	return err
}

// dropPartitions deletes partitions parts (stalePartitions) of device n,
// open as h, before it is bound, as systemd does: the kernel's table of
// the next binding would otherwise show them, over another image. The
// caller holds the device's exclusive lock, so that no process that
// follows the protocol binds it meanwhile; a device bound all the same
// is EBUSY, and its partitions are left alone. A partition in use (open,
// mounted) cannot be deleted: an error matching ErrBusy that names it
// and what holds it. Deleting needs CAP_SYS_ADMIN: without it an error
// matching fs.ErrPermission that names the partitions.
func (s *system) dropPartitions(h handle, n int, parts []int) error {
	var info unix.LoopInfo64
	switch err := ioctlPtr(h, reqGetStatus64, unsafe.Pointer(&info)); err {
	case unix.ENXIO: // unbound, as it should be
	case nil:
		return unix.EBUSY // bound since it was named free
	default:
		return inStep("LOOP_GET_STATUS64", err)
	}
	for _, m := range parts {
		p := unix.BlkpgPartition{Pno: int32(m)}
		arg := unix.BlkpgIoctlArg{Op: unix.BLKPG_DEL_PARTITION, Datalen: int32(unsafe.Sizeof(p)), Data: (*byte)(unsafe.Pointer(&p))}
		err := ioctlPtr(h, reqBLKPG, unsafe.Pointer(&arg))
		switch err {
		case nil, unix.ENXIO: // deleted, or gone meanwhile
		case unix.EBUSY:
			return s.partitionsInUse(n, []int{m})
		case unix.EACCES, unix.EPERM:
			return explain("the device keeps partitions of an earlier binding ("+strings.Join(partitionPaths(n, parts), ", ")+
				"), which would show over the new one, and deleting them (BLKPG) needs CAP_SYS_ADMIN", err.(unix.Errno), nil)
		default:
			return inStep("BLKPG_DEL_PARTITION "+sysfs.PartitionName(n, m), err)
		}
	}
	return nil
}

// partitionsInUse is the error for partitions parts of device n, one of
// which the kernel found in use (open, mounted) when it was asked to
// delete them or to read the table again: EBUSY, matching ErrBusy,
// naming what holds them where the kernel says (holdersOf), and
// otherwise the partitions, one of which a process has open.
func (s *system) partitionsInUse(n int, parts []int) error {
	var held []string
	for _, m := range parts {
		held = append(held, s.holdersOf(n, m)...)
	}
	text := "partition " + strings.Join(partitionPaths(n, parts), " or ") + " is in use"
	if len(held) > 0 {
		text += ": " + strings.Join(held, ", ")
	} else {
		text += " (open by a process, or mounted in another mount namespace)"
	}
	return explain(text, unix.EBUSY, ErrBusy)
}

// partitionPaths returns the nodes of partitions parts of device n.
func partitionPaths(n int, parts []int) []string {
	paths := make([]string, len(parts))
	for i, m := range parts {
		paths[i] = "/dev/" + sysfs.PartitionName(n, m)
	}
	return paths
}

// partitions is Partitions.
func (d *Device) partitions() ([]Partition, error) {
	const op = "partitions"
	if _, err := d.handle(op); err != nil {
		return nil, err
	}
	dir := sysfs.LoopDir(d.sys.sysfs, d.number)
	nums, err := sysfs.Partitions(dir, d.number)
	if err != nil {
		return nil, newError(op, d.path, err)
	}
	var parts []Partition
	var buf [sysfs.BufSize]byte
	for _, m := range nums {
		p, ok, err := readPartition(dir+"/"+sysfs.PartitionName(d.number, m), m, buf[:])
		if err != nil {
			return nil, newError(op, d.path, err)
		}
		if ok {
			parts = append(parts, p)
		}
	}
	return parts, nil
}

// rescan is Rescan.
func (d *Device) rescan() error {
	const op = "rescan"
	h, err := d.handle(op)
	if err != nil {
		return err
	}
	var info unix.LoopInfo64
	if err := d.status(op, h, &info); err != nil {
		return err
	}
	if info.Flags&unix.LO_FLAGS_PARTSCAN == 0 {
		return newError(op, d.path, invalid("the device scans no partitions: bind it with FlagPartScan, or set it with SetStatus"))
	}
	_, err = ioctl(h, unix.BLKRRPART, 0)
	switch err {
	case unix.EBUSY:
		err = d.sys.scanRefused(d.number)
	case unix.EACCES:
		err = errRescanNeedsAdmin
	}
	return newError(op, d.path, err)
}
