package loopctl

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/loopctl/loopctl/internal/sysfs"
)

// A system is what the package works against: the kernel's calls, where
// sysfs and this process's descriptors are, how long it pauses between
// tries, and what it has learnt of the kernel. Controls and Devices keep
// the system that opened them.
//
// host is the machine, which every exported function uses. A test builds
// a system of its own (newSystem: a fake kernel, a sysfs tree of its own,
// short pauses) and calls the unexported methods the exported functions
// wrap, so that no test changes state another test sees.
type system struct {
	k      kernel
	sysfs  string // where sysfs is mounted
	udev   string // where udev keeps its state: udevRoot
	procFD string // this process's descriptors as paths: "/proc/self/fd/"

	// bindPause caps backoff's pause after a bind that lost a race,
	// againPause after a call that answered EAGAIN (retryWhile).
	bindPause, againPause time.Duration

	// noAttachLock leaves the control device's lock out of Attach: only a
	// benchmark measuring what the lock costs sets it.
	noAttachLock bool

	// What the package learnt of the kernel's features (features_linux.go),
	// at the first call that needed each, and kept: the kernel does not
	// change under a process.
	answers featureAnswers

	// turn is the attach turn (lockAttach), and shared the control device
	// Attach uses, opened at first need and kept (sharedControl): one per
	// process for host, as the control device's lock is one per open file.
	// lockWaiters counts the goroutines still waiting for that lock for an
	// Attach whose context ended (waitControlLock).
	turn        chan struct{}
	shared      sharedState
	lockWaiters sync.WaitGroup

	// lostRaces counts the races attachers lost; tests report it.
	lostRaces atomic.Int64

	// cleanDiskLinks is the link count of the sysfs directory of a loop
	// disk with no partition and no binding, once a listing has shown it
	// (stalePartitions); 0 before.
	cleanDiskLinks atomic.Uint64

	// version is the kernel's version, read at first need (kernel); a
	// test sets it before, for a kernel of its own.
	version     kernelVersion
	versionOnce sync.Once
}

// kernel returns the kernel's version.
func (s *system) kernel() kernelVersion {
	s.versionOnce.Do(func() {
		if s.version == (kernelVersion{}) {
			s.version = unameVersion()
		}
	})
	return s.version
}

// sharedState is a system's shared control device.
type sharedState struct {
	mu sync.Mutex
	c  *Control
}

// host is the machine: the kernel's calls, /sys and /proc/self/fd. Its
// attach turn, shared control device and feature answers are the
// process's, which is why it is a package variable; nothing changes it.
var host = newSystem(osKernel{}, sysfs.Root)

// newSystem returns a system of kernel k with sysfs at root, pausing as
// on a real machine.
func newSystem(k kernel, root string) *system {
	return &system{
		k:          k,
		sysfs:      root,
		udev:       udevRoot,
		procFD:     "/proc/self/fd/",
		bindPause:  20 * time.Millisecond,
		againPause: 250 * time.Millisecond,
		turn:       make(chan struct{}, 1),
	}
}
