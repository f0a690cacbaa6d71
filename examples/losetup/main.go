//go:build linux

// Command losetup is util-linux's losetup(8), version 2.38, rebuilt on the
// loopctl package: the same options, the same output to the byte (--list,
// --json, --raw, --noheadings and the classic one-line format), the same
// messages and exit codes. It also does what util-linux does not: --add N,
// --remove N and --get-free, the /dev/loop-control operations.
//
//	go build -o losetup ./examples/losetup && ./losetup --list
//
// It lists devices in the order sysfs gives them, as util-linux does. It
// differs only on a terminal narrower than a table, where util-linux
// re-wraps the lines to fit and this prints them whole.
package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"unicode"
	"unicode/utf8"

	"github.com/loopctl/loopctl"
)

// version names this tool, not util-linux.
const version = "losetup (loopctl example) 1.0, compatible with util-linux losetup 2.38"

func main() {
	// Standard output is buffered, as C's stdio buffers it: a line a
	// write would cost a listing of thousands of devices a system call
	// a line.
	stdout := bufio.NewWriterSize(os.Stdout, 64<<10)
	code := run(os.Args, stdout, os.Stderr)
	if err := stdout.Flush(); err != nil && code == 0 {
		fmt.Fprintf(os.Stderr, "%s: write error: %v\n", filepath.Base(os.Args[0]), err)
		code = 1
	}
	os.Exit(code)
}

// A fatal error ends the program with a message already worded.
type fatal struct{ msg string }

func (e *fatal) Error() string { return e.msg }

// The actions, as util-linux has them.
type action int

const (
	actNone action = iota
	actCreate
	actDelete
	actDeleteAll
	actShow
	actShowOne
	actFindFree
	actSetCapacity
	actSetDirectIO
	actSetBlockSize
	actAdd
	actRemove
	actGetFree
)

// A config is what the command line asks for.
type config struct {
	prog      string // for util-linux's messages: the short name
	act       action
	device    string   // -c, -d, show one, create on a given device
	devices   []string // -d's further devices
	file      string   // create; -j
	offset    uint64
	sizeLimit uint64
	blockSize uint64
	flags     loopctl.Flags // read-only, partscan, direct I/O
	hasOffset bool
	hasLimit  bool
	setDIO    bool
	useDIO    bool
	setBlock  bool
	showDev   bool
	list      bool
	json      bool
	raw       bool
	noHead    bool
	noOverlap bool
	columns   []int
	outputArg string
	hasOutput bool   // -O given, even empty
	number    string // --add, --remove
	ref       string // --loop-ref
	args      int    // len(argv)
}

// run is the program, with its output streams: it returns the exit status.
func run(argv []string, stdout, stderr io.Writer) int {
	c := &config{prog: filepath.Base(argv[0]), args: len(argv)}
	o := &out{w: stdout, errw: stderr, prog: c.prog, utf8: utf8Locale()}
	err := c.parse(argv, stdout)
	var ue *usageError
	var fe *fatal
	switch {
	case errors.As(err, &ue):
		fmt.Fprintf(stderr, "%s\nTry '%s --help' for more information.\n", ue.msg, c.prog)
		return 1
	case errors.As(err, &fe):
		if fe.msg != "" {
			fmt.Fprintln(stderr, fe.msg)
		}
		return 1
	case errors.Is(err, errDone):
		return 0
	case err != nil:
		fmt.Fprintf(stderr, "%s: %v\n", c.prog, err)
		return 1
	}
	if c.act == actNone {
		return 0
	}
	if c.do(o) != 0 {
		return 1
	}
	return 0
}

// errDone ends a run that has done all it was asked (--help, --version).
var errDone = errors.New("done")

// parse reads the command line as util-linux 2.38 does, in the same order,
// so that the same mistake gets the same message.
func (c *config) parse(argv []string, stdout io.Writer) error {
	x := &exclusiveCheck{seen: make([]int, len(exclusive))}
	operands, err := getopt(argv, func(p parsed) error {
		if err := x.check(c.prog, p.id); err != nil {
			return err
		}
		return c.option(p, stdout)
	})
	if err != nil {
		return err
	}
	return c.decide(operands)
}

