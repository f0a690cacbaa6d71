//go:build integration

package uevent

import (
	"fmt"
	"strconv"
	"testing"

	"github.com/loopctl/loopctl"
	"github.com/loopctl/loopctl/internal/kerneltest"
	"golang.org/x/sys/unix"
)

// TestKernelMonitorForged: a uevent sent to the kernel's group by a
// process, root's own, is not the kernel's, and is not reported.
func TestKernelMonitorForged(t *testing.T) {
	m := openMonitor(t)
	c := openControl(t)
	d := newDevice(t, c)
	expect(t, m, d.Number(), "add", Event{Kind: EventAdded, Number: d.Number(), DiskSeq: kerneltest.DiskSeq(t, d.Number())})
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_KOBJECT_UEVENT)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	path := loopDevpath + strconv.Itoa(d.Number())
	forged := fmt.Sprintf("remove@%s\x00ACTION=remove\x00DEVPATH=%s\x00SUBSYSTEM=block\x00DEVTYPE=disk\x00SEQNUM=1\x00", path, path)
	if err := unix.Sendto(fd, []byte(forged), 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: 1}); err != nil {
		t.Fatalf("sending a forged uevent: %v", err)
	}
	// The next event of the device is the real one that follows.
	f := kerneltest.TempFile(t, 1<<20)
	if err := d.Configure(f, loopctl.Options{}); err != nil {
		t.Fatal(err)
	}
	seq, _ := d.DiskSeq()
	expect(t, m, d.Number(), "bind after a forged remove", Event{Kind: EventBound, Number: d.Number(), DiskSeq: seq})
}

// TestKernelMonitorLost: with a receive buffer too small for the burst
// (as a process without the right to enlarge it may get), the kernel
// drops events, and Next says so with an EventLost; what it reports
// after follows from the devices' state then.
func TestKernelMonitorLost(t *testing.T) {
	m := openMonitor(t)
	rc, err := m.f.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 4096) }); err != nil || serr != nil {
		t.Fatal(err, serr)
	}
	numbers := bindAndClose(t, 300)
	lost := 0
	state := map[int]bool{}
	handle := func(e Event) {
		switch e.Kind {
		case EventLost:
			lost++
			if e.Number != -1 {
				t.Fatalf("EventLost of device %d", e.Number)
			}
			clear(state)
		case EventBound, EventUnbound:
			bound := e.Kind == EventBound
			if was, ok := state[e.Number]; ok && was == bound {
				t.Fatalf("loop%d reported %s twice in a row after a loss", e.Number, e.Kind)
			}
			state[e.Number] = bound
		}
	}
	// All that is queued, the overflow with it; then, with room in the
	// buffer again, up to a sentinel's event.
	drainQueued(t, m, handle)
	readPastSentinel(t, m, handle)
	if lost == 0 {
		t.Fatal("300 binds into a 4 KiB buffer, and no EventLost")
	}
	for n := range numbers {
		if state[n] {
			t.Fatalf("loop%d last reported bound; it is not", n)
		}
	}
}
