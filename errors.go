package loopctl

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strconv"
	"strings"
	"syscall"
)

// Sentinel errors. Every error returned by this package that comes from the
// kernel or from input validation is an *Error; these values are reachable
// from it with errors.Is.
var (
	// ErrBusy matches EBUSY: the device is bound, open elsewhere, or was
	// taken by another process first.
	ErrBusy = errors.New("loop device busy")

	// ErrNotBound matches ENXIO: the device has no backing file.
	ErrNotBound = errors.New("loop device not bound")

	// ErrNotLoop reports a path that is not a whole loop block device.
	ErrNotLoop = errors.New("not a loop device")

	// ErrOverlap reports a device bound to a range of the same file that
	// overlaps the one asked for, with other settings: what Attach with
	// Options.Reuse refuses to add to. The error is an *OverlapError.
	ErrOverlap = errors.New("an overlapping loop device exists")

	// ErrChanged reports that a loop device is no longer the binding a
	// Status described: it was detached, or bound anew, since (see
	// OpenBinding).
	ErrChanged = errors.New("the device was detached or bound anew since")

	// ErrNoDirectIO reports that the kernel would not turn direct I/O on
	// for a backing file: its file system lacks O_DIRECT (tmpfs before
	// Linux 6.6), or the offset or block size is not aligned to the
	// blocks of the disk under it. It comes with EINVAL.
	ErrNoDirectIO = errors.New("direct I/O not possible for this backing file")
)

// A NodeMissingError reports a loop device, or a partition of one, that
// exists (sysfs lists it) while its node in /dev does not: a container
// whose /dev is a tmpfs rather than devtmpfs, where the kernel makes no
// nodes. It carries the numbers, so that a caller can make the node
// (MakeNode, or the error's own MakeNode) and try again, or bind with
// Options.MakeNode, which makes it. It comes within the open's *Error,
// matches fs.ErrNotExist, and unwraps to ENOENT.
type NodeMissingError struct {
	Number    int    // the loop device: N of /dev/loopN
	Partition int    // the partition's number; 0 for the device itself
	Path      string // the node that is missing
	Err       error  // the open's error
}

func (e *NodeMissingError) Error() string {
	what := "loop" + strconv.Itoa(e.Number)
	if e.Partition > 0 {
		what += "p" + strconv.Itoa(e.Partition)
	}
	return e.Err.Error() + ": " + what + " exists, but its node does not (/dev is not devtmpfs, as in a container): " +
		"Options.MakeNode or MakeNode makes it, or pass the node in"
}

func (e *NodeMissingError) Unwrap() error { return e.Err }

// MakeNode makes the missing node, as the function MakeNode, or
// Partition.MakeNode for a partition, does.
func (e *NodeMissingError) MakeNode() error {
	if e.Partition > 0 {
		return Partition{Number: e.Partition, Path: e.Path}.MakeNode()
	}
	return MakeNode(e.Number)
}

// An OverlapError names the device that holds a range of the file that
// overlaps the one Attach was asked for, bound otherwise, and says how. It
// matches ErrOverlap.
type OverlapError struct {
	Device  string // such as "/dev/loop3"
	Status  Status // its binding
	Differs string // how it differs from what was asked, such as "partscan off, asked on"
}

func (e *OverlapError) Error() string {
	end := "the end of the file"
	if e.Status.SizeLimit != 0 {
		end = "byte " + strconv.FormatUint(e.Status.Offset+e.Status.SizeLimit, 10)
	}
	s := e.Device + " binds the file from byte " + strconv.FormatUint(e.Status.Offset, 10) + " to " + end +
		" (" + e.Status.Flags.String() + ", " + strconv.FormatUint(uint64(e.Status.BlockSize), 10) + "-byte blocks)"
	if e.Differs != "" {
		s += ", otherwise than asked: " + e.Differs
	}
	return s + ": " + ErrOverlap.Error()
}

// Is reports whether target is ErrOverlap.
func (e *OverlapError) Is(target error) bool { return target == ErrOverlap }

// An Error reports which operation failed on which device, and why.
//
// Err is the cause: a syscall.Errno from the kernel, a wrapped fs.ErrInvalid
// for input refused before any ioctl (with the kernel's own errno where it
// would not be EINVAL: EOVERFLOW for an offset past 2^63-1), fs.ErrClosed,
// ErrNotLoop, or errors.ErrUnsupported. The errno stays reachable through
// errors.Is and errors.As, and errors.Is also maps it onto the portable
// sentinels:
//
//	EEXIST         fs.ErrExist
//	ENOENT, ENODEV fs.ErrNotExist
//	EPERM, EACCES  fs.ErrPermission
//	EINVAL         fs.ErrInvalid
//	EBUSY          ErrBusy
//	ENXIO          ErrNotBound
//	ENOTTY         errors.ErrUnsupported
type Error struct {
	Op   string // the operation, in lower-case words: the method's ("add", "set block size") or the kernel call's ("mknod")
	Path string // the device the operation was on, such as "/dev/loop3"
	Err  error  // the cause
}

func (e *Error) Error() string { return "loopctl: " + e.text() }

// text is the message without the package prefix, which a nested *Error
// (an Attach failing in a Configure) does not repeat.
func (e *Error) text() string {
	if e.Path == "" {
		return e.Op + ": " + errorText(e.Err)
	}
	return e.Op + " " + e.Path + ": " + errorText(e.Err)
}

// errorText is err's message, without the package prefix for an *Error.
func errorText(err error) string {
	if inner, ok := err.(*Error); ok {
		return inner.text()
	}
	if err == nil {
		return ""
	}
	return err.Error()
}

// Unwrap returns the cause.
func (e *Error) Unwrap() error { return e.Err }