// option takes one option, as util-linux's getopt loop does.
func (c *config) option(p parsed, stdout io.Writer) error {
	var err error
	switch p.id {
	case 'a':
		c.act = actShow
	case 'b':
		c.setBlock = true
		c.blockSize, err = c.size(p.arg, "failed to parse logical block size")
	case 'c':
		c.act = actSetCapacity
		c.device, err = c.loopDevice(p.arg, true)
	case 'r':
		c.flags |= loopctl.FlagReadOnly
	case 'd':
		c.act = actDelete
		c.device, err = c.loopDevice(p.arg, true)
	case 'D':
		c.act = actDeleteAll
	case 'f':
		c.act = actFindFree
	case 'J':
		c.json = true
	case 'j':
		c.act, c.file = actShow, p.arg
	case 'l':
		c.list = true
	case 'L':
		c.noOverlap = true
	case 'n':
		c.noHead = true
	case optRaw:
		c.raw = true
	case 'o':
		c.hasOffset = true
		c.offset, err = c.size(p.arg, "failed to parse offset")
	case 'O':
		c.outputArg, c.hasOutput, c.list = p.arg, true, true
	case optOutputAll:
		// util-linux 2.38's columns: 2.40's REF is asked for by name.
		c.columns = c.columns[:0]
		for i := range columns {
			if i != colRef {
				c.columns = append(c.columns, i)
			}
		}
	case 'P':
		c.flags |= loopctl.FlagPartScan
	case optShow:
		c.showDev = true
	case optDirectIO:
		c.setDIO, c.useDIO = true, true
		if p.hasArg {
			switch p.arg {
			case "on":
			case "off":
				c.useDIO = false
			default:
				return &fatal{fmt.Sprintf("%s: argument error: '%s'", c.prog, p.arg)}
			}
		}
		if c.useDIO {
			c.flags |= loopctl.FlagDirectIO
		}
	case 'v':
	case optSizeLimit:
		c.hasLimit = true
		c.sizeLimit, err = c.size(p.arg, "failed to parse size")
	case 'h':
		usage(stdout)
		return errDone
	case 'V':
		fmt.Fprintln(stdout, version)
		return errDone
	case optAdd, optRemove:
		c.act, c.number = map[int]action{optAdd: actAdd, optRemove: actRemove}[p.id], p.arg
	case optGetFree:
		c.act = actGetFree
	case optLoopRef:
		c.ref = p.arg
	}
	return err
}

// size parses a size argument, or fails as util-linux's strtosize_or_err.
func (c *config) size(s, what string) (uint64, error) {
	v, err := parseSize(s)
	if err != nil {
		return 0, &fatal{fmt.Sprintf("%s: %s: '%s': %s", c.prog, what, s, errnoText(err))}
	}
	return v, nil
}

// loopDevice checks that path is a loop device, as util-linux does of the
// devices -c, -d and the one to show name.
func (c *config) loopDevice(path string, exit bool) (string, error) {
	d, err := loopctl.OpenDevicePath(path)
	if err != nil {
		msg := fmt.Sprintf("%s: %s: failed to use device: %s", c.prog, path, errnoText(syscall.ENODEV))
		if exit {
			return "", &fatal{msg}
		}
		return "", errors.New(msg)
	}
	d.Close()
	return path, nil
}

// decide works out the action from what the options left, as util-linux
// 2.38 does after its getopt loop.
func (c *config) decide(operands []string) error {
	if c.args == 1 {
		c.act, c.list = actShow, true
	}
	if c.act == actNone && c.args == 2 && (c.raw || c.json) {
		c.act, c.list = actShow, true
	}
	if c.list && len(c.columns) == 0 {
		c.columns = append(c.columns, defaultColumns...)
	}
	if c.act == actFindFree && len(operands) > 0 {
		c.act, c.file, operands = actCreate, operands[0], operands[1:]
		if len(operands) > 0 {
			return &fatal{c.prog + ": unexpected arguments"}
		}
	}
	if c.list && c.act == actNone && len(operands) == 0 {
		c.act = actShow
	}
	if c.act == actNone && len(operands) == 1 {
		switch {
		case c.setDIO:
			c.act = actSetDirectIO
			c.flags &^= loopctl.FlagDirectIO
		case c.setBlock:
			c.act = actSetBlockSize
		default:
			c.act = actShowOne
		}
		var err error
		if c.device, err = c.loopDevice(operands[0], true); err != nil {
			return err
		}
		operands = operands[1:]
	}
	if c.act == actNone {
		c.act = actCreate
		if len(operands) == 0 {
			return &fatal{c.prog + ": no loop device specified"}
		}
		c.device = operands[0]
		if !strings.HasPrefix(c.device, "/") {
			c.device = "/dev/" + c.device // the device need not exist yet
		}
		if len(operands) == 1 {
			return &fatal{c.prog + ": no file specified"}
		}
		c.file, operands = operands[1], operands[2:]
	}
	if c.act == actDelete {
		c.devices = operands
	}
	if c.act != actCreate && (c.sizeLimit != 0 || c.flags != 0 || c.showDev) {
		return &fatal{c.prog + ": the options --{sizelimit,partscan,read-only,show} are allowed during loop device setup only"}
	}
	if c.hasOffset && c.act != actCreate && (c.act != actShow || c.file == "") {
		return &fatal{c.prog + ": the option --offset is not allowed in this context"}
	}
	if c.hasOutput {
		return c.parseColumns()
	}
	return nil
}

