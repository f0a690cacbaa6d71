//go:build !loopctl_stub

package loopctl

import (
	"strings"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/sysfs"
)

// A kernelVersion is a kernel's version as uname's release begins:
// "6.12.118+deb13-amd64" is 6.12.118, "6.1.0-57-amd64" 6.1.0 (Debian's
// older releases, and Ubuntu's, name no stable update: 0).
type kernelVersion struct{ major, minor, patch int }

// atLeast tells whether v is major.minor or newer.
func (v kernelVersion) atLeast(major, minor int) bool {
	return v.major > major || v.major == major && v.minor >= minor
}

// parseRelease reads the version at the start of a kernel release; ok is
// false for a release that does not start with MAJOR.MINOR.
func parseRelease(release string) (kernelVersion, bool) {
	end := strings.IndexFunc(release, func(r rune) bool { return r != '.' && (r < '0' || r > '9') })
	if end < 0 {
		end = len(release)
	}
	fields := strings.Split(release[:end], ".")
	if len(fields) < 2 {
		return kernelVersion{}, false
	}
	var v [3]int
	for i := 0; i < len(fields) && i < len(v); i++ {
		n, ok := sysfs.Number(fields[i])
		if !ok {
			return kernelVersion{}, false
		}
		v[i] = n
	}
	return kernelVersion{v[0], v[1], v[2]}, true
}

// unameVersion is the running kernel's version. A release it cannot read
// counts as the newest kernel: the package then trusts the kernel to do
// what the newest does, as it would on one it does not know.
func unameVersion() kernelVersion {
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		if v, ok := parseRelease(unix.ByteSliceToString(u.Release[:])); ok {
			return v
		}
	}
	return newestKernel
}

// newestKernel stands for a kernel whose version is unknown.
var newestKernel = kernelVersion{1 << 30, 0, 0}

// What the package knows of the kernel by its version; KERNELS.md
// measures each on the kernels of the test matrix, and RELIABILITY.md
// ("Partitions") tells the story.

// keepsStalePartitions tells whether partitions added by hand (BLKPG:
// partx --add, addpart) to a device bound without LO_FLAGS_PARTSCAN
// outlive its binding, for the next binding of the device to show:
// before Linux 7.2, whose detach removes them (kernel commit
// c4f4c0fc551c). Before binding on such a kernel the package removes
// what a device still has (dropStalePartitions).
func (v kernelVersion) keepsStalePartitions() bool { return !v.atLeast(7, 2) }

// scansTwice tells whether LOOP_CONFIGURE with LO_FLAGS_PARTSCAN may read
// the partition table twice, removing and adding every partition again.
// From 5.15 (kernel commit 9f65c489b68d) LOOP_CONFIGURE marks the disk
// for a scan and announces the binding before it scans; an open in
// between (udev's probe) runs the scan the mark asks for, and the
// kernel's own scan follows. Kernel commit 267ec4d7223a (7.1) took the
// mark away, and stable updates took that fix: those in scanFixed are
// measured. On a kernel that may, the package binds without the flag
// and sets it with LOOP_SET_STATUS64 (setPartScan), which costs a
// freeze of the device's queue.
func (v kernelVersion) scansTwice() bool {
	if !v.atLeast(5, 15) || v.atLeast(7, 1) {
		return false
	}
	for _, fixed := range scanFixed {
		if v.major == fixed.major && v.minor == fixed.minor && v.patch >= fixed.patch {
			return false
		}
	}
	return true
}

// scanFixed are stable updates measured to have kernel commit
// 267ec4d7223a (KERNELS.md, "an open after LOOP_CONFIGURE scans"); an
// earlier update of the same series may have it too, and pays for the
// second call all the same.
var scanFixed = []kernelVersion{{6, 12, 118}, {6, 18, 44}}
