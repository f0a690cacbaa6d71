// Package testlock makes the integration tests of this module's packages
// take turns on one machine. go test ./... runs the packages' test binaries
// at once, and examples/losetup's comparisons with util-linux list every
// loop device: another package's tests binding and detaching meanwhile
// would change what the two programs see between their runs.
package testlock

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/call"
	"github.com/loopctl/loopctl/internal/kerneltest"
)

// envHeld is set for the processes a test binary starts once it holds the
// lock, so that a helper re-running the binary does not wait for its parent.
const envHeld = "LOOPCTL_TEST_LOCK_HELD"

// Run runs the tests of m while holding the lock, an flock(LOCK_EX) on
// loopctl-integration.lock in the temporary directory, and returns their
// exit status. A process that cannot open the file (an unprivileged run, in
// which the integration tests skip) runs without it.
//
// Where udev runs, the tests' bindings give it events to work through, at
// a few hundred a second on two cores: before it lets go of the lock, Run
// waits until udev has processed them (udevadm settle), so that the next
// package's tests, and the machine once the tests end, find udev idle. A
// udev still busy a minute on fails the run.
func Run(m *testing.M) int {
	held := false
	if os.Getenv(envHeld) == "" {
		path := filepath.Join(os.TempDir(), "loopctl-integration.lock")
		if fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CREAT|unix.O_CLOEXEC, 0o644); err == nil {
			defer unix.Close(fd)
			if err := flock(fd); err == nil {
				os.Setenv(envHeld, "1")
				held = true
			}
		}
	}
	code := m.Run()
	if held {
		took, err := kerneltest.Settle()
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			if code == 0 {
				code = 1
			}
		} else if took > time.Second {
			fmt.Fprintf(os.Stderr, "udev took %v to process the tests' events\n", took.Round(time.Millisecond))
		}
	}
	return code
}

func flock(fd int) error {
	return call.Retry(func() error { return unix.Flock(fd, unix.LOCK_EX) })
}
