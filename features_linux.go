package loopctl

import (
	"strings"
	"sync/atomic"

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

// A feature is a way kernels differ that the package relies on where the
// kernel has it and works around where it does not. KERNELS.md measures
// each on the kernels of the test matrix (TestFeaturesMatchKernelsMD holds
// the table to it); RELIABILITY.md ("Kernels") tells the story.
type feature int

const (
	featConfigure           feature = iota // LOOP_CONFIGURE
	featAddAny                             // LOOP_CTL_ADD -1 picks an unused number
	featDiskSeq                            // disk sequence numbers: BLKGETDISKSEQ
	featOpenat2                            // openat2's RESOLVE_NO_SYMLINKS
	featScanOnce                           // LOOP_CONFIGURE leaves no partition scan to the next open
	featDropsHandPartitions                // the detach drops partitions added by hand
	numFeatures
)

// How the package learns whether the kernel has a feature.
const (
	byAnswer  = iota // the kernel's answer to the first call that needs it; then kept
	byVersion        // the kernel's version (uname), where no call tells
)

// features is what the package knows of each feature: its name (a row
// of KERNELS.md where it has one), the first kernel that has it, how the
// package learns the answer, and what it does on a kernel without it.
// For a feature learnt by version, kernels before before have it too (the
// behaviour it ends came later), and so do the stable updates in stable,
// measured with the change.
var features = [numFeatures]struct {
	name    string
	since   kernelVersion
	learnt  int
	without string
	before  kernelVersion
	stable  []kernelVersion
}{
	featConfigure: {name: "LOOP_CONFIGURE", since: kernelVersion{5, 8, 0}, learnt: byAnswer,
		without: "binds with LOOP_SET_FD, then LOOP_SET_STATUS64, LOOP_SET_BLOCK_SIZE and LOOP_SET_DIRECT_IO, clearing its binding if a step fails"},
	featAddAny: {name: "LOOP_CTL_ADD -1, an unbound device", since: kernelVersion{5, 14, 0}, learnt: byAnswer,
		without: "Add(AnyNumber) adds the lowest number sysfs does not list (LOOP_CTL_ADD -1 answers EEXIST while a device is unbound)"},
	featDiskSeq: {name: "disk sequence numbers", since: kernelVersion{5, 15, 0}, learnt: byAnswer,
		without: "DiskSeq is 0; OpenBinding tells a binding by its file, offset and size limit"},
	featOpenat2: {name: "openat2", since: kernelVersion{5, 6, 0}, learnt: byAnswer,
		without: "NoSymlinks walks the path a component at a time with O_NOFOLLOW"},
	featScanOnce: {name: "an open after LOOP_CONFIGURE scans", since: kernelVersion{7, 1, 0}, learnt: byVersion,
		before: kernelVersion{5, 15, 0}, stable: []kernelVersion{{6, 12, 118}, {6, 18, 44}},
		without: "FlagPartScan is set with LOOP_SET_STATUS64 after an open that runs the marked scan (kernel commits 9f65c489b68d, 267ec4d7223a)"},
	featDropsHandPartitions: {name: "a partition added by hand, after detach", since: kernelVersion{7, 2, 0}, learnt: byVersion,
		without: "partitions an earlier binding left are deleted (BLKPG) before a bind (kernel commit c4f4c0fc551c)"},
}

// has tells whether a kernel of version v has feature f, by the table.
func (v kernelVersion) has(f feature) bool {
	e := features[f]
	switch {
	case v.atLeast(e.since.major, e.since.minor):
		return true
	case e.before != (kernelVersion{}) && !v.atLeast(e.before.major, e.before.minor):
		return true // older than what the feature ends
	}
	for _, st := range e.stable {
		if v.major == st.major && v.minor == st.minor && v.patch >= st.patch {
			return true
		}
	}
	return false
}

// featureAnswers are a system's answers: what the kernel answered for
// each feature learnt by answer (0 not yet asked: the kernel is taken to
// have it; answerLacks once it answered without), and each learnt by
// version once looked up.
type featureAnswers [numFeatures]atomic.Int32

const (
	answerUnknown = iota
	answerHas
	answerLacks
)

// has tells whether the kernel has feature f: by what it answered so far
// for a feature learnt by its answer, by its version otherwise.
func (s *system) has(f feature) bool {
	switch s.answers[f].Load() {
	case answerHas:
		return true
	case answerLacks:
		return false
	}
	if features[f].learnt == byAnswer {
		return true
	}
	has := s.kernel().has(f)
	a := int32(answerLacks)
	if has {
		a = answerHas
	}
	s.answers[f].Store(a)
	return has
}

// lacks records that the kernel answered a call as one without feature f
// does: the kernel does not change under a process, so no later call asks.
func (s *system) lacks(f feature) { s.answers[f].Store(answerLacks) }
