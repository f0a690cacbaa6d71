//go:build integration

package loopctl

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/kerneltest"
	"github.com/loopctl/loopctl/internal/sysfs"
)

// The kill test: a process SIGKILLed anywhere inside Attach. With
// FlagAutoClear the kernel detaches the device when the dead process's
// descriptors close, whatever the point; without it, a process killed after
// LOOP_CONFIGURE leaves its binding, which FindByBackingFile finds. Either
// way no device is left unusable, and no lock held.

const killChildEnv = "LOOPCTL_KILL_CHILD"

// killConfig is what a child of the kill test is told: attach File, and
// SIGKILL itself just before (or After) its At-th system call on a loop
// node; At 0 kills nowhere. With Loop it attaches and closes until killed.
type killConfig struct {
	File      string
	At        int64
	After     bool
	AutoClear bool
	Loop      bool
}

// A killKernel is the real kernel that kills its process at one call.
type killKernel struct {
	cfg   killConfig
	calls atomic.Int64
}

// call makes one system call, fn, named name, killing the process around
// it if due. It tells the parent each call before it is made.
func (k *killKernel) call(name string, fn func()) {
	i := k.calls.Add(1)
	fmt.Printf("call %d %s\n", i, name)
	if i == k.cfg.At && !k.cfg.After {
		killSelf()
	}
	fn()
	if i == k.cfg.At && k.cfg.After {
		killSelf()
	}
}

func killSelf() {
	unix.Kill(unix.Getpid(), unix.SIGKILL)
	select {}
}

func (k *killKernel) open(path string, mode int) (h handle, err error) {
	k.call("open "+path, func() { h, err = osKernel{}.open(path, mode) })
	if err != nil {
		return nil, err
	}
	return &killHandle{handle: h, k: k}, nil
}

type killHandle struct {
	handle
	k *killKernel
}

func (h *killHandle) rawIoctl(req uint, arg uintptr) (r int, err error) {
	h.k.call(reqNames[req], func() { r, err = h.handle.rawIoctl(req, arg) })
	return r, err
}

func (h *killHandle) rawIoctlPtr(req uint, arg unsafe.Pointer) (err error) {
	h.k.call(reqNames[req], func() { err = h.handle.rawIoctlPtr(req, arg) })
	return err
}

func (h *killHandle) flock(how int) (err error) {
	h.k.call(fmt.Sprintf("flock %#x", how), func() { err = h.handle.flock(how) })
	return err
}

// killChild is the child: Attach through a killKernel, then exit without
// closing anything, as a crashing program would.
func killChild(t *testing.T, cfg killConfig) {
	s := newSystem(&killKernel{cfg: cfg}, sysfs.Root)
	o := Options{}
	if cfg.AutoClear {
		o.Flags = FlagAutoClear
	}
	if cfg.Loop {
		fmt.Println("looping") // the parent's kill timer starts now
	}
	for {
		d, err := s.Attach(context.Background(), cfg.File, o)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Printf("attached %d\n", d.Number())
		if !cfg.Loop {
			os.Exit(0)
		}
		d.Close()
	}
}

func TestKernelAttachKilled(t *testing.T) {
	if s := os.Getenv(killChildEnv); s != "" {
		var cfg killConfig
		if err := json.Unmarshal([]byte(s), &cfg); err != nil {
			t.Fatal(err)
		}
		killChild(t, cfg)
		return
	}
	kerneltest.Require(t)
	f := kerneltest.TempFile(t, 1<<20)
	kills := 0
	for _, autoClear := range []bool{true, false} {
		for at := int64(1); ; at++ {
			for _, after := range []bool{false, true} {
				cfg := killConfig{File: f.Name(), At: at, After: after, AutoClear: autoClear}
				out, killed := runKillChild(t, cfg, 0)
				calls := killedCalls(out)
				if len(calls) == 0 {
					t.Fatalf("child %+v made no call:\n%s", cfg, out)
				}
				// Whether LOOP_CONFIGURE returned before the kill, in this
				// child: a call is told before it is made, and the last one
				// told was made only when the kill came after it. Where a
				// call falls varies: udev probing the device adds the
				// flocks that wait for it.
				i := slices.Index(calls, "LOOP_CONFIGURE")
				configured := i >= 0 && (i < len(calls)-1 || after || !killed)
				left := checkAfterKill(t, f.Name(), out, autoClear)
				if want := !autoClear && (configured || !killed); left != want {
					t.Errorf("killed %+v, after the calls %q: binding left %v, want %v", cfg, calls, left, want)
				}
				if !killed {
					// Attach made fewer than at calls: every point done.
					t.Logf("autoclear %v: killed before and after each of the %d calls of an Attach: %q",
						autoClear, at-1, calls)
					goto next
				}
				kills++
			}
		}
	next:
	}
	// At random moments, inside and between Attach calls.
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 0))
	inside := 0
	for range 40 {
		out, _ := runKillChild(t, killConfig{File: f.Name(), AutoClear: true, Loop: true},
			time.Duration(rng.IntN(20000))*time.Microsecond)
		checkAfterKill(t, f.Name(), out, true)
		kills++
		if lines := strings.Split(strings.TrimSpace(out), "\n"); strings.HasPrefix(lines[len(lines)-1], "call ") {
			inside++
		}
	}
	t.Logf("%d processes killed, %d of them at random moments (%d inside an Attach); nothing left bound or stuck",
		kills, 40, inside)
}

