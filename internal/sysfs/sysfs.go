// Package sysfs reads and parses the loop driver's sysfs attributes:
// /sys/block/loopN/loop/* and /sys/dev/block/MAJ:MIN.
//
// The parsers take the kernel's text as it comes and never panic on any
// input; fuzz tests hold them to that.
package sysfs

import (
	"errors"
	"strconv"
	"strings"
)

// Root is where sysfs is mounted. The packages take it as a field or an
// argument, never as a variable, so that tests hand them a tree of their
// own.
const Root = "/sys"

// DevBlockPath returns root/dev/block/MAJ:MIN, the link sysfs keeps for
// every block device number.
func DevBlockPath(root string, major, minor uint32) string {
	return root + "/dev/block/" + strconv.FormatUint(uint64(major), 10) + ":" + strconv.FormatUint(uint64(minor), 10)
}

// LoopDir returns root/block/loopN, the sysfs directory of loop device n.
func LoopDir(root string, n int) string {
	return root + "/block/loop" + strconv.Itoa(n)
}

// LoopAttr returns the path of attribute attr of loop device n's loop/
// directory under root, which exists only while the device is bound, or
// of the directory itself for "".
func LoopAttr(root string, n int, attr string) string {
	if attr == "" {
		return LoopDir(root, n) + "/loop"
	}
	return LoopDir(root, n) + "/loop/" + attr
}

// maxDigits bounds the number in a loop device name, so that parsing never
// overflows: the kernel's highest number, 1<<20 - 1, has seven digits.
const maxDigits = 7

// LoopNumber parses a device name such as "loop12". It accepts only "loop"
// followed by a canonical decimal number (no sign, no leading zero).
func LoopNumber(name string) (int, bool) {
	digits, ok := strings.CutPrefix(name, "loop")
	if !ok {
		return -1, false
	}
	return Number(digits)
}

// Number parses a device or partition number as the kernel writes it in
// names: canonical decimal (no sign, no leading zero), at most maxDigits
// digits.
func Number(digits string) (int, bool) {
	if digits == "" || len(digits) > maxDigits || (digits[0] == '0' && len(digits) > 1) {
		return -1, false
	}
	n := 0
	for i := 0; i < len(digits); i++ {
		c := digits[i]
		if c < '0' || c > '9' {
			return -1, false
		}
		n = n*10 + int(c-'0')
	}
	return n, true
}

// WholeLoopDisk reports whether target, the destination of a
// /sys/dev/block/MAJ:MIN link, is a whole loop disk (".../block/loopN")
// rather than a partition (".../block/loopN/loopNpM") or another disk, and
// returns N.
func WholeLoopDisk(target string) (int, bool) {
	dir, name := splitLast(strings.TrimSuffix(target, "/"))
	_, parent := splitLast(dir)
	if parent != "block" {
		return -1, false
	}
	return LoopNumber(name)
}

func splitLast(p string) (dir, name string) {
	i := strings.LastIndexByte(p, '/')
	if i < 0 {
		return "", p
	}
	return p[:i], p[i+1:]
}

// PartitionNumber parses the name of a partition of loop device n, such as
// "loop3p12" for n = 3, and returns its number. It accepts only canonical
// decimal numbers.
func PartitionNumber(name string, n int) (int, bool) {
	rest, ok := strings.CutPrefix(name, "loop"+strconv.Itoa(n)+"p")
	if !ok {
		return -1, false
	}
	return LoopNumber("loop" + rest)
}

// ErrSyntax reports an attribute that is not in the kernel's format.
var ErrSyntax = errors.New("sysfs: malformed attribute")

// Value returns an attribute's text without the newline sysfs ends it with.
func Value(b []byte) string {
	s := string(b)
	if strings.HasSuffix(s, "\n") {
		return s[:len(s)-1]
	}
	return s
}

// Uint parses a decimal attribute such as loop/offset.
func Uint(b []byte) (uint64, error) {
	v, err := strconv.ParseUint(Value(b), 10, 64)
	if err != nil {
		return 0, ErrSyntax
	}
	return v, nil
}

// Dev parses a "MAJOR:MINOR" attribute such as /sys/block/loopN/dev.
func Dev(b []byte) (major, minor uint32, err error) {
	ma, mi, ok := strings.Cut(Value(b), ":")
	if !ok {
		return 0, 0, ErrSyntax
	}
	x, err1 := strconv.ParseUint(ma, 10, 32)
	y, err2 := strconv.ParseUint(mi, 10, 32)
	if err1 != nil || err2 != nil {
		return 0, 0, ErrSyntax
	}
	return uint32(x), uint32(y), nil
}

// Bool parses a 0/1 attribute such as loop/autoclear or ro.
func Bool(b []byte) (bool, error) {
	switch Value(b) {
	case "0":
		return false, nil
	case "1":
		return true, nil
	}
	return false, ErrSyntax
}
