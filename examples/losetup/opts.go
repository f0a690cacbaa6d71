//go:build linux

package main

import (
	"fmt"
	"strings"
)

// The argument kinds of an option, as getopt_long has them.
const (
	noArg = iota
	requiredArg
	optionalArg
)

// Option identifiers: the short letter where there is one.
const (
	optSizeLimit = 256 + iota
	optShow
	optRaw
	optDirectIO
	optOutputAll
	optAdd
	optRemove
	optGetFree
	optLoopRef
)

type option struct {
	long string
	id   int // the short letter, or an opt constant
	arg  int
}

// options are util-linux 2.38's, in its order (which its messages about
// ambiguous abbreviations follow), 2.40's --loop-ref, and then this
// tool's own.
var options = []option{
	{"all", 'a', noArg},
	{"set-capacity", 'c', requiredArg},
	{"detach", 'd', requiredArg},
	{"detach-all", 'D', noArg},
	{"find", 'f', noArg},
	{"nooverlap", 'L', noArg},
	{"help", 'h', noArg},
	{"associated", 'j', requiredArg},
	{"json", 'J', noArg},
	{"list", 'l', noArg},
	{"sector-size", 'b', requiredArg},
	{"noheadings", 'n', noArg},
	{"offset", 'o', requiredArg},
	{"output", 'O', requiredArg},
	{"output-all", optOutputAll, noArg},
	{"sizelimit", optSizeLimit, requiredArg},
	{"partscan", 'P', noArg},
	{"read-only", 'r', noArg},
	{"direct-io", optDirectIO, optionalArg},
	{"raw", optRaw, noArg},
	{"show", optShow, noArg},
	{"verbose", 'v', noArg},
	{"version", 'V', noArg},
	{"loop-ref", optLoopRef, requiredArg}, // util-linux 2.40's
	{"add", optAdd, requiredArg},
	{"remove", optRemove, requiredArg},
	{"get-free", optGetFree, noArg},
}

// shortOptions are the letters and whether they take an argument.
const shortOptions = "ab:c:d:Dfhj:JlLno:O:PrvV"

// exclusive are the groups of options util-linux allows one of.
var exclusive = [][]int{
	{'D', 'a', 'c', 'd', 'f', 'j'},
	{'D', 'c', 'd', 'f', 'l'},
	{'D', 'c', 'd', 'f', 'O'},
	{'J', optRaw},
}

// A parsed option: its identifier and argument.
type parsed struct {
	id     int
	arg    string
	hasArg bool
}

// A usageError is a mistake in the command line: glibc's getopt words it,
// and util-linux adds where to find help.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

// getopt parses args (args[0] is the program name) as GNU getopt_long
// does: options and operands in any order, "--" ending the options, long
// options abbreviated to any unique prefix, short options clustered. It
// calls opt for each option in order, which may stop the parse with an
// error, and returns the operands.
func getopt(args []string, opt func(parsed) error) ([]string, error) {
	prog := args[0]
	var operands []string
	for i := 1; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "--":
			return append(operands, args[i+1:]...), nil
		case strings.HasPrefix(a, "--"):
			p, next, err := longOption(prog, a, args[i+1:])
			if err != nil {
				return nil, err
			}
			i += next
			if err := opt(p); err != nil {
				return nil, err
			}
		case len(a) > 1 && a[0] == '-':
			for j := 1; j < len(a); j++ {
				c := a[j]
				k := strings.IndexByte(shortOptions, c)
				if k < 0 || c == ':' {
					return nil, &usageError{fmt.Sprintf("%s: invalid option -- '%c'", prog, c)}
				}
				p := parsed{id: int(c)}
				if k+1 < len(shortOptions) && shortOptions[k+1] == ':' {
					switch {
					case j+1 < len(a):
						p.arg = a[j+1:]
					case i+1 < len(args):
						i++
						p.arg = args[i]
					default:
						return nil, &usageError{fmt.Sprintf("%s: option requires an argument -- '%c'", prog, c)}
					}
					p.hasArg, j = true, len(a)
				}
				if err := opt(p); err != nil {
					return nil, err
				}
			}
		default:
			operands = append(operands, a)
		}
	}
	return operands, nil
}

// longOption parses the long option a, taking its argument from rest if
// need be; next is how many of rest it took.
func longOption(prog, a string, rest []string) (p parsed, next int, err error) {
	name, value, hasValue := strings.Cut(a[2:], "=")
	var match *option
	var candidates []string
	for i := range options {
		o := &options[i]
		if o.long == name {
			match, candidates = o, nil
			break
		}
		if strings.HasPrefix(o.long, name) {
			if match == nil {
				match = o
			}
			candidates = append(candidates, "'--"+o.long+"'")
		}
	}
	switch {
	case match == nil:
		return p, 0, &usageError{fmt.Sprintf("%s: unrecognized option '%s'", prog, a)}
	case len(candidates) > 1:
		return p, 0, &usageError{fmt.Sprintf("%s: option '--%s' is ambiguous; possibilities: %s",
			prog, name, strings.Join(candidates, " "))}
	}
	p.id = match.id
	switch match.arg {
	case noArg:
		if hasValue {
			return p, 0, &usageError{fmt.Sprintf("%s: option '--%s' doesn't allow an argument", prog, match.long)}
		}
	case requiredArg:
		switch {
		case hasValue:
			p.arg, p.hasArg = value, true
		case len(rest) > 0:
			p.arg, p.hasArg, next = rest[0], true, 1
		default:
			return p, 0, &usageError{fmt.Sprintf("%s: option '--%s' requires an argument", prog, match.long)}
		}
	case optionalArg:
		p.arg, p.hasArg = value, hasValue
	}
	return p, next, nil
}

// exclusiveCheck remembers, per group, the first option of it seen, and
// fails at a second, different one, as util-linux's err_exclusive_options.
type exclusiveCheck struct{ seen []int }

func (x *exclusiveCheck) check(prog string, id int) error {
	for g, group := range exclusive {
		in := false
		for _, o := range group {
			in = in || o == id
		}
		if !in {
			continue
		}
		switch x.seen[g] {
		case 0:
			x.seen[g] = id
		case id:
		default:
			var b strings.Builder
			fmt.Fprintf(&b, "%s: mutually exclusive arguments:", prog)
			for _, o := range group {
				b.WriteString(" " + optionName(o))
			}
			return &fatal{msg: b.String()}
		}
	}
	return nil
}

// optionName names an option as util-linux's messages do: --long.
func optionName(id int) string {
	for _, o := range options {
		if o.id == id {
			return "--" + o.long
		}
	}
	return fmt.Sprintf("-%c", id)
}
