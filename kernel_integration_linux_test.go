//go:build integration && !loopctl_stub

package loopctl

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/kerneltest"
)

// What the tests know of the running kernel: where its behaviour differs,
// a test says which kernels and why.

var kernelConfig = sync.OnceValues(func() (map[string]string, error) {
	var r io.Reader
	if f, err := os.Open("/proc/config.gz"); err == nil {
		defer f.Close()
		if r, err = gzip.NewReader(f); err != nil {
			return nil, err
		}
	} else {
		b, err := os.ReadFile("/boot/config-" + kerneltest.Release())
		if err != nil {
			return nil, errors.New("neither /proc/config.gz nor /boot/config-" + kerneltest.Release() + " tells how the kernel was built")
		}
		r = bytes.NewReader(b)
	}
	cfg := map[string]string{}
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok && strings.HasPrefix(k, "CONFIG_") {
			cfg[k] = v
		}
	}
	return cfg, sc.Err()
})

// requireConfig skips the test unless the kernel was built with every
// option named (=y or =m).
func requireConfig(t *testing.T, options ...string) {
	t.Helper()
	cfg, err := kernelConfig()
	if err != nil {
		t.Skip(err)
	}
	for _, o := range options {
		if v := cfg[o]; v != "y" && v != "m" {
			t.Skipf("kernel %s is built without %s", kerneltest.Release(), o)
		}
	}
}

// directIOOK reports whether files in dir can be opened with O_DIRECT:
// tmpfs could not before Linux 6.6, and the kernel then cannot give a loop
// device direct I/O on them.
func directIOOK(t testing.TB, dir string) bool {
	t.Helper()
	p := filepath.Join(dir, "odirect-probe")
	if err := os.WriteFile(p, make([]byte, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	defer os.Remove(p)
	fd, err := unix.Open(p, unix.O_RDONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err == unix.EINVAL {
		return false
	}
	if err != nil {
		t.Fatal(err)
	}
	unix.Close(fd)
	return true
}

// wantNoDirectIO checks that binding file with FlagDirectIO failed with
// ErrNoDirectIO and left nothing bound to it.
func wantNoDirectIO(t *testing.T, err error, file string) {
	t.Helper()
	if !errors.Is(err, ErrNoDirectIO) || !errors.Is(err, unix.EINVAL) {
		t.Fatalf("bind with direct I/O on a file system without O_DIRECT = %v, want ErrNoDirectIO", err)
	}
	if found, err := FindByBackingFile(file); err != nil || len(found) != 0 {
		t.Fatalf("left bound after ErrNoDirectIO: %+v, %v", found, err)
	}
	t.Logf("kernel %s, %s: no O_DIRECT, so no direct I/O: %v", kerneltest.Release(), filepath.Dir(file), err)
}
