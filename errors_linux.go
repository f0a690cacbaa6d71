package loopctl

import (
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// explainLimits returns err with an EMFILE or ENFILE in it, from an open
// or a socket, explained: which limit ran out, and the process's own
// limit. The errno stays reachable with errors.Is; the rest of err, an
// *os.PathError naming the file, a step, the backing file's failure, is
// kept around it.
func explainLimits(err error) error {
	switch e := err.(type) {
	case unix.Errno:
		switch e {
		case unix.EMFILE:
			text := "this process has no file descriptor left"
			var lim unix.Rlimit
			if unix.Getrlimit(unix.RLIMIT_NOFILE, &lim) == nil {
				text += " (its limit, RLIMIT_NOFILE, is " + strconv.FormatUint(lim.Cur, 10) + ")"
			}
			return explain(text, e, nil)
		case unix.ENFILE:
			return explain("the machine has no file left to open (its limit is fs.file-max)", e, nil)
		}
	case *os.PathError:
		if x := explainLimits(e.Err); x != e.Err {
			return &os.PathError{Op: e.Op, Path: e.Path, Err: x}
		}
	case *os.SyscallError:
		if x := explainLimits(e.Err); x != e.Err {
			return &os.SyscallError{Syscall: e.Syscall, Err: x}
		}
	case *cause:
		if len(e.errs) == 1 && !e.paren {
			if x := explainLimits(e.errs[0]); x != e.errs[0] {
				c := *e
				c.errs = []error{x}
				return &c
			}
		}
	}
	return err
}

// fileErr marks err as the backing file's: its errno matches no sentinel
// about loop devices.
func fileErr(err error) error { return &cause{errs: []error{err}, file: true} }