// parseColumns reads -O's list, as util-linux's string_add_to_idarray: a
// list that starts with "+" adds to the columns, any other replaces them.
// An empty name fails without a word, as there.
func (c *config) parseColumns() error {
	list := c.outputArg
	if strings.HasPrefix(list, "+") {
		list = list[1:]
	} else {
		c.columns = c.columns[:0]
	}
	if list == "" {
		return &fatal{}
	}
	start := 0
	for i := 0; i < len(list); i++ {
		end := -1
		if list[i] == ',' {
			end = i
		}
		if i+1 == len(list) {
			end = i + 1
		}
		if end < 0 {
			continue
		}
		if end <= start {
			return &fatal{}
		}
		id := columnID(list[start:end])
		if id < 0 {
			return &fatal{fmt.Sprintf("%s: unknown column: %s", c.prog, list[start:end])}
		}
		c.columns = append(c.columns, id)
		start = i + 1
	}
	return nil
}

// errnoText is the C library's text for the errno in err, as util-linux's
// warn() prints it: "No such device or address".
func errnoText(err error) string {
	var errno syscall.Errno
	switch {
	case errors.As(err, &errno):
	case errors.Is(err, fs.ErrInvalid):
		errno = syscall.EINVAL // refused by loopctl, as the kernel would
	default:
		return err.Error()
	}
	s := errno.Error()
	r, n := utf8.DecodeRuneInString(s)
	return string(unicode.ToUpper(r)) + s[n:]
}

// utf8Locale tells whether the C library would run in a UTF-8 locale, as
// LC_ALL, LC_CTYPE and LANG say in that order.
func utf8Locale() bool {
	for _, v := range []string{"LC_ALL", "LC_CTYPE", "LANG"} {
		if s := os.Getenv(v); s != "" {
			s = strings.ToLower(s)
			return strings.Contains(s, "utf-8") || strings.Contains(s, "utf8")
		}
	}
	return false
}

func usage(w io.Writer) {
	fmt.Fprint(w, `
Usage:
 losetup [options] [<loopdev>]
 losetup [options] -f | <loopdev> <file>

Set up and control loop devices, with the loopctl Go package.

Options:
 -a, --all                     list all used devices
 -d, --detach <loopdev>...     detach one or more devices
 -D, --detach-all              detach all used devices
 -f, --find                    find first unused device
 -c, --set-capacity <loopdev>  resize the device
 -j, --associated <file>       list all devices associated with <file>
 -L, --nooverlap               avoid possible conflict between devices

 -o, --offset <num>            start at offset <num> into file
     --sizelimit <num>         device is limited to <num> bytes of the file
 -b, --sector-size <num>       set the logical sector size to <num>
 -P, --partscan                create a partitioned loop device
 -r, --read-only               set up a read-only loop device
     --direct-io[=<on|off>]    open backing file with O_DIRECT
     --show                    print device name after setup (with -f)
     --loop-ref <string>       loop device reference
 -v, --verbose                 verbose mode

 -J, --json                    use JSON --list output format
 -l, --list                    list info about all or specified (default)
 -n, --noheadings              don't print headings for --list output
 -O, --output <cols>           specify columns to output for --list
     --output-all              output all columns
     --raw                     use raw --list output format

 /dev/loop-control, which util-linux does not offer:
     --add <num>|any           create loop device <num>, or any number
     --remove <num>            remove loop device <num>
     --get-free                print the device LOOP_CTL_GET_FREE names

 -h, --help                    display this help
 -V, --version                 display version

Available output columns:
`)
	for _, col := range columns {
		fmt.Fprintf(w, " %12s  %s\n", col.name, col.help)
	}
	fmt.Fprint(w, "\nFor more details see losetup(8).\n")
}
