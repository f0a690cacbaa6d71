// Package kerneltest holds what the integration tests of this module's
// packages need of the running kernel beyond the library itself.
package kerneltest

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// WaitUnbound waits until loop device n is unbound, as the kernel promises
// for a device with autoclear (and so after LOOP_CLR_FD) once every opener
// has closed it. Another process may hold it open a moment longer than the
// test: udev, which opens every device that changes to probe it, for a few
// milliseconds after each bind and unbind. So it waits for the binding to
// go, up to a minute, and then fails naming the processes that still hold
// the device, or saying that none does.
func WaitUnbound(t testing.TB, n int) {
	t.Helper()
	dir := "/sys/block/loop" + strconv.Itoa(n) + "/loop"
	for deadline := time.Now().Add(time.Minute); ; {
		if _, err := os.Lstat(dir); errors.Is(err, fs.ErrNotExist) {
			return
		}
		if time.Now().After(deadline) {
			break
		}
		time.Sleep(time.Millisecond)
	}
	holders := Openers(n)
	if len(holders) == 0 {
		holders = []string{"no process"}
	}
	t.Fatalf("loop%d still bound a minute after the test let go of it; held open by %s", n, strings.Join(holders, ", "))
}

// Openers returns the processes that have loop device n open, as "PID
// (COMMAND)", from their descriptors in /proc.
func Openers(n int) []string {
	var dev unix.Stat_t
	if err := unix.Stat("/dev/loop"+strconv.Itoa(n), &dev); err != nil {
		return nil
	}
	procs, _ := os.ReadDir("/proc")
	var holders []string
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil {
			continue
		}
		fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
		for _, fd := range fds {
			var st unix.Stat_t
			if unix.Stat(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name()), &st) == nil &&
				st.Mode&unix.S_IFMT == unix.S_IFBLK && st.Rdev == dev.Rdev {
				comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
				holders = append(holders, fmt.Sprintf("%d (%s)", pid, strings.TrimSpace(string(comm))))
				break
			}
		}
	}
	return holders
}
