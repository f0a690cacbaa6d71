package call

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

func TestRetry(t *testing.T) {
	errs := []error{unix.EINTR, unix.EINTR, unix.EAGAIN}
	calls := 0
	err := Retry(func() error { calls++; return errs[calls-1] })
	if err != unix.EAGAIN || calls != 3 {
		t.Fatalf("Retry = %v after %d calls, want EAGAIN after 3", err, calls)
	}
	calls = 0
	n, err := RetryN(func() (int, error) {
		calls++
		if calls < 3 {
			return -1, unix.EINTR
		}
		return 7, nil
	})
	if n != 7 || err != nil || calls != 3 {
		t.Fatalf("RetryN = %d, %v after %d calls, want 7, nil after 3", n, err, calls)
	}
}

func TestOpenAt(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "f"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	d, errno := OpenAt(unix.AT_FDCWD, &[]byte(dir + "\x00")[0], unix.O_RDONLY|unix.O_DIRECTORY)
	if errno != 0 {
		t.Fatal(errno)
	}
	defer unix.Close(d)
	fd, errno := OpenAt(d, &[]byte("f\x00")[0], unix.O_RDONLY)
	if errno != 0 {
		t.Fatal(errno)
	}
	defer unix.Close(fd)
	flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
	if err != nil || flags&unix.FD_CLOEXEC == 0 {
		t.Errorf("descriptor flags %#x, %v: want FD_CLOEXEC", flags, err)
	}
	if _, errno := OpenAt(d, &[]byte("missing\x00")[0], unix.O_RDONLY); errno != unix.ENOENT {
		t.Errorf("OpenAt of a missing name = %v, want ENOENT", errno)
	}
	for _, inMemory := range []bool{false, true} {
		if errno := AccessAt(d, &[]byte("f\x00")[0], inMemory); errno != 0 {
			t.Errorf("AccessAt(f, %v) = %v", inMemory, errno)
		}
		if errno := AccessAt(d, &[]byte("missing\x00")[0], inMemory); !errors.Is(errno, os.ErrNotExist) {
			t.Errorf("AccessAt(missing, %v) = %v, want ENOENT", inMemory, errno)
		}
	}
}

func TestLinksAt(t *testing.T) {
	dir := t.TempDir()
	for _, sub := range []string{"a", "b"} {
		if err := os.Mkdir(filepath.Join(dir, sub), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		t.Fatal(err)
	}
	p, _ := unix.BytePtrFromString(dir)
	if links, errno := LinksAt(unix.AT_FDCWD, p); errno != 0 || uint64(links) != uint64(st.Nlink) {
		t.Fatalf("LinksAt = %d, %v; want %d, as stat says", links, errno, st.Nlink)
	}
	p, _ = unix.BytePtrFromString(filepath.Join(dir, "gone"))
	if _, errno := LinksAt(unix.AT_FDCWD, p); errno != unix.ENOENT {
		t.Fatalf("LinksAt of a missing path: %v, want ENOENT", errno)
	}
	if allocs := testing.AllocsPerRun(100, func() { LinksAt(unix.AT_FDCWD, p) }); allocs != 0 {
		t.Fatalf("%v allocations a call", allocs)
	}
}
