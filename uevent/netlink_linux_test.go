package uevent

import (
	"context"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// TestRecvNetlinkTruncated checks that a message longer than the buffer
// is reported (EMSGSIZE), not returned cut short, and that the next one
// is read whole.
func TestRecvNetlinkTruncated(t *testing.T) {
	t.Parallel()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	r, w := os.NewFile(uintptr(fds[0]), "r"), os.NewFile(uintptr(fds[1]), "w")
	defer r.Close()
	defer w.Close()
	for _, msg := range []string{"a message of thirty-two bytes..", "short"} {
		if _, err := w.Write([]byte(msg)); err != nil {
			t.Fatal(err)
		}
	}
	buf, oob := make([]byte, 16), make([]byte, 64)
	if _, _, _, err := recvNetlink(context.Background(), r, buf, oob); err != unix.EMSGSIZE {
		t.Fatalf("recvNetlink of 32 bytes into 16 = %v, want EMSGSIZE", err)
	}
	n, _, _, err := recvNetlink(context.Background(), r, buf, oob)
	if err != nil || string(buf[:n]) != "short" {
		t.Fatalf("recvNetlink = %q, %v; want \"short\"", buf[:n], err)
	}
}
