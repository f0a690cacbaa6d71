package loopctl

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/loopctl/loopctl/internal/call"
	"github.com/loopctl/loopctl/internal/sysfs"
	"github.com/loopctl/loopctl/internal/userns"
	"golang.org/x/sys/unix"
)

func (s *system) makeNode(n int) error {
	if err := checkNumber("make node", "", n, 0); err != nil {
		return err
	}
	return makeNode(DevicePath(n), sysfs.LoopDir(s.sysfs, n)+"/dev")
}

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
