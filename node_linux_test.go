package loopctl

import (
	"errors"
	"io/fs"
	"os"
	"strings"
	"testing"

	"github.com/loopctl/loopctl/internal/userns"
	"golang.org/x/sys/unix"
)

// TestExplainNodeOpen checks what an open of a node just made says when a
// device cgroup refuses the device (EPERM), or /dev takes no device nodes
// (EACCES): no test here runs under a device cgroup.
func TestExplainNodeOpen(t *testing.T) {
	rdev := unix.Mkdev(7, 3)
	for _, c := range []struct {
		errno unix.Errno
		want  string
	}{
		{unix.EPERM, `device cgroup (the container's device rules) refuses block device 7:3: allow "b 7:* rw"`},
		{unix.EACCES, "takes no device nodes (mounted nodev"},
	} {
		err := explainNodeOpen(&os.PathError{Op: "open", Path: "/dev/loop3", Err: c.errno}, rdev)
		if !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), "/dev/loop3") ||
			!errors.Is(err, c.errno) || !errors.Is(err, fs.ErrPermission) {
			t.Errorf("%v: %v, want it to say %q and match the errno and fs.ErrPermission", c.errno, err, c.want)
		}
	}
	if err := explainNodeOpen(&os.PathError{Op: "open", Path: "/dev/loop3", Err: unix.ENXIO}, rdev); !errors.Is(err, unix.ENXIO) ||
		strings.Contains(err.Error(), "cgroup") {
		t.Errorf("ENXIO: %v, want it as it was", err)
	}
}

// TestExplainMknod: a refused mknod says why, as this process can tell
// (a user namespace, no CAP_MKNOD, or else a device cgroup, whose rule it
// names), and keeps the errno; other errors pass as they are.
func TestExplainMknod(t *testing.T) {
	rdev := unix.Mkdev(259, 2)
	err := explainMknod(unix.EPERM, rdev)
	if !errors.Is(err, unix.EPERM) || !errors.Is(err, fs.ErrPermission) {
		t.Errorf("EPERM: %v, want it to match EPERM and fs.ErrPermission", err)
	}
	want := "allow \"b 259:* m\""
	switch {
	case userns.Inside():
		want = "user namespace"
	case !effectiveCap(unix.CAP_MKNOD):
		want = "lacks CAP_MKNOD"
	}
	if !strings.Contains(err.Error(), want) {
		t.Errorf("EPERM: %q, want it to say %q", err, want)
	}
	if err := explainMknod(unix.EACCES, rdev); err != unix.EACCES {
		t.Errorf("EACCES: %v, want it as it was", err)
	}
}
