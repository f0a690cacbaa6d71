// Package testlock makes the integration tests of this module's packages
// take turns on one machine. go test ./... runs the packages' test binaries
// at once, and examples/losetup's comparisons with util-linux list every
// loop device: another package's tests binding and detaching meanwhile
// would change what the two programs see between their runs.
package testlock

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/call"
)

// envHeld is set for the processes a test binary starts once it holds the
// lock, so that a helper re-running the binary does not wait for its parent.
const envHeld = "LOOPCTL_TEST_LOCK_HELD"

// Run runs the tests of m while holding the lock, an flock(LOCK_EX) on
// loopctl-integration.lock in the temporary directory, and returns their
// exit status. A process that cannot open the file (an unprivileged run, in
// which the integration tests skip) runs without it.
func Run(m *testing.M) int {
	if os.Getenv(envHeld) == "" {
		path := filepath.Join(os.TempDir(), "loopctl-integration.lock")
		if fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CREAT|unix.O_CLOEXEC, 0o644); err == nil {
			defer unix.Close(fd)
			if err := flock(fd); err == nil {
				os.Setenv(envHeld, "1")
			}
		}
	}
	return m.Run()
}

func flock(fd int) error {
	return call.Retry(func() error { return unix.Flock(fd, unix.LOCK_EX) })
}
