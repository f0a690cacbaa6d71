package kerneltest

import (
	"bytes"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// A Uevent is one of the kernel's uevents: its action ("add", "change",
// "remove") and its variables (DEVPATH, DEVNAME, ...).
type Uevent struct {
	Action string
	Vars   map[string]string
}

// Uevents reads the kernel's uevents (NETLINK_KOBJECT_UEVENT, group 1),
// as udev does, from the moment ListenUevents returns.
type Uevents struct {
	fd  int
	buf []byte // a uevent's bytes, received
}

// ListenUevents opens a socket of the kernel's uevents for the test,
// closed at its end, with a receive buffer large enough for a few
// seconds of churn: a lost event fails the test (Next).
func ListenUevents(t testing.TB) *Uevents {
	t.Helper()
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_KOBJECT_UEVENT)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 64<<20); err != nil {
		t.Fatal(err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: 1}); err != nil {
		t.Fatal(err)
	}
	return &Uevents{fd: fd, buf: make([]byte, 64<<10)}
}

// Next returns the next kernel uevent, waiting up to d; ok is false when
// none came. An event lost for a full buffer (ENOBUFS) is an error. One
// goroutine at a time calls it.
func (u *Uevents) Next(d time.Duration) (ev Uevent, ok bool, err error) {
	for {
		fds := []unix.PollFd{{Fd: int32(u.fd), Events: unix.POLLIN}}
		n, err := unix.Poll(fds, int(d.Milliseconds()))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return Uevent{}, false, os.NewSyscallError("poll", err)
		}
		if n == 0 {
			return Uevent{}, false, nil
		}
		n, from, err := unix.Recvfrom(u.fd, u.buf, 0)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return Uevent{}, false, os.NewSyscallError("recvfrom", err)
		}
		if sa, ok := from.(*unix.SockaddrNetlink); !ok || sa.Pid != 0 {
			continue // not the kernel's
		}
		if ev, ok := parseUevent(u.buf[:n]); ok {
			return ev, true, nil
		}
	}
}

// parseUevent parses a kernel uevent: "ACTION@DEVPATH", then KEY=VALUE
// strings, each ending in a NUL.
func parseUevent(b []byte) (Uevent, bool) {
	fields := bytes.Split(bytes.TrimRight(b, "\x00"), []byte{0})
	if len(fields) == 0 || !bytes.ContainsRune(fields[0], '@') {
		return Uevent{}, false
	}
	ev := Uevent{Vars: map[string]string{}}
	ev.Action, _, _ = strings.Cut(string(fields[0]), "@")
	for _, f := range fields[1:] {
		if k, v, ok := strings.Cut(string(f), "="); ok {
			ev.Vars[k] = v
		}
	}
	return ev, true
}
