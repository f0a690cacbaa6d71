package loopctl

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/kerneltest"
)

// hostilePaths makes, in a directory of the test's own, one path of each
// kind that cannot back a loop device, with the words its error must
// have and the sentinel it must match. None needs root.
func hostilePaths(t *testing.T) []hostilePath {
	t.Helper()
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	loop := filepath.Join(dir, "loop")
	if err := os.Symlink(loop, loop); err != nil {
		t.Fatal(err)
	}
	return []hostilePath{
		{"named pipe", fifo, "is a named pipe (FIFO)", fs.ErrInvalid},
		{"socket", sock, "is a socket", fs.ErrInvalid},
		{"character device", "/dev/null", "is a character device", fs.ErrInvalid},
		{"zero", "/dev/zero", "is a character device", fs.ErrInvalid},
		{"directory", dir, "is a directory", fs.ErrInvalid},
		{"procfs", "/proc/self/status", "is a file of procfs", fs.ErrInvalid},
		{"sysfs", "/sys/kernel/uevent_seqnum", "is a file of sysfs", fs.ErrInvalid},
		{"NUL byte", filepath.Join(dir, "a\x00b"), "has a NUL byte", fs.ErrInvalid},
		{"too long", "/" + strings.Repeat("x/", 3000), "file name too long", fs.ErrInvalid},
		{"name too long", filepath.Join(dir, strings.Repeat("x", 300)), "file name too long", fs.ErrInvalid},
		{"symlink loop", loop, "too many levels of symbolic links", fs.ErrInvalid},
		{"missing", filepath.Join(dir, "missing"), "no such file or directory", fs.ErrNotExist},
	}
}

type hostilePath struct {
	name, path, words string
	is                error
}

// within runs attach and fails the test unless it returns within d: a
// hang, not a slow answer, is what it catches.
func within(t *testing.T, d time.Duration, attach func() (*Device, error)) (*Device, error) {
	t.Helper()
	type result struct {
		d   *Device
		err error
	}
	done := make(chan result, 1)
	go func() {
		d, err := attach()
		done <- result{d, err}
	}()
	select {
	case r := <-done:
		return r.d, r.err
	case <-time.After(d):
		t.Fatalf("no answer after %v", d)
		return nil, nil
	}
}

// checkFileBlamed asserts that err is a refusal of the backing file with
// words, matching is and no sentinel about loop devices.
func checkFileBlamed(t *testing.T, err error, words string, is error) {
	t.Helper()
	if err == nil {
		t.Fatal("no error")
	}
	if !errors.Is(err, is) || !strings.Contains(err.Error(), words) {
		t.Fatalf("error %q: want one matching %v that says %q", err, is, words)
	}
	for _, s := range []error{ErrBusy, ErrNotBound, ErrNotLoop, ErrNoDirectIO} {
		if errors.Is(err, s) {
			t.Fatalf("error %q matches %v: the backing file is blamed on a loop device", err, s)
		}
	}
	var e *Error
	if !errors.As(err, &e) || !strings.HasPrefix(err.Error(), "loopctl: ") {
		t.Fatalf("error %q is no *Error", err)
	}
}

func TestAttachBadBackingFiles(t *testing.T) {
	k := useFake(t, 2)
	for _, hp := range hostilePaths(t) {
		for _, ro := range []bool{false, true} {
			name := hp.name
			var o Options
			if ro {
				name += ", read-only"
				o.Flags = FlagReadOnly
			}
			t.Run(name, func(t *testing.T) {
				before := filesOpen(t)
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				defer cancel()
				d, err := within(t, time.Minute, func() (*Device, error) { return k.sys.Attach(ctx, hp.path, o) })
				if err == nil {
					d.Close()
				}
				checkFileBlamed(t, err, hp.words, hp.is)
				if log := k.calls(""); len(log) != 0 {
					t.Fatalf("devices touched: %q", log)
				}
				if left := leftOpen(t, before); len(left) != 0 {
					t.Fatalf("descriptors %v left open", left)
				}
			})
		}
	}
}

