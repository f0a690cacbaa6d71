//go:build !loopctl_stub

package loopctl

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/call"

	"github.com/loopctl/loopctl/internal/sysfs"
	"github.com/loopctl/loopctl/internal/userns"
)

// Partitions returns the device's partitions, by number, from sysfs
// (/sys/block/loopN/loopNpM/start and size): those the kernel found in the
// partition table of a device bound with FlagPartScan (Rescan reads it
// again), and those added with BLKPG (addpart, partx --add). A device
// without any has none, and no error.
//
// A binding the package made (Attach, AttachFile, Configure, SetFD) shows
// no partition of an earlier binding, and with FlagPartScan the kernel
// read its table once: each partition was added once, and is there, its
// node made on devtmpfs, when the call returns (see "Partitions" in the
// package documentation). udev, where it runs, names the partitions after
// (/dev/disk/by-label/...), for which uevent.WaitUdev waits.
func (d *Device) Partitions() ([]Partition, error) {
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

// Rescan makes the kernel read the device's partition table again
// (BLKRRPART), after the caller wrote a new one. The kernel reads it only
// for a device bound with FlagPartScan: Rescan of another is refused, as
// invalid, before it is asked. The kernel reads no table while a
// partition is in use (mounted, open): an error matching ErrBusy that
// names it, and what holds it where the kernel says. It needs
// CAP_SYS_ADMIN: without it an error matching fs.ErrPermission.
func (d *Device) Rescan() error {
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
// leaves them (without featDropsHandPartitions); none on another. A device's sysfs
// directory links two more than its subdirectories, so once a listing
// has shown what every loop disk has (sysfs.DiskDir), one stat tells a
// disk with nothing more (no partition, no binding) without a listing.
// A device gone from sysfs has none: its bind will fail.
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
			names := make([]string, len(parts))
			for i, m := range parts {
				names[i] = "/dev/" + sysfs.PartitionName(n, m)
			}
			return explain("the device keeps partitions of an earlier binding ("+strings.Join(names, ", ")+
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
	var names, held []string
	for _, m := range parts {
		names = append(names, "/dev/"+sysfs.PartitionName(n, m))
		held = append(held, s.holdersOf(n, m)...)
	}
	text := "partition " + strings.Join(names, " or ") + " is in use"
	if len(held) > 0 {
		text += ": " + strings.Join(held, ", ")
	} else {
		text += " (open by a process, or mounted in another mount namespace)"
	}
	return explain(text, unix.EBUSY, ErrBusy)
}

// MakeNode creates the block device node of loop device n, /dev/loopN, if
// it is missing, from the device number sysfs gives (/sys/block/loopN/dev),
// with mode 0660. It is for a container whose /dev is not devtmpfs: nothing
// in this package creates a node by itself. A node of that device already
// there is left as it is; anything else at the path is an error matching
// fs.ErrExist.
func MakeNode(n int) error { return host.makeNode(n) }

func (s *system) makeNode(n int) error {
	if err := checkNumber("make node", "", n, 0); err != nil {
		return err
	}
	return makeNode(DevicePath(n), sysfs.LoopDir(s.sysfs, n)+"/dev")
}

// MakeNode creates the partition's block device node, p.Path, if it is
// missing, as the function MakeNode does for a device.
func (p Partition) MakeNode() error { return host.makePartitionNode(p) }

func (s *system) makePartitionNode(p Partition) error {
	name := filepath.Base(p.Path)
	disk, _, ok := strings.Cut(strings.TrimPrefix(name, "loop"), "p")
	n, err := strconv.Atoi(disk)
	if m, ok2 := sysfs.PartitionNumber(name, n); !ok || err != nil || !ok2 || m != p.Number || p.Path != "/dev/"+name {
		return newError("make node", p.Path, invalid("%s is not the node of partition %d of a loop device", p.Path, p.Number))
	}
	return makeNode(p.Path, sysfs.LoopDir(s.sysfs, n)+"/"+name+"/dev")
}

// makeNode makes path a block device node of the device number in the
// sysfs attribute devAttr, unless it is one already.
func makeNode(path, devAttr string) error {
	_, _, err := makeNodeOf(path, devAttr)
	return err
}

// makeNodeOf is makeNode, reporting also the device number and whether it
// made the node (rather than found it).
func makeNodeOf(path, devAttr string) (rdev uint64, made bool, err error) {
	const op = "make node"
	var buf [sysfs.BufSize]byte
	b, err := sysfs.ReadFile(devAttr, buf[:])
	if err != nil {
		return 0, false, newError(op, path, err)
	}
	major, minor, err := sysfs.Dev(b)
	if err != nil {
		return 0, false, newError(op, path, &os.PathError{Op: "parse", Path: devAttr, Err: err})
	}
	rdev = unix.Mkdev(major, minor)
	for range 2 { // once more if another process made it meanwhile
		var st unix.Stat_t
		err := call.Retry(func() error { return unix.Lstat(path, &st) })
		switch {
		case err == nil && st.Mode&unix.S_IFMT == unix.S_IFBLK && uint64(st.Rdev) == rdev:
			return rdev, false, nil
		case err == nil:
			return rdev, false, newError(op, path, &os.PathError{Op: "mknod", Path: path,
				Err: inStep("something else is there, not block device "+sysfs.Value(b), unix.EEXIST)})
		case err != unix.ENOENT:
			return rdev, false, newError(op, path, &os.PathError{Op: "lstat", Path: path, Err: err})
		}
		err = unix.Mknod(path, unix.S_IFBLK|0o660, int(rdev))
		if err == unix.EEXIST {
			continue
		}
		if err != nil {
			return rdev, false, newError(op, path, &os.PathError{Op: "mknod", Path: path, Err: explainMknod(err, rdev)})
		}
		if err := unix.Chmod(path, 0o660); err != nil { // past the umask
			return rdev, true, newError(op, path, &os.PathError{Op: "chmod", Path: path, Err: err})
		}
		return rdev, true, nil
	}
	return rdev, false, newError(op, path, &os.PathError{Op: "mknod", Path: path, Err: unix.EEXIST})
}

// explainMknod explains EPERM from mknod of block device rdev: the
// process is in a user namespace, where no device node can be made, or
// lacks CAP_MKNOD, or a device cgroup (a container's device rules)
// refuses that device.
func explainMknod(err error, rdev uint64) error {
	if err != unix.EPERM {
		return err
	}
	var text string
	switch {
	case userns.Inside():
		text = "this process is in a user namespace, where the kernel makes no device nodes: pass the node into the container"
	case !effectiveCap(unix.CAP_MKNOD):
		text = "this process lacks CAP_MKNOD: give it to the container, or pass the node in"
	default:
		text = fmt.Sprintf("a device cgroup (the container's device rules) refuses to make block device %d:%d: allow %s, or pass the node in",
			unix.Major(rdev), unix.Minor(rdev), deviceRule(rdev, "m"))
	}
	return explain(text, unix.EPERM, nil)
}

// explainNodeOpen explains why a node just made could not be opened, in
// the open's *Error (or *os.PathError): EPERM is a device cgroup refusing
// the device, EACCES a /dev that takes no device nodes (mounted nodev, or
// by a user namespace).
func explainNodeOpen(err error, rdev uint64) error {
	var errp *error
	var e *Error
	var pe *os.PathError
	switch {
	case errors.As(err, &e):
		errp = &e.Err
	case errors.As(err, &pe):
		errp = &pe.Err
	default:
		return err
	}
	switch *errp {
	case unix.EPERM:
		*errp = explain(fmt.Sprintf("made the node, but a device cgroup "+
			"(the container's device rules) refuses block device %d:%d: allow %s",
			unix.Major(rdev), unix.Minor(rdev), deviceRule(rdev, "rw")), unix.EPERM, nil)
	case unix.EACCES:
		*errp = explain("made the node, but its file system takes no device "+
			"nodes (mounted nodev, or by a user namespace)", unix.EACCES, nil)
	}
	return err
}

// deviceRule is the device rule a container needs for the loop devices of
// rdev's major, with access: for loop devices themselves, the rule for
// their partitions too (on the extended major, 259, unless max_part is
// set).
func deviceRule(rdev uint64, access string) string {
	rule := fmt.Sprintf("%q", fmt.Sprintf("b %d:* %s", unix.Major(rdev), access))
	if unix.Major(rdev) == loopMajor {
		rule += fmt.Sprintf(" (and %q for partitions)", "b 259:* "+access)
	}
	return rule
}

// effectiveCap tells whether capability c is in the process's effective
// set.
func effectiveCap(c int) bool {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return true // cannot tell: let the other cause be named
	}
	return data[c/32].Effective&(1<<(c%32)) != 0
}

// missingNode returns err, from opening device n, as a *NodeMissingError
// when it is ENOENT while sysfs lists the device.
func (s *system) missingNode(n int, err error) error {
	var pe *os.PathError
	if !errors.As(err, &pe) || pe.Err != unix.ENOENT {
		return err
	}
	if _, serr := os.Lstat(sysfs.LoopDir(s.sysfs, n)); serr != nil {
		return err
	}
	return &NodeMissingError{Number: n, Path: pe.Path, Err: pe.Err}
}

// removeNode removes path if it is still the block device node of rdev
// that makeNodeOf made.
func removeNode(path string, rdev uint64) {
	var st unix.Stat_t
	if unix.Lstat(path, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFBLK && uint64(st.Rdev) == rdev {
		unix.Unlink(path)
	}
}
