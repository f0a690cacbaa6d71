//go:build !loopctl_stub

package loopctl

import (
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/sysfs"
)

// Partitions returns the device's partitions, by number, from sysfs
// (/sys/block/loopN/loopNpM/start and size). The kernel reads the partition
// table when the device is bound with FlagPartScan, and again on Rescan;
// partitions added with BLKPG (addpart) are listed too. A device without
// any has none, and no error. The kernel makes the partitions' nodes on
// devtmpfs as it finds them; udev, where it runs, names them after
// (/dev/disk/by-label/...), for which WaitUdev waits.
func (d *Device) Partitions() ([]Partition, error) {
	const op = "partitions"
	if _, err := d.handle(op); err != nil {
		return nil, err
	}
	dir := sysfs.LoopDir(sysfsRoot, d.number)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, newError(op, d.path, err)
	}
	var parts []Partition
	var buf [sysfs.BufSize]byte
	for _, e := range ents {
		m, ok := sysfs.PartitionNumber(e.Name(), d.number)
		if !ok {
			continue
		}
		p, ok, err := readPartition(dir+"/"+e.Name(), m, buf[:])
		if err != nil {
			return nil, newError(op, d.path, err)
		}
		if ok {
			parts = append(parts, p)
		}
	}
	slices.SortFunc(parts, func(a, b Partition) int { return a.Number - b.Number })
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
// invalid, before it is asked. A partition in use (mounted, open
// exclusively) makes the kernel refuse with an error matching ErrBusy.
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
	return newError(op, d.path, err)
}

// MakeNode creates the block device node of loop device n, /dev/loopN, if
// it is missing, from the device number sysfs gives (/sys/block/loopN/dev),
// with mode 0660. It is for a container whose /dev is not devtmpfs: nothing
// in this package creates a node by itself. A node of that device already
// there is left as it is; anything else at the path is an error matching
// fs.ErrExist.
func MakeNode(n int) error {
	path := DevicePath(n)
	if n < 0 || n > MaxNumber {
		return newError("make node", path, invalid("device number %d is outside [0, %d]", n, MaxNumber))
	}
	return makeNode(path, sysfs.LoopDir(sysfsRoot, n)+"/dev")
}

// MakeNode creates the partition's block device node, p.Path, if it is
// missing, as the function MakeNode does for a device.
func (p Partition) MakeNode() error {
	name := filepath.Base(p.Path)
	disk, _, ok := strings.Cut(strings.TrimPrefix(name, "loop"), "p")
	n, err := strconv.Atoi(disk)
	if m, ok2 := sysfs.PartitionNumber(name, n); !ok || err != nil || !ok2 || m != p.Number || p.Path != "/dev/"+name {
		return newError("make node", p.Path, invalid("%s is not the node of partition %d of a loop device", p.Path, p.Number))
	}
	return makeNode(p.Path, sysfs.LoopDir(sysfsRoot, n)+"/"+name+"/dev")
}

// makeNode makes path a block device node of the device number in the
// sysfs attribute devAttr, unless it is one already.
func makeNode(path, devAttr string) error {
	const op = "make node"
	var buf [sysfs.BufSize]byte
	b, err := sysfs.ReadFile(devAttr, buf[:])
	if err != nil {
		return newError(op, path, err)
	}
	major, minor, err := sysfs.Dev(b)
	if err != nil {
		return newError(op, path, &os.PathError{Op: "parse", Path: devAttr, Err: err})
	}
	rdev := unix.Mkdev(major, minor)
	for range 2 { // once more if another process made it meanwhile
		var st unix.Stat_t
		err := ignoringEINTR(func() error { return unix.Lstat(path, &st) })
		switch {
		case err == nil && st.Mode&unix.S_IFMT == unix.S_IFBLK && uint64(st.Rdev) == rdev:
			return nil
		case err == nil:
			return newError(op, path, &os.PathError{Op: "mknod", Path: path,
				Err: inStep("something else is there, not block device "+sysfs.Value(b), unix.EEXIST)})
		case err != unix.ENOENT:
			return newError(op, path, &os.PathError{Op: "lstat", Path: path, Err: err})
		}
		err = unix.Mknod(path, unix.S_IFBLK|0o660, int(rdev))
		if err == unix.EEXIST {
			continue
		}
		if err == nil {
			err = unix.Chmod(path, 0o660) // past the umask
		}
		if err != nil {
			return newError(op, path, &os.PathError{Op: "mknod", Path: path, Err: err})
		}
		return nil
	}
	return newError(op, path, &os.PathError{Op: "mknod", Path: path, Err: unix.EEXIST})
}