// TestAttachFileBadBackingFiles hands AttachFile, Configure, SetFD and
// ChangeFD files of each kind that cannot back a loop device: each is
// refused before any ioctl.
func TestAttachFileBadBackingFiles(t *testing.T) {
	t.Parallel()
	k := useFake(t, 2)
	var files []hostilePath
	for _, hp := range hostilePaths(t) {
		switch hp.name {
		case "named pipe", "character device", "directory", "procfs", "sysfs":
			files = append(files, hp)
		}
	}
	d := fakeDevice(t, k, 1)
	for _, hp := range files {
		t.Run(hp.name, func(t *testing.T) {
			f, err := os.OpenFile(hp.path, os.O_RDONLY|unix.O_NONBLOCK, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			before := len(k.calls(""))
			_, err = k.sys.AttachFile(context.Background(), f, Options{})
			checkFileBlamed(t, err, hp.words, hp.is)
			checkFileBlamed(t, d.Configure(f, Options{}), hp.words, hp.is)
			checkFileBlamed(t, d.SetFD(f), hp.words, hp.is)
			checkFileBlamed(t, d.ChangeFD(f), hp.words, hp.is)
			if log := k.calls("")[before:]; len(log) != 0 {
				t.Fatalf("devices touched: %q", log)
			}
		})
	}
	t.Run("socket", func(t *testing.T) {
		l, err := net.Listen("unix", filepath.Join(t.TempDir(), "sock"))
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		f, err := l.(*net.UnixListener).File()
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		_, err = k.sys.AttachFile(context.Background(), f, Options{})
		checkFileBlamed(t, err, "is a socket", fs.ErrInvalid)
	})
}

// TestOpenBackingFile checks the descriptor openBackingFile returns: the
// access asked for, close-on-exec, and no O_NONBLOCK left for the loop
// driver's reads and writes; with /proc and without it, where the path is
// opened again and must still name the file checked.
func TestOpenBackingFile(t *testing.T) {
	f := kerneltest.TempFile(t, 1<<20)
	for _, noProc := range []bool{false, true} {
		for _, c := range []struct{ ro, noSymlinks bool }{{false, false}, {true, false}, {false, true}, {true, true}} {
			ro := c.ro
			t.Run(fmt.Sprintf("noProc=%v/readOnly=%v/noSymlinks=%v", noProc, ro, c.noSymlinks), func(t *testing.T) {
				s := newSystem(osKernel{}, "/sys")
				if noProc {
					s.procFD = "/nonexistent/" // a process without /proc
				}
				o := Options{NoSymlinks: c.noSymlinks}
				if ro {
					o.Flags = FlagReadOnly
				}
				fd, err := s.openBackingFile(context.Background(), f.Name(), o)
				if err != nil {
					t.Fatal(err)
				}
				defer closeFD(fd)
				fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
				if err != nil {
					t.Fatal(err)
				}
				want := unix.O_RDWR
				if ro {
					want = unix.O_RDONLY
				}
				if fl&unix.O_ACCMODE != want || fl&unix.O_NONBLOCK != 0 {
					t.Fatalf("flags %#o: want access %#o and no O_NONBLOCK", fl, want)
				}
				if fdfl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil || fdfl&unix.FD_CLOEXEC == 0 {
					t.Fatalf("descriptor flags %#x, %v: want FD_CLOEXEC", fdfl, err)
				}
				var got, st unix.Stat_t
				if err := unix.Fstat(fd, &got); err != nil || unix.Stat(f.Name(), &st) != nil || got.Ino != st.Ino {
					t.Fatalf("opened inode %d, want %d (%v)", got.Ino, st.Ino, err)
				}
			})
		}
	}
	// Without /proc, a path that names another file by the time it is
	// opened again is refused.
	other := kerneltest.TempFile(t, 4096)
	var st unix.Stat_t
	if err := unix.Stat(other.Name(), &st); err != nil {
		t.Fatal(err)
	}
	fd, err := host.openAgain(f.Name(), unix.O_RDONLY, &st, false)
	if err == nil {
		closeFD(fd)
	}
	if !errors.Is(err, unix.ESTALE) || !strings.Contains(err.Error(), "another file") {
		t.Fatalf("openAgain of a switched path = %v, want it refused", err)
	}
}

// BenchmarkOpenBackingFile measures what Attach's checks of a path cost:
// the O_PATH open, fstat, fstatfs, the open through /proc/self/fd, the
// fcntl and the closes, against the plain open and close it replaced.
func BenchmarkOpenBackingFile(b *testing.B) {
	dir := b.TempDir()
	path := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(path, make([]byte, 1<<20), 0o644); err != nil {
		b.Fatal(err)
	}
	b.Run("checked", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			fd, err := host.openBackingFile(context.Background(), path, Options{})
			if err != nil {
				b.Fatal(err)
			}
			closeFD(fd)
		}
	})
	b.Run("plain", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			fd, err := openFD(path, unix.O_RDWR)
			if err != nil {
				b.Fatal(err)
			}
			closeFD(fd)
		}
	})
}

