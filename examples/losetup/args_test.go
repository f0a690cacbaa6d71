//go:build linux

package main

import (
	"bytes"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/loopctl/loopctl"
)

// TestGetopt checks the GNU getopt_long rules the tool follows: permuted
// operands, "--", clustered short options, attached and separate
// arguments, unique prefixes of long options, and glibc's messages.
func TestGetopt(t *testing.T) {
	name := func(id int) string {
		if id < 256 {
			return string(rune(id))
		}
		return optionName(id)
	}
	for _, tt := range []struct {
		args []string
		want string // the options, "|", the operands; or the error
	}{
		{nil, "|"},
		{[]string{"-a"}, "a|"},
		{[]string{"file", "-f", "dev"}, "f|file dev"},
		{[]string{"-fr", "x"}, "f r|x"},
		{[]string{"-o512", "-o", "1K", "-ro2"}, "o=512 o=1K r o=2|"},
		{[]string{"--", "-a", "--list"}, "|-a --list"},
		{[]string{"-", "-a"}, "a|-"},
		{[]string{"--off=5", "--offset", "6", "--sizel", "7"}, "o=5 o=6 --sizelimit=7|"},
		{[]string{"--direct-io", "--direct-io=off", "--direct-io=", "on"}, "--direct-io --direct-io=off --direct-io=|on"},
		{[]string{"--list", "--li"}, "l l|"},
		{[]string{"--output-all", "--output", "NAME"}, "--output-all O=NAME|"},
		{[]string{"--add", "3", "--get"}, "--add=3 --get-free|"},
		{[]string{"-x"}, "losetup: invalid option -- 'x'"},
		{[]string{"-:"}, "losetup: invalid option -- ':'"},
		{[]string{"-ao"}, "losetup: option requires an argument -- 'o'"},
		{[]string{"--bogus"}, "losetup: unrecognized option '--bogus'"},
		{[]string{"--bogus=1"}, "losetup: unrecognized option '--bogus=1'"},
		{[]string{"--s"}, "losetup: option '--s' is ambiguous; possibilities: '--set-capacity' '--sector-size' '--sizelimit' '--show'"},
		{[]string{"--d"}, "losetup: option '--d' is ambiguous; possibilities: '--detach' '--detach-all' '--direct-io'"},
		{[]string{"--detach"}, "losetup: option '--detach' requires an argument"},
		{[]string{"--all=x"}, "losetup: option '--all' doesn't allow an argument"},
		{[]string{"--output"}, "losetup: option '--output' requires an argument"},
	} {
		var got []string
		operands, err := getopt(append([]string{"losetup"}, tt.args...), func(p parsed) error {
			s := name(p.id)
			if p.hasArg {
				s += "=" + p.arg
			}
			got = append(got, s)
			return nil
		})
		result := strings.Join(got, " ") + "|" + strings.Join(operands, " ")
		if err != nil {
			result = err.Error()
		}
		if result != tt.want {
			t.Errorf("getopt %q = %q, want %q", tt.args, result, tt.want)
		}
	}
}

// TestRunErrors checks the mistakes found before any device is touched:
// util-linux's words, on stderr, and exit status 1. (The integration tests
// compare these and more with the real losetup.)
func TestRunErrors(t *testing.T) {
	try := "Try 'losetup --help' for more information.\n"
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"-x"}, "/usr/sbin/losetup: invalid option -- 'x'\n" + try}, // glibc's getopt names argv[0]
		{[]string{"--bogus"}, "/usr/sbin/losetup: unrecognized option '--bogus'\n" + try},
		{[]string{"-a", "-D"}, "losetup: mutually exclusive arguments: --detach-all --all --set-capacity --detach --find --associated\n"},
		{[]string{"-J", "--raw"}, "losetup: mutually exclusive arguments: --json --raw\n"},
		{[]string{"-l", "-D"}, "losetup: mutually exclusive arguments: --detach-all --set-capacity --detach --find --list\n"},
		{[]string{"-o", "1x", "-f", "file"}, "losetup: failed to parse offset: '1x': Invalid argument\n"},
		{[]string{"--sizelimit", "1Q", "-f", "file"}, "losetup: failed to parse size: '1Q': Invalid argument\n"},
		{[]string{"-b", "99999999999999999999", "-f", "f"}, "losetup: failed to parse logical block size: '99999999999999999999': Numerical result out of range\n"},
		{[]string{"-l", "-O", "FOO"}, "losetup: unknown column: FOO\n"},
		{[]string{"-l", "-O", "NAME,,RO"}, ""},
		{[]string{"-l", "-O", ""}, ""},
		{[]string{"--direct-io=maybe"}, "losetup: argument error: 'maybe'\n"},
		{[]string{"-n"}, "losetup: no loop device specified\n"},
		{[]string{"-r"}, "losetup: no loop device specified\n"},
		{[]string{"-f", "a", "b"}, "losetup: unexpected arguments\n"},
		{[]string{"--sizelimit", "10", "-l"}, "losetup: the options --{sizelimit,partscan,read-only,show} are allowed during loop device setup only\n"},
		{[]string{"--show", "-a"}, "losetup: the options --{sizelimit,partscan,read-only,show} are allowed during loop device setup only\n"},
		{[]string{"-o", "10", "-a"}, "losetup: the option --offset is not allowed in this context\n"},
		{[]string{"/nonexistent/loop"}, "losetup: /nonexistent/loop: failed to use device: No such device\n"},
		{[]string{"-d", "/nonexistent/loop"}, "losetup: /nonexistent/loop: failed to use device: No such device\n"},
	} {
		var stdout, stderr bytes.Buffer
		code := run(append([]string{"/usr/sbin/losetup"}, tt.args...), &stdout, &stderr)
		if code != 1 || stdout.Len() != 0 || stderr.String() != tt.want {
			t.Errorf("losetup %q: exit %d, stdout %q, stderr %q; want exit 1, stderr %q",
				tt.args, code, stdout.String(), stderr.String(), tt.want)
		}
	}
}

