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
// ([MakeNode], or [Partition.MakeNode] for a partition) and try again, or
// bind with [Options.MakeNode], which makes it. It comes within the open's
// [*Error], matches [fs.ErrNotExist], and unwraps to ENOENT.
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

// An OverlapError names the device that holds a range of the file that
// overlaps the one [Attach] was asked for, bound otherwise, and says how. It
// matches [ErrOverlap].
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

// Is reports whether target is [ErrOverlap].
func (e *OverlapError) Is(target error) bool { return target == ErrOverlap }

// An Error reports which operation failed on which device, and why. Err is
// the cause: the kernel's errno, [fs.ErrInvalid] for input refused before
// any call, [fs.ErrClosed], [ErrNotLoop] or [errors.ErrUnsupported]. The
// errno stays reachable (errors.Is, errors.As), and errors.Is maps it onto
// the sentinels:
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
// [ErrNotBound]. Such an errno keeps only the mappings syscall.Errno makes,
// and EINVAL, ELOOP and ENAMETOOLONG, a path that cannot be used as
// given, match [fs.ErrInvalid].
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
var errTornDown error = explain("device is being detached or removed", syscall.ENXIO, ErrNotBound)

// errNoDirectIO is why a bind with FlagDirectIO, or SetDirectIO(true),
// failed: the kernel left direct I/O off.
var errNoDirectIO error = explain("the kernel would not turn direct I/O on: the backing file system lacks "+
	"O_DIRECT, or the offset or block size is not aligned to its disk's blocks", syscall.EINVAL, ErrNoDirectIO)

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
	return explain("the device is held exclusively ("+by+"), and the kernel changes its "+
		setting+" only while nobody does: set it in Options at Attach", syscall.EBUSY, ErrBusy)
}

// A cause is why an operation failed, as an *Error holds it in Err: the
// kernel's errno, a context's error or an earlier failure, with what the
// package knows of it. It is the one form of the package's own causes.
type cause struct {
	step  string  // the call or step that failed ("LOOP_SET_STATUS64"): the message starts "step: "
	text  string  // what the failure means; "" for the first wrapped error's own message
	paren bool    // the message ends with the first wrapped error's, in parentheses
	errs  []error // what it wraps: an errno, a context's error, a step's failure
	is    error   // the sentinel it matches besides those errs match (ErrBusy, ErrChanged)
	file  bool    // the backing file's failure: no loop-device sentinel is matched (Error.Is)
}

func (c *cause) Error() string {
	s := c.text
	switch {
	case s == "" && len(c.errs) > 0:
		s = errorText(c.errs[0])
	case c.paren && len(c.errs) > 0:
		s += " (" + c.errs[0].Error() + ")"
	}
	if c.step != "" {
		s = c.step + ": " + s
	}
	return s
}

func (c *cause) Unwrap() []error { return c.errs }

// Is matches the cause's sentinel; for the backing file's failure, the
// marker ofBackingFile looks for, and [fs.ErrInvalid] for a path that cannot
// be used as given (EINVAL, ELOOP, ENAMETOOLONG).
func (c *cause) Is(target error) bool {
	switch {
	case c.is != nil && target == c.is:
		return true
	case !c.file:
		return false
	case target == errOfFile:
		return true
	case target == fs.ErrInvalid:
		var errno syscall.Errno
		return len(c.errs) > 0 && errors.As(c.errs[0], &errno) &&
			(errno == syscall.EINVAL || errno == syscall.ELOOP || errno == syscall.ENAMETOOLONG)
	}
	return false
}

// explain is errno with what it means in its place, matching sentinel is
// (nil for none) beside the errno.
func explain(text string, errno syscall.Errno, is error) *cause {
	return &cause{text: text, paren: true, errs: []error{errno}, is: is}
}

// inStep names the call or step of a multi-step operation that failed
// with err, which errors.Is sees through.
func inStep(step string, err error) error { return &cause{step: step, errs: []error{err}} }

// errOfFile is the marker of the backing file's failures.
var errOfFile = errors.New("the backing file's failure")

// ofBackingFile tells whether err is the backing file's.
func ofBackingFile(err error) bool { return errors.Is(err, errOfFile) }
