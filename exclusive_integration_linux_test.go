//go:build integration && !loopctl_stub

package loopctl

import (
	"errors"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/kerneltest"
)

// TestKernelHeldExclusively changes a bound device's settings while
// another opener holds it exclusively: a mounted file system, or an open
// with O_EXCL. Since Linux 6.17 the kernel refuses LOOP_SET_BLOCK_SIZE
// then (and stable kernels took it: Debian's 6.12.118 refuses it too):
// the error must say what it means and match ErrBusy. LOOP_SET_STATUS64
// was to follow in 6.19, but neither 6.18 nor Debian's 7.3.4 refuses it,
// even to move the offset under a mounted file system; nor
// LOOP_SET_DIRECT_IO. A kernel that does not refuse makes the change.
func TestKernelHeldExclusively(t *testing.T) {
	for _, holder := range []string{"O_EXCL", "mount"} {
		t.Run(holder, func(t *testing.T) {
			f := kerneltest.TempFile(t, 16<<20)
			if holder == "mount" {
				kerneltest.MkfsExt4(t, f.Name())
			}
			d := attachT(t, f.Name(), Options{})
			switch holder {
			case "O_EXCL":
				fd, err := unix.Open(d.Path(), unix.O_RDONLY|unix.O_EXCL|unix.O_CLOEXEC, 0)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { unix.Close(fd) })
			case "mount":
				dir := t.TempDir()
				if err := unix.Mount(d.Path(), dir, "ext4", 0, ""); err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() {
					if err := unix.Unmount(dir, 0); err != nil {
						t.Error(err)
					}
				})
			}
			s, err := d.Status()
			if err != nil {
				t.Fatal(err)
			}
			for _, change := range []struct {
				name         string
				major, minor int // the first kernel that refuses it
				do           func() error
			}{
				{"SetBlockSize", 6, 17, func() error { return d.SetBlockSize(512) }},
				// Refused by no kernel of the matrix (5.10 to 7.3).
				{"SetStatus", 99, 0, func() error { return d.SetStatus(s) }},
				{"SetDirectIO", 99, 0, func() error { return d.SetDirectIO(false) }},
			} {
				err := change.do()
				switch refused := errors.Is(err, unix.EBUSY); {
				case refused && (!errors.Is(err, ErrBusy) ||
					!strings.Contains(err.Error(), "held exclusively") || !strings.Contains(err.Error(), "Options at Attach")):
					t.Errorf("%s on %s, held by %s: %v; want ErrBusy, explained", change.name, kerneltest.Release(), holder, err)
				case !refused && kerneltest.AtLeast(t, change.major, change.minor):
					t.Errorf("%s on %s, held by %s: %v; want EBUSY from Linux %d.%d on", change.name, kerneltest.Release(),
						holder, err, change.major, change.minor)
				case !refused && err != nil:
					t.Errorf("%s on %s, held by %s: %v", change.name, kerneltest.Release(), holder, err)
				default:
					t.Logf("%s on %s, held by %s: %v", change.name, kerneltest.Release(), holder, err)
				}
			}
		})
	}
}