// TestOpenPathNoSymlinks: with NoSymlinks a symbolic link in the last
// component of a path or in a middle one is refused with ELOOP, explained,
// by openat2 and by the walk that stands in for it; ".." is not a link.
func TestOpenPathNoSymlinks(t *testing.T) {
	dir := t.TempDir()
	file, sub := filepath.Join(dir, "file"), filepath.Join(dir, "sub")
	if err := os.WriteFile(file, []byte("data"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(sub, "inner"), []byte("data"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, l := range [][2]string{{"file", "link"}, {"sub", "sublink"}} {
		if err := os.Symlink(l[0], filepath.Join(dir, l[1])); err != nil {
			t.Fatal(err)
		}
	}
	for _, tt := range []struct {
		path string
		ok   bool
	}{
		{file, true},
		{filepath.Join(sub, "inner"), true},
		{sub + "/../file", true},
		{filepath.Join(dir, "link"), false},
		{filepath.Join(dir, "sublink", "inner"), false},
	} {
		for _, how := range []string{"openat2", "walk"} {
			var fd int
			var err error
			if how == "openat2" {
				fd, err = host.openPath(tt.path, unix.O_RDONLY, true)
			} else if fd, err = walkNoSymlinks(tt.path, unix.O_RDONLY); err == unix.ELOOP {
				err = errSymlink
			}
			if err == nil {
				closeFD(fd)
			}
			switch {
			case tt.ok && err != nil:
				t.Errorf("%s %s: %v", how, tt.path, err)
			case !tt.ok && (!errors.Is(err, unix.ELOOP) || !strings.Contains(err.Error(), "NoSymlinks")):
				t.Errorf("%s %s = %v, want ELOOP naming NoSymlinks", how, tt.path, err)
			}
		}
		// Without NoSymlinks every one of them opens.
		if fd, err := host.openPath(tt.path, unix.O_RDONLY, false); err != nil {
			t.Errorf("%s without NoSymlinks: %v", tt.path, err)
		} else {
			closeFD(fd)
		}
	}
}

// TestAttachUntrustedPaths: a path that a caller checked and that was then
// swapped for a symbolic link (to another file it may not bind) is
// refused with NoSymlinks, and a block device with RegularFileOnly, both
// before any loop device is touched.
func TestAttachUntrustedPaths(t *testing.T) {
	t.Parallel()
	k := useFake(t, 2)
	dir := t.TempDir()
	path := filepath.Join(dir, "image")
	if err := os.WriteFile(path, make([]byte, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	if st, err := os.Lstat(path); err != nil || !st.Mode().IsRegular() { // the caller's check
		t.Fatal(st, err)
	}
	secret := filepath.Join(dir, "secret")
	if err := os.WriteFile(secret, make([]byte, 4096), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(secret, path); err != nil {
		t.Fatal(err)
	}
	_, err := k.sys.Attach(context.Background(), path, Options{NoSymlinks: true})
	if !errors.Is(err, unix.ELOOP) || !errors.Is(err, fs.ErrInvalid) || errors.Is(err, ErrBusy) {
		t.Fatalf("Attach of a path swapped for a symbolic link = %v, want ELOOP", err)
	}
	if log := k.calls("open /dev/loop"); len(log) != 0 {
		t.Fatalf("opened %q", log)
	}
	var blk string
	for _, p := range []string{"/dev/loop0", "/dev/loop1", "/dev/vda", "/dev/sda", "/dev/ram0"} {
		if st, err := os.Stat(p); err == nil && st.Mode()&os.ModeDevice != 0 && st.Mode()&os.ModeCharDevice == 0 {
			blk = p
			break
		}
	}
	if blk == "" {
		t.Skip("no block device node to try RegularFileOnly with")
	}
	if _, err := k.sys.Attach(context.Background(), blk, Options{RegularFileOnly: true, Flags: FlagReadOnly}); !errors.Is(err, fs.ErrInvalid) ||
		!strings.Contains(err.Error(), "RegularFileOnly") {
		t.Fatalf("Attach of %s with RegularFileOnly = %v, want it refused", blk, err)
	}
	if log := k.calls("open /dev/loop"); len(log) != 0 {
		t.Fatalf("opened %q", log)
	}
}