func TestRunHelpAndVersion(t *testing.T) {
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"-V"}, version + "\n"},
		{[]string{"--version", "-l"}, version + "\n"},
		{[]string{"-h"}, "\nUsage:\n"},
		{[]string{"--help", "-x"}, "\nUsage:\n"},
	} {
		var stdout, stderr bytes.Buffer
		code := run(append([]string{"losetup"}, tt.args...), &stdout, &stderr)
		if code != 0 || !strings.HasPrefix(stdout.String(), tt.want) || stderr.Len() != 0 {
			t.Errorf("losetup %q: exit %d, stdout %q, stderr %q; want exit 0 and %q",
				tt.args, code, stdout.String(), stderr.String(), tt.want)
		}
	}
	if strings.Contains(version, "util-linux 2.38.1") || !strings.Contains(version, "loopctl") {
		t.Errorf("-V says %q: it must name this tool, not util-linux's", version)
	}
	var usageText bytes.Buffer
	usage(&usageText)
	for _, o := range options {
		if !strings.Contains(usageText.String(), "--"+o.long) {
			t.Errorf("--help does not mention --%s", o.long)
		}
	}
}

// TestParse checks what the command line asks for, for the forms that need
// no device to be parsed.
func TestParse(t *testing.T) {
	def := defaultColumns
	all := []int{colName, colAutoClear, colBackFile, colBackIno, colBackMajMin, colMajMin, colOffset, colPartScan, colRO, colSizeLimit, colDIO, colLogSec}
	for _, tt := range []struct {
		args []string
		want config
	}{
		{nil, config{act: actShow, list: true, columns: def}},
		{[]string{"-a"}, config{act: actShow}},
		{[]string{"-l"}, config{act: actShow, list: true, columns: def}},
		{[]string{"-J"}, config{act: actShow, list: true, json: true, columns: def}},
		{[]string{"--raw"}, config{act: actShow, list: true, raw: true, columns: def}},
		{[]string{"-O", "name,RO"}, config{act: actShow, list: true, columns: []int{colName, colRO}}},
		{[]string{"-l", "-O", "+MAJ:MIN,back-ino"}, config{act: actShow, list: true, columns: append(slices.Clone(def), colMajMin, colBackIno)}},
		{[]string{"--output-all", "-l", "-n"}, config{act: actShow, list: true, noHead: true, columns: all}},
		{[]string{"-j", "f.img", "-o", "4KiB"}, config{act: actShow, file: "f.img", offset: 4096}},
		{[]string{"-f"}, config{act: actFindFree}},
		{[]string{"-f", "--show", "-r", "-P", "-o", "1K", "--sizelimit", "2MiB", "-b", "4096", "f.img"},
			config{act: actCreate, file: "f.img", showDev: true, flags: loopctl.FlagReadOnly | loopctl.FlagPartScan,
				offset: 1024, sizeLimit: 2 << 20, blockSize: 4096}},
		{[]string{"-f", "--direct-io", "-L", "f.img"}, config{act: actCreate, file: "f.img", flags: loopctl.FlagDirectIO, noOverlap: true}},
		{[]string{"-f", "--direct-io=off", "f.img"}, config{act: actCreate, file: "f.img"}},
		{[]string{"loop7", "f.img"}, config{act: actCreate, device: "/dev/loop7", file: "f.img"}},
		{[]string{"/dev/loop7", "f.img", "-r"}, config{act: actCreate, device: "/dev/loop7", file: "f.img", flags: loopctl.FlagReadOnly}},
		{[]string{"--add", "any"}, config{act: actAdd, number: "any"}},
		{[]string{"--remove", "12"}, config{act: actRemove, number: "12"}},
		{[]string{"--get-free"}, config{act: actGetFree}},
	} {
		c := &config{prog: "losetup", args: len(tt.args) + 1}
		if err := c.parse(append([]string{"losetup"}, tt.args...), nil); err != nil {
			t.Errorf("losetup %q: %v", tt.args, err)
			continue
		}
		got := fmt.Sprintf("act %d device %q file %q flags %v offset %d limit %d block %d show %t list %t json %t raw %t nohead %t reuse %t number %q columns %v",
			c.act, c.device, c.file, c.flags, c.offset, c.sizeLimit, c.blockSize, c.showDev, c.list, c.json, c.raw, c.noHead, c.noOverlap, c.number, c.columns)
		w := tt.want
		want := fmt.Sprintf("act %d device %q file %q flags %v offset %d limit %d block %d show %t list %t json %t raw %t nohead %t reuse %t number %q columns %v",
			w.act, w.device, w.file, w.flags, w.offset, w.sizeLimit, w.blockSize, w.showDev, w.list, w.json, w.raw, w.noHead, w.noOverlap, w.number, w.columns)
		if got != want {
			t.Errorf("losetup %q:\n got %s\nwant %s", tt.args, got, want)
		}
	}
}
