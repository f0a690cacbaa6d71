package loopctl

import (
	"os"
	"path/filepath"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// openTemp opens a file of the test's own through osKernel with mode, and
// returns the handle and the file's inode, by which a descriptor is told
// from another that reuses its number.
func openTemp(t *testing.T, mode int) (handle, uint64) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	h, err := osKernel{}.open(path, mode)
	if err != nil {
		t.Fatal(err)
	}
	st, err := stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return h, st.Ino
}

// isOpen tells whether fd is still the descriptor of inode ino.
func isOpen(fd int, ino uint64) bool {
	var st unix.Stat_t
	return unix.Fstat(fd, &st) == nil && st.Ino == ino
}

// TestFileHandleClose: a Close with calls in flight closes the descriptor
// when the last of them returns, not before; after it no call reaches the
// descriptor, and a second Close says it is closed.
func TestFileHandleClose(t *testing.T) {
	h, ino := openTemp(t, readWrite)
	fh, ok := h.(*fileHandle)
	if !ok {
		t.Fatalf("open gave a %T, want a *fileHandle", h)
	}
	const calls = 8
	var taken, done sync.WaitGroup
	release := make(chan struct{})
	for range calls {
		taken.Add(1)
		done.Go(func() {
			if !fh.acquire() {
				t.Error("acquire of an open handle failed")
				taken.Done()
				return
			}
			taken.Done()
			<-release
			if err := fh.release(); err != nil {
				t.Errorf("release: %v", err)
			}
		})
	}
	taken.Wait()
	if err := fh.Close(); err != nil {
		t.Fatalf("Close with calls in flight: %v", err)
	}
	if !isOpen(fh.fd, ino) {
		t.Fatal("the descriptor closed under calls in flight")
	}
	if fh.acquire() {
		t.Fatal("a closed handle gave a reference")
	}
	if _, err := fh.rawIoctl(unix.TCGETS, 0); err != os.ErrClosed {
		t.Fatalf("a call after Close = %v, want os.ErrClosed", err)
	}
	close(release)
	done.Wait()
	if isOpen(fh.fd, ino) {
		t.Fatal("the descriptor stayed open after the last call returned")
	}
	if err := fh.Close(); err != os.ErrClosed {
		t.Fatalf("a second Close = %v, want os.ErrClosed", err)
	}
}

// TestFileHandleCloseAlone: without calls in flight Close closes the
// descriptor at once, and says how the close went.
func TestFileHandleCloseAlone(t *testing.T) {
	h, ino := openTemp(t, readOnly)
	fh := h.(*fileHandle)
	if !fh.readOnly() {
		t.Error("a handle opened readOnly does not say so")
	}
	if err := fh.Close(); err != nil {
		t.Fatal(err)
	}
	if isOpen(fh.fd, ino) {
		t.Fatal("the descriptor stayed open after Close")
	}
}

// TestOpenTransient: a transient handle is the bare descriptor, opened as
// asked and closed by its Close.
func TestOpenTransient(t *testing.T) {
	h, ino := openTemp(t, readOnly|transient)
	fd, ok := h.(fdHandle)
	if !ok {
		t.Fatalf("a transient open gave a %T, want an fdHandle", h)
	}
	flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err != nil {
		t.Fatal(err)
	}
	if flags&unix.O_ACCMODE != unix.O_RDONLY {
		t.Errorf("a readOnly transient descriptor has access mode %#o", flags&unix.O_ACCMODE)
	}
	if fdFlags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil || fdFlags&unix.FD_CLOEXEC == 0 {
		t.Errorf("a transient descriptor without FD_CLOEXEC (%#x, %v)", fdFlags, err)
	}
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	if isOpen(int(fd), ino) {
		t.Fatal("the descriptor stayed open after Close")
	}
}
