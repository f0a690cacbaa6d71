package sysfs

import (
	"bytes"
	"encoding/binary"
	"os"
	"slices"
	"strconv"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/call"
)

// BufSize is large enough for any sysfs attribute: the kernel formats each
// into one page.
const BufSize = 4096

// ReadFile reads the attribute at path into buf with open, read and close,
// and no other syscall: sysfs hands over an attribute whole in one read. It
// returns the bytes read; an error is an *os.PathError, matching
// fs.ErrNotExist when the attribute is gone (as loop/ is once a device is
// unbound).
func ReadFile(path string, buf []byte) ([]byte, error) {
	return ReadFileAt(unix.AT_FDCWD, "", path, buf)
}

// ReadFileAt is ReadFile for the attribute name relative to the directory
// open as dir, whose path is dirPath (for errors only; "" when name is a
// path of its own). Opening relative to a directory the caller holds
// spares the kernel the walk from the root for each attribute.
func ReadFileAt(dir int, dirPath, name string, buf []byte) ([]byte, error) {
	if strings.IndexByte(name, 0) >= 0 {
		return nil, &os.PathError{Op: "open", Path: join(dirPath, name), Err: unix.EINVAL}
	}
	b := make([]byte, len(name)+1) // with its NUL
	copy(b, name)
	return ReadAttrAt(dir, dirPath, b, buf)
}

// ReadAttrAt is ReadFileAt for a name given as bytes ending in a NUL, which
// it hands to the kernel as they are: it allocates nothing but the error.
// The other readers come here.
func ReadAttrAt(dir int, dirPath string, name []byte, buf []byte) ([]byte, error) {
	fd, err := OpenAttrAt(dir, dirPath, name)
	if err != nil {
		return nil, err
	}
	defer unix.Close(fd)
	return Reread(fd, dirPath, name, buf)
}

// OpenAttrAt opens the attribute name (bytes ending in a NUL) relative to
// the directory open as dir, read-only and close-on-exec, for Reread. An
// error is an *os.PathError.
func OpenAttrAt(dir int, dirPath string, name []byte) (int, error) {
	fd, ok, err := OpenAttrIfAt(dir, dirPath, name)
	if err == nil && !ok {
		err = &os.PathError{Op: "open", Path: join(dirPath, string(name[:len(name)-1])), Err: unix.ENOENT}
	}
	return fd, err
}

// OpenAttrIfAt is OpenAttrAt of an attribute that may be missing: it
// reports false, with a nil error and no allocation, when it is (ENOENT),
// for a caller that looks at many.
func OpenAttrIfAt(dir int, dirPath string, name []byte) (int, bool, error) {
	if len(name) == 0 || name[len(name)-1] != 0 {
		return -1, false, &os.PathError{Op: "open", Path: join(dirPath, string(name)), Err: unix.EINVAL}
	}
	fd, errno := call.OpenAt(dir, &name[0], unix.O_RDONLY)
	switch errno {
	case 0:
		return fd, true, nil
	case unix.ENOENT:
		return -1, false, nil
	}
	return -1, false, &os.PathError{Op: "open", Path: join(dirPath, string(name[:len(name)-1])), Err: errno}
}

// Reread reads the attribute open as fd from its start into buf: sysfs
// formats an attribute anew for each read at offset 0, so a descriptor
// held open reads its current value each time, and one of an attribute
// since removed (a loop/ directory of a device since unbound, even if bound
// again) fails with ENODEV. dirPath and name (as for OpenAttrAt) name the
// attribute in an error, an *os.PathError.
func Reread(fd int, dirPath string, name []byte, buf []byte) ([]byte, error) {
	n, err := call.RetryN(func() (int, error) { return unix.Pread(fd, buf, 0) })
	if err != nil {
		return nil, &os.PathError{Op: "read", Path: join(dirPath, string(name[:len(name)-1])), Err: err}
	}
	return buf[:n], nil
}

func join(dir, name string) string {
	if dir == "" {
		return name
	}
	return dir + "/" + name
}

