package userns

import (
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
)

// TestUserNamespace checks the one test of a user namespace both ways:
// here, and in a child in user and network namespaces of its own, where
// kernel uevents do not arrive.
func TestUserNamespace(t *testing.T) {
	if os.Getenv("LOOPCTL_USERNS_CHILD") != "" {
		if !Inside() || EventsArrive() {
			t.Fatalf("in a user namespace of its own: Inside %v, EventsArrive %v; want true, false",
				Inside(), EventsArrive())
		}
		return
	}
	if initial, err := Initial("/proc/self/ns/user"); err != nil {
		t.Skipf("no namespace files: %v", err)
	} else if !initial {
		t.Skip("the tests run in a user namespace")
	}
	if Inside() || !EventsArrive() {
		t.Fatalf("Inside %v, EventsArrive %v; want false, true", Inside(), EventsArrive())
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestUserNamespace$", "-test.v")
	cmd.Env = append(os.Environ(), "LOOPCTL_USERNS_CHILD=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags:  syscall.CLONE_NEWUSER | syscall.CLONE_NEWNET,
		UidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: os.Getuid(), Size: 1}},
		GidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: os.Getgid(), Size: 1}},
	}
	out, err := cmd.CombinedOutput()
	if err != nil && strings.Contains(err.Error(), "fork/exec") {
		t.Skipf("no user namespace for a child: %v", err)
	}
	if err != nil || !strings.Contains(string(out), "--- PASS") {
		t.Fatalf("child: %v\n%s", err, out)
	}
}