// Is maps the kernel's errno onto the sentinels listed on Error. Mappings
// that syscall.Errno makes itself (EEXIST, ENOENT, EPERM, EACCES) are
// reached through Unwrap.
//
// A failure that lies with the backing file (its open, or a file that
// cannot back a loop device) is not mapped: its errno says nothing about a
// loop device, and ENXIO from opening a socket or an absent device is not
// ErrNotBound. Such an errno keeps only the mappings syscall.Errno makes,
// and EINVAL, ELOOP and ENAMETOOLONG, a path that cannot be used as
// given, match fs.ErrInvalid.
func (e *Error) Is(target error) bool {
	var errno syscall.Errno
	if !errors.As(e.Err, &errno) || ofBackingFile(e.Err) {
		return false
	}
	switch target {
	case ErrBusy:
		return errno == syscall.EBUSY
	case ErrNotBound:
		return errno == syscall.ENXIO
	case fs.ErrNotExist:
		return errno == syscall.ENODEV || errno == syscall.ENOENT
	case fs.ErrInvalid:
		return errno == syscall.EINVAL
	case errors.ErrUnsupported:
		return errno == syscall.ENOTTY
	}
	return false
}

// newError returns nil for a nil err, and otherwise an *Error for op on path.
func newError(op, path string, err error) error {
	if err == nil {
		return nil
	}
	return &Error{Op: op, Path: path, Err: explainLimits(err)}
}

// invalid returns a cause for input refused before any ioctl; it matches
// fs.ErrInvalid.
func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{fs.ErrInvalid}, args...)...)
}

// nodeOpenError is the error of an open of the node at path, an *Error
// ("open", the path opened, the open's errno) however the open failed, so
// that its errno maps onto the sentinels as any other call's does. It
// holds the *NodeMissingError of a device without its node.
func nodeOpenError(path string, err error) error {
	var pe *os.PathError
	var missing *NodeMissingError
	switch {
	case err == nil:
		return nil
	case errors.As(err, &missing):
		if errors.As(missing.Err, &pe) {
			missing.Err = pe.Err
		}
		return &Error{Op: "open", Path: missing.Path, Err: missing}
	case errors.As(err, &pe) && err == error(pe):
		return newError("open", pe.Path, pe.Err)
	}
	if _, ok := err.(*Error); ok {
		return err
	}
	return newError("open", path, err)
}

// checkNumber refuses a device number outside [lowest, MaxNumber] for
// op on path, before any call: path is the control device's for Add and
// Remove, and empty for an operation on the device, which has no node.
func checkNumber(op, path string, n, lowest int) error {
	if n < lowest || n > MaxNumber {
		return newError(op, path, invalid("device number %d is outside [%d, %d]", n, lowest, MaxNumber))
	}
	return nil
}

// errTornDown is why an open of a loop device fails with ENXIO: the kernel
// refuses new openers while it tears a device down, between LOOP_CLR_FD and
// the last close on Linux 6.11 and later, and while LOOP_CTL_REMOVE
// deletes it. It matches ErrNotBound and unwraps to the errno.
var errTornDown error = &explained{text: "device is being detached or removed", errno: syscall.ENXIO, is: ErrNotBound}

// errNoDirectIO is why a bind with FlagDirectIO, or SetDirectIO(true),
// failed: the kernel left direct I/O off.
var errNoDirectIO error = &explained{text: "the kernel would not turn direct I/O on: the backing file system lacks " +
	"O_DIRECT, or the offset or block size is not aligned to its disk's blocks", errno: syscall.EINVAL, is: ErrNoDirectIO}

// heldExclusively explains EBUSY from a change of d's binding (setting
// names it) that the kernel makes only while nobody holds the device
// exclusively: it names the holders where the kernel says (a file system
// mounted on it, a device stacked on it).
func (d *Device) heldExclusively(err error, setting string) error {
	if err != syscall.EBUSY {
		return err
	}
	by := "mounted, or open with O_EXCL"
	if held := d.sys.holdersOf(d.number, 0); len(held) > 0 {
		by = strings.Join(held, ", ")
	}
	return &explained{text: "the device is held exclusively (" + by + "), and the kernel changes its " +
		setting + " only while nobody does: set it in Options at Attach", errno: syscall.EBUSY, is: ErrBusy}
}

// An explained error is an errno with what it means in its place.
type explained struct {
	text  string
	errno syscall.Errno
	is    error // the sentinel it matches, if any
}

func (e *explained) Error() string        { return e.text + " (" + e.errno.Error() + ")" }
func (e *explained) Unwrap() error        { return e.errno }
func (e *explained) Is(target error) bool { return e.is != nil && target == e.is }

// A stepError names the ioctl that failed inside a multi-step operation.
// It wraps the errno, so errors.Is sees through it.
type stepError struct {
	step string
	err  error
}

func (e *stepError) Error() string { return e.step + ": " + e.err.Error() }
func (e *stepError) Unwrap() error { return e.err }

func inStep(step string, err error) error { return &stepError{step: step, err: err} }

// A fileError is a failure that lies with the backing file rather than a
// loop device: Error.Is does not map its errno onto the loop device's
// sentinels.
type fileError struct{ err error }

func (e *fileError) Error() string { return e.err.Error() }
func (e *fileError) Unwrap() error { return e.err }

// Is matches fs.ErrInvalid for a path that cannot be used as given.
func (e *fileError) Is(target error) bool {
	var errno syscall.Errno
	if target != fs.ErrInvalid || !errors.As(e.err, &errno) {
		return false
	}
	return errno == syscall.EINVAL || errno == syscall.ELOOP || errno == syscall.ENAMETOOLONG
}

// ofBackingFile tells whether err is the backing file's.
func ofBackingFile(err error) bool {
	var fe *fileError
	return errors.As(err, &fe)
}
