//go:build linux

package main

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/loopctl/loopctl"
	"golang.org/x/sys/unix"
)

// How a column's values are typed in JSON.
const (
	jsonString = iota
	jsonNumber
	jsonBool
)

type column struct {
	name  string
	right bool // right-aligned in a table
	json  int
	help  string
}

// The columns, in util-linux 2.38's order (--output-all's).
const (
	colName = iota
	colAutoClear
	colBackFile
	colBackIno
	colBackMajMin
	colMajMin
	colOffset
	colPartScan
	colRO
	colSizeLimit
	colDIO
	colLogSec
	colRef // util-linux 2.40's, not in --output-all
)

var columns = []column{
	colName:       {"NAME", false, jsonString, "loop device name"},
	colAutoClear:  {"AUTOCLEAR", true, jsonBool, "autoclear flag set"},
	colBackFile:   {"BACK-FILE", false, jsonString, "device backing file"},
	colBackIno:    {"BACK-INO", true, jsonNumber, "backing file inode number"},
	colBackMajMin: {"BACK-MAJ:MIN", false, jsonString, "backing file major:minor device number"},
	colMajMin:     {"MAJ:MIN", false, jsonString, "loop device major:minor number"},
	colOffset:     {"OFFSET", true, jsonNumber, "offset from the beginning"},
	colPartScan:   {"PARTSCAN", true, jsonBool, "partscan flag set"},
	colRO:         {"RO", true, jsonBool, "read-only device"},
	colSizeLimit:  {"SIZELIMIT", true, jsonNumber, "size limit of the file in bytes"},
	colDIO:        {"DIO", true, jsonBool, "access backing file with direct-io"},
	colLogSec:     {"LOG-SEC", true, jsonNumber, "logical sector size in bytes"},
	colRef:        {"REF", false, jsonString, "loop device reference"},
}

var defaultColumns = []int{colName, colSizeLimit, colOffset, colAutoClear, colRO, colBackFile, colDIO, colLogSec}

// columnID finds a column by its name, in any case; -1 if none.
func columnID(name string) int {
	for i, c := range columns {
		if strings.EqualFold(c.name, name) {
			return i
		}
	}
	return -1
}

// A row is one device: its binding, or none.
type row struct {
	path  string
	bound bool
	s     loopctl.Status
}

// rdev is the device number of the row's node, read when MAJ:MIN is
// shown; false if it cannot be read.
func (r row) rdev() (uint64, bool) {
	var st unix.Stat_t
	if unix.Stat(r.path, &st) != nil || st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return 0, false
	}
	return uint64(st.Rdev), true
}

// cell is the text of column col for the row, and whether it has any.
// Values follow util-linux 2.38: MAJ:MIN padded as "%3u:%-3u" and
// BACK-MAJ:MIN as "%8u:%-3u" even in raw and JSON output; an unbound device
// has 512-byte sectors, no flags, and, as util-linux reports what the
// kernel could do rather than what it does, partition scanning.
func (r row) cell(col int) (string, bool) {
	bit := func(f loopctl.Flags) (string, bool) {
		if r.s.Flags&f != 0 {
			return "1", true
		}
		return "0", true
	}
	switch col {
	case colName:
		return r.path, true
	case colMajMin:
		rdev, ok := r.rdev()
		if !ok {
			return "", false
		}
		return fmt.Sprintf("%3d:%-3d", unix.Major(rdev), unix.Minor(rdev)), true
	case colAutoClear:
		return bit(loopctl.FlagAutoClear)
	case colRO:
		return bit(loopctl.FlagReadOnly)
	case colDIO:
		return bit(loopctl.FlagDirectIO)
	case colPartScan:
		if !r.bound {
			return "1", true
		}
		return bit(loopctl.FlagPartScan)
	case colLogSec:
		if !r.bound {
			return "512", true // what the kernel leaves an unbound device
		}
		return strconv.FormatUint(uint64(r.s.BlockSize), 10), true
	}
	if !r.bound {
		return "", false
	}
	switch col {
	case colBackFile:
		return r.s.BackingFile, true
	case colBackIno:
		if r.s.BackingInode == 0 {
			return "", false
		}
		return strconv.FormatUint(r.s.BackingInode, 10), true
	case colBackMajMin:
		if r.s.BackingDevice == 0 {
			return "", false
		}
		return fmt.Sprintf("%8d:%-3d", unix.Major(r.s.BackingDevice), unix.Minor(r.s.BackingDevice)), true
	case colOffset:
		return strconv.FormatUint(r.s.Offset, 10), true
	case colSizeLimit:
		return strconv.FormatUint(r.s.SizeLimit, 10), true
	case colRef:
		return r.s.Ref, true
	}
	return "", false
}