// killedCalls returns the names of the calls a kill child made, in order.
func killedCalls(out string) []string {
	var calls []string
	for _, line := range strings.Split(out, "\n") {
		if f := strings.SplitN(line, " ", 3); len(f) == 3 && f[0] == "call" {
			name := f[2]
			if strings.HasPrefix(name, "open /dev/loop") && name != "open "+ControlPath {
				name = "open /dev/loopN"
			}
			calls = append(calls, name)
		}
	}
	return calls
}

// runKillChild runs a child and, with a delay, SIGKILLs it that long after
// it starts looping (however long it takes to start: under emulation, much
// longer than the delay). It returns the child's output and whether it died
// by SIGKILL.
func runKillChild(t *testing.T, cfg killConfig, delay time.Duration) (string, bool) {
	t.Helper()
	b, _ := json.Marshal(cfg)
	cmd := exec.Command(os.Args[0], "-test.run=^TestKernelAttachKilled$", "-test.count=1")
	cmd.Env = append(os.Environ(), killChildEnv+"="+string(b))
	var out, stderr bytes.Buffer // apart: exec fills stderr while this reads stdout
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		out.WriteString(sc.Text() + "\n")
		if sc.Text() == "looping" && delay > 0 {
			timer := time.AfterFunc(delay, func() { cmd.Process.Signal(syscall.SIGKILL) })
			defer timer.Stop()
		}
	}
	err = cmd.Wait()
	out.Write(stderr.Bytes())
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL {
			return out.String(), true
		}
	}
	if err != nil {
		t.Fatalf("child %+v: %v\n%s", cfg, err, out.String())
	}
	return out.String(), false
}

// checkAfterKill checks, once a child is dead, that no device is left
// bound to file but one the child attached without autoclear, which it
// then clears, reporting it; and that the last device the child opened can
// be opened and bound again.
func checkAfterKill(t *testing.T, file, out string, autoClear bool) (left bool) {
	t.Helper()
	last := -1
	for _, line := range strings.Split(out, "\n") {
		fmt.Sscanf(line, "call %d open /dev/loop%d", new(int), &last)
	}
	found, err := FindByBackingFile(file)
	if err != nil {
		t.Fatal(err)
	}
	if autoClear {
		// The dead process's descriptors are closed; another opener
		// (udev probing the device after its bind) may hold it a moment
		// longer, and the detach waits for it.
		for _, s := range found {
			kerneltest.WaitUnbound(t, s.Number)
		}
		if found, err = FindByBackingFile(file); err != nil {
			t.Fatal(err)
		}
	}
	if autoClear && len(found) != 0 || len(found) > 1 {
		t.Fatalf("left bound to %s: %+v\n%s", file, found, out)
	}
	if len(found) == 1 {
		// Without autoclear the binding outlives its process: what a
		// caller must clean up after a crash.
		d, err := OpenDevice(found[0].Number)
		if err != nil {
			t.Fatal(err)
		}
		detach(t, d)
	}
	if last >= 0 {
		checkUsable(t, last, file)
	}
	return len(found) == 1
}

// checkUsable checks that device n opens and, unbound, takes a binding.
func checkUsable(t *testing.T, n int, file string) {
	t.Helper()
	d, err := OpenDevice(n)
	if err != nil {
		t.Fatalf("loop%d after the kill: %v", n, err)
	}
	defer detach(t, d)
	if _, err := d.Status(); !errors.Is(err, ErrNotBound) {
		return // bound by another process since: not stuck
	}
	g, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	if err := d.Configure(g, Options{Flags: FlagReadOnly}); err != nil && !errors.Is(err, ErrBusy) {
		t.Fatalf("binding loop%d after the kill: %v", n, err)
	}
}