// ExistsAt reports whether name (bytes ending in a NUL) exists relative to
// the directory open as dir, with one faccessat and no descriptor: false,
// and no error or allocation, when it does not (ENOENT). dirPath names the
// directory in an error, an *os.PathError.
//
// inMemory says that dir is on sysfs: see call.AccessAt.
func ExistsAt(dir int, dirPath string, name []byte, inMemory bool) (bool, error) {
	if len(name) == 0 || name[len(name)-1] != 0 {
		return false, &os.PathError{Op: "access", Path: join(dirPath, string(name)), Err: unix.EINVAL}
	}
	switch errno := call.AccessAt(dir, &name[0], inMemory); errno {
	case 0:
		return true, nil
	case unix.ENOENT:
		return false, nil
	default:
		return false, &os.PathError{Op: "access", Path: join(dirPath, string(name[:len(name)-1])), Err: errno}
	}
}

// PartitionName returns the name of partition m of loop device n, such as
// "loop3p12": its node in /dev, and its directory in the device's.
func PartitionName(n, m int) string {
	return "loop" + strconv.Itoa(n) + "p" + strconv.Itoa(m)
}

// Partitions returns the numbers of the partitions of loop device n, in
// order, from its sysfs directory dir (LoopDir): the one way partitions
// are listed. An error is an *os.PathError, matching fs.ErrNotExist when
// the device is gone.
func Partitions(dir string, n int) ([]int, error) {
	parts, _, err := DiskDir(dir, n)
	return parts, err
}

// DiskDir is Partitions, and also counts the other directories in dir
// that every loop disk has, whether bound or not (queue, holders, power:
// all but loop/, which comes with a binding). A directory's link count on
// sysfs is two more than its subdirectories, so a disk whose count is
// two more than others has no partition and no binding (Links).
func DiskDir(dir string, n int) (parts []int, others int, err error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, 0, err
	}
	for _, e := range ents {
		if m, ok := PartitionNumber(e.Name(), n); ok {
			parts = append(parts, m)
		} else if e.IsDir() && e.Name() != "loop" {
			others++
		}
	}
	slices.Sort(parts)
	return parts, others, nil
}

// DiskLinks returns the link count of root/block/loopN, the sysfs
// directory of loop device n: two more than its subdirectories (see
// DiskDir). It allocates nothing but an error's, an *os.PathError, for a
// root of the usual length.
func DiskLinks(root string, n int) (uint64, error) {
	var buf [128]byte
	p := append(buf[:0], root...)
	p = strconv.AppendInt(append(p, "/block/loop"...), int64(n), 10)
	p = append(p, 0)
	if bytes.IndexByte(p[:len(p)-1], 0) >= 0 {
		return 0, &os.PathError{Op: "statx", Path: LoopDir(root, n), Err: unix.EINVAL}
	}
	links, errno := call.LinksAt(unix.AT_FDCWD, &p[0])
	if errno != 0 {
		return 0, &os.PathError{Op: "statx", Path: LoopDir(root, n), Err: errno}
	}
	return uint64(links), nil
}

// LoopNumbers returns the numbers of the loop devices listed in
// root/block, in order: the one way the module lists them. An error is an
// *os.PathError.
func LoopNumbers(root string) ([]int, error) {
	block := root + "/block"
	p, err := unix.BytePtrFromString(block)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: block, Err: err}
	}
	dir, errno := call.OpenAt(unix.AT_FDCWD, p, unix.O_RDONLY|unix.O_DIRECTORY)
	if errno != 0 {
		return nil, &os.PathError{Op: "open", Path: block, Err: errno}
	}
	defer unix.Close(dir)
	nums, err := LoopNumbersIn(dir)
	if err != nil {
		return nil, &os.PathError{Op: "getdents64", Path: block, Err: err}
	}
	return nums, nil
}

// LoopNumbersIn returns the numbers of the loop devices listed in dir, an
// open sysfs directory of block devices, in order. It reads the
// linux_dirent64 records itself: unix.ParseDirent would make a string of
// every name. Its buffer takes about 1,300 records a read: sysfs finds
// its place in the directory again at each.
func LoopNumbersIn(dir int) ([]int, error) {
	buf := make([]byte, 32<<10)
	var nums []int
	for {
		n, err := call.RetryN(func() (int, error) { return unix.ReadDirent(dir, buf) })
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
			if m, ok := LoopNumber(unsafe.String(unsafe.SliceData(name), len(name))); ok {
				nums = append(nums, m)
			}
			b = b[reclen:]
		}
	}
	slices.Sort(nums)
	return nums, nil
}
