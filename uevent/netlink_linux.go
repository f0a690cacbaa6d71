package uevent

import (
	"context"
	"errors"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/call"
)

// The netlink groups of NETLINK_KOBJECT_UEVENT: the kernel sends its
// uevents to the first, udev what it processed of them to the second.
const (
	kernelGroup = 1
	udevGroup   = 2
)

// openNetlinkGroup opens a uevent socket on multicast group g (1: the
// kernel's events; 2: udev's), with the senders' credentials passed,
// non-blocking for the runtime's poller, and a receive buffer of rcvBuf
// bytes where that is not 0 (forced as root, else as large as allowed).
func openNetlinkGroup(g uint32, rcvBuf int) (*os.File, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, unix.NETLINK_KOBJECT_UEVENT)
	if err != nil {
		return nil, os.NewSyscallError("socket", err)
	}
	if rcvBuf != 0 && unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, rcvBuf) != nil {
		unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, rcvBuf)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PASSCRED, 1); err != nil {
		unix.Close(fd)
		return nil, os.NewSyscallError("setsockopt", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: g}); err != nil {
		unix.Close(fd)
		return nil, os.NewSyscallError("bind", err)
	}
	return os.NewFile(uintptr(fd), "uevent"), nil
}

// longAgo is a read deadline that has passed: it wakes a read at once.
var longAgo = time.Unix(1, 0)

// recvNetlink receives one message on the netlink socket f, waiting as
// long as ctx allows: ctx's error when it ends first, recvmsg's errno
// (ENOBUFS: messages were dropped) as it is, and EMSGSIZE for a message
// longer than buf (MSG_TRUNC), whose rest is lost.
func recvNetlink(ctx context.Context, f *os.File, buf, oob []byte) (n, oobn int, from unix.Sockaddr, err error) {
	if err := ctx.Err(); err != nil {
		return 0, 0, nil, err
	}
	deadline, _ := ctx.Deadline()
	if err := f.SetReadDeadline(deadline); err != nil {
		return 0, 0, nil, err
	}
	stop := context.AfterFunc(ctx, func() { f.SetReadDeadline(longAgo) })
	defer stop()
	rc, err := f.SyscallConn()
	if err != nil {
		return 0, 0, nil, err
	}
	var rerr error
	var flags int
	err = rc.Read(func(fd uintptr) bool {
		rerr = call.Retry(func() (err error) {
			n, oobn, flags, from, err = unix.Recvmsg(int(fd), buf, oob, 0)
			return err
		})
		return rerr != unix.EAGAIN
	})
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		// ctx's deadline, which the poller may see a moment before ctx
		// does, or its cancellation.
		<-ctx.Done()
		return 0, 0, nil, ctx.Err()
	case err != nil:
		return 0, 0, nil, err
	case rerr != nil:
		return 0, 0, nil, rerr
	case flags&unix.MSG_TRUNC != 0:
		return 0, 0, nil, unix.EMSGSIZE
	}
	return n, oobn, from, nil
}

// fromKernel tells whether a message came from the kernel: its sender's
// port is 0, and its credentials, which the kernel fills in for any
// sender, are uid 0's.
func fromKernel(from unix.Sockaddr, oob []byte) bool {
	sa, ok := from.(*unix.SockaddrNetlink)
	return ok && sa.Pid == 0 && fromRoot(oob)
}

// fromRoot tells whether a message's credentials are root's.
func fromRoot(oob []byte) bool {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return false
	}
	for i := range msgs {
		if cred, err := unix.ParseUnixCredentials(&msgs[i]); err == nil {
			return cred.Uid == 0
		}
	}
	return false
}

// recvError names the call that failed for an errno from recvNetlink.
func recvError(err error) error {
	if errno, ok := err.(syscall.Errno); ok {
		return os.NewSyscallError("recvmsg", errno)
	}
	return err
}
