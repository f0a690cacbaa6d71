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
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/sysfs"

	"github.com/loopctl/loopctl/internal/kerneltest"
)

// The churn test is the workload the package exists for: many processes
// attaching and detaching at once, with other tools beside them. K child
// processes of G goroutines each loop Attach (random options, sometimes a
// context cancelled mid-way) / check the binding is the caller's / write and
// read a block through the device / ClearFD or Close with autoclear, while an
// observer in each process lists and opens the test's devices, util-linux
// losetup attaches and detaches its own files, and a helper process follows
// systemd's lock protocol.
//
// It runs for LOOPCTL_CHURN_DURATION (a Go duration such as "5m"), else 3 s
// with -short and 30 s otherwise. LOOPCTL_CHURN_REPORT names a file that
// receives the figures as JSON (RELIABILITY.md quotes them).

const (
	churnChildEnv   = "LOOPCTL_CHURN_CHILD"   // JSON churnConfig: run as a churn process
	systemdChildEnv = "LOOPCTL_SYSTEMD_CHILD" // JSON churnConfig: run the systemd-protocol helper
)

// churnConfig is what a child process of the churn test is told.
type churnConfig struct {
	Dir        string
	Goroutines int
	Deadline   time.Time
	Seed       uint64
	Observe    bool // run an observer beside the attachers
	Sweep      bool // run a sweeper beside the attachers
}

// churnCounts is what a party of the churn test reports. Errors keeps the
// first failures' messages.
type churnCounts struct {
	Attaches, Failures, Collisions, Cancelled, LostRaces int
	ReadOnly, AutoClearClose, Observed                   int
	Swept, Foreign                                       int // Sweep's: its own bindings, and others'
	LeakedFDs, LeakedGoroutines                          int
	Errors                                               []string
}

func (c *churnCounts) add(o churnCounts) {
	c.Attaches += o.Attaches
	c.Failures += o.Failures
	c.Collisions += o.Collisions
	c.Cancelled += o.Cancelled
	c.LostRaces += o.LostRaces
	c.ReadOnly += o.ReadOnly
	c.AutoClearClose += o.AutoClearClose
	c.Observed += o.Observed
	c.Swept += o.Swept
	c.Foreign += o.Foreign
	c.LeakedFDs += o.LeakedFDs
	c.LeakedGoroutines += o.LeakedGoroutines
	c.Errors = append(c.Errors, o.Errors...)
	if len(c.Errors) > 10 {
		c.Errors = c.Errors[:10]
	}
}

// tally is churnCounts shared by a process's goroutines.
type tally struct {
	mu sync.Mutex
	churnCounts
}

func (t *tally) fail(collision bool, format string, args ...any) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if collision {
		t.Collisions++
	} else {
		t.Failures++
	}
	if len(t.Errors) < 10 {
		t.Errors = append(t.Errors, fmt.Sprintf(format, args...))
	}
}

func (t *tally) count(f func(c *churnCounts)) {
	t.mu.Lock()
	defer t.mu.Unlock()
	f(&t.churnCounts)
}

// A child is a copy of the test binary running one test in a child mode.
type child struct {
	cmd *exec.Cmd
	out bytes.Buffer
}

// startChild runs test name again with env set to cfg as JSON.
func startChild(t *testing.T, name, env string, cfg churnConfig) *child {
	t.Helper()
	b, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	c := &child{cmd: exec.Command(os.Args[0], "-test.run=^"+name+"$", "-test.count=1")}
	c.cmd.Env = append(os.Environ(), env+"="+string(b))
	c.cmd.Stdout, c.cmd.Stderr = &c.out, &c.out
	if err := c.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.cmd.Process.Kill(); c.cmd.Wait() })
	return c
}

// wait waits for the child and returns the counts it reported.
func (c *child) wait(t *testing.T) churnCounts {
	t.Helper()
	err := c.cmd.Wait()
	var counts churnCounts
	found := false
	sc := bufio.NewScanner(bytes.NewReader(c.out.Bytes()))
	for sc.Scan() {
		if js, ok := strings.CutPrefix(sc.Text(), "churn-result "); ok {
			found = json.Unmarshal([]byte(js), &counts) == nil
		}
	}
	if err != nil || !found {
		t.Errorf("child %v: %v, result reported: %v\n%s", c.cmd.Args, err, found, c.out.String())
	}
	return counts
}

// report prints a party's counts for its parent.
func report(c churnCounts) {
	b, _ := json.Marshal(c)
	fmt.Printf("churn-result %s\n", b)
}

// childConfig decodes the config of a child mode, or reports false.
func childConfig(t *testing.T, env string) (churnConfig, bool) {
	s := os.Getenv(env)
	if s == "" {
		return churnConfig{}, false
	}
	var cfg churnConfig
	if err := json.Unmarshal([]byte(s), &cfg); err != nil {
		t.Fatal(err)
	}
	return cfg, true
}

func TestKernelChurn(t *testing.T) {
	if cfg, ok := childConfig(t, churnChildEnv); ok {
		report(churnProcess(t, cfg))
		return
	}
	if cfg, ok := childConfig(t, systemdChildEnv); ok {
		report(systemdProcess(cfg))
		return
	}
	kerneltest.Require(t)
	const procs, goroutines = 4, 8
	dir := t.TempDir()
	d := kerneltest.ChurnDuration(t)
	start := time.Now()
	deadline := start.Add(d)
	var children []*child
	for i := range procs {
		children = append(children, startChild(t, "TestKernelChurn", churnChildEnv,
			churnConfig{Dir: dir, Goroutines: goroutines, Deadline: deadline, Seed: uint64(start.UnixNano()) + uint64(i),
				Observe: i%2 == 0, Sweep: i%2 == 1}))
	}
	systemd := startChild(t, "TestKernelChurn", systemdChildEnv, churnConfig{Dir: dir, Goroutines: 2, Deadline: deadline})
	var plain, locked churnCounts
	var wg sync.WaitGroup
	wg.Go(func() { plain = losetupChurn(t, dir, deadline, false) })
	wg.Go(func() { locked = losetupChurn(t, dir, deadline, true) })
	wg.Wait()

	var total churnCounts
	for _, c := range children {
		total.add(c.wait(t))
	}
	sd := systemd.wait(t)
	elapsed := time.Since(start)
	leaked := boundUnder(t, dir)

	t.Logf("loopctl: %d processes x %d goroutines, %v: %d attaches (%.0f/s), %d failures, %d collisions, "+
		"%d lost races retried, %d cancelled, %d read-only, %d closed with autoclear, %d observed by List/OpenBinding, "+
		"%d swept, %d foreign bindings swept, leaked: %d devices, %d fds, %d goroutines",
		procs, goroutines, elapsed.Round(time.Second), total.Attaches, float64(total.Attaches)/elapsed.Seconds(),
		total.Failures, total.Collisions, total.LostRaces, total.Cancelled, total.ReadOnly, total.AutoClearClose,
		total.Observed, total.Swept, total.Foreign, len(leaked), total.LeakedFDs, total.LeakedGoroutines)
	t.Logf("systemd protocol helper: %d attaches, %d lost races retried, %d failures, %d collisions",
		sd.Attaches, sd.LostRaces, sd.Failures, sd.Collisions)
	t.Logf("losetup -f / -d: %d attaches, %d failures, %d collisions; under flock(1): %d attaches, %d failures, %d collisions",
		plain.Attaches, plain.Failures, plain.Collisions, locked.Attaches, locked.Failures, locked.Collisions)
	for _, e := range slices.Concat(total.Errors, sd.Errors, plain.Errors, locked.Errors) {
		t.Log("  ", e)
	}
	writeReport(t, map[string]any{"duration": elapsed.String(), "processes": procs, "goroutines": goroutines,
		"loopctl": total, "systemd": sd, "losetup": plain, "flock_losetup": locked,
		"leaked_devices": len(leaked), "kernel": kerneltest.Release()})

	if total.Attaches == 0 || total.Failures != 0 || total.Collisions != 0 || total.LeakedFDs != 0 || total.LeakedGoroutines != 0 ||
		total.Swept == 0 || total.Foreign != 0 {
		t.Errorf("loopctl churn: %+v", total)
	}
	if sd.Attaches == 0 || sd.Failures != 0 || sd.Collisions != 0 {
		t.Errorf("systemd protocol helper: %+v", sd)
	}
	// Plain losetup retries only EBUSY, so it fails when a device it was
	// given is detached before it opens it: its failures are counted, not
	// asserted. Under flock(1) it takes turns with every other party but
	// plain losetup.
	if plain.Attaches+plain.Failures == 0 || plain.Collisions != 0 || locked.Attaches == 0 || locked.Collisions != 0 {
		t.Errorf("losetup: %+v; under flock(1): %+v", plain, locked)
	}
	if len(leaked) != 0 {
		t.Errorf("left bound: %v", leaked)
	}
}

// writeReport writes the churn figures to LOOPCTL_CHURN_REPORT, if set.
func writeReport(t *testing.T, v any) {
	path := os.Getenv("LOOPCTL_CHURN_REPORT")
	if path == "" {
		return
	}
	b, _ := json.MarshalIndent(v, "", "  ")
	if err := os.WriteFile(path, append(b, '\n'), 0o644); err != nil {
		t.Error(err)
	}
}

// boundUnder lists, from sysfs itself, the devices bound to files in dir:
// not through List, which leaves out a device being torn down.
func boundUnder(t *testing.T, dir string) []string {
	t.Helper()
	nums, err := sysfs.LoopNumbers(sysfs.Root)
	if err != nil {
		t.Fatal(err)
	}
	var buf [sysfs.BufSize]byte
	var out []string
	for _, n := range nums {
		b, err := sysfs.ReadFile(sysfs.LoopAttr(sysfs.Root, n, "backing_file"), buf[:])
		if err == nil && strings.HasPrefix(sysfs.Value(b), dir) {
			out = append(out, fmt.Sprintf("loop%d: %s", n, sysfs.Value(b)))
		}
	}
	return out
}

// churnProcess is one churn process: cfg.Goroutines attachers and one
// observer until cfg.Deadline, then its leak checks.
func churnProcess(t *testing.T, cfg churnConfig) churnCounts {
	// Internal state: the control device Attach keeps once made, opened
	// first so that the leak check's descriptor count leaves it out.
	if _, err := host.sharedControl(); err != nil {
		t.Fatal(err)
	}
	fds := len(kerneltest.OpenFDs(t))
	goroutines := runtime.NumGoroutine()
	var tl tally
	var wg sync.WaitGroup
	for g := range cfg.Goroutines {
		rng := rand.New(rand.NewPCG(cfg.Seed, uint64(g)))
		id := fmt.Sprintf("%d-%d", os.Getpid(), g)
		wg.Go(func() { churnWorker(&tl, cfg, id, rng) })
	}
	if cfg.Observe {
		// An observer never pauses. One in every process would, on two
		// cores, mostly measure how often the attach lock's holder is
		// preempted: half of them are enough.
		wg.Go(func() { observe(&tl, cfg) })
	}
	if cfg.Sweep {
		wg.Go(func() { sweeper(&tl, cfg, strconv.Itoa(os.Getpid())) })
	}
	wg.Wait()
	tl.LostRaces = int(host.lostRaces.Load()) // internal: no API tells a race retried
	if after := len(kerneltest.OpenFDs(t)); after != fds {
		tl.LeakedFDs = after - fds
		tl.fail(false, "%d descriptors before, %d after", fds, after)
	}
	if n := settledGoroutines(goroutines); n > goroutines {
		tl.LeakedGoroutines = n - goroutines
		tl.fail(false, "%d goroutines before, %d after:\n%s", goroutines, n, allStacks())
	}
	return tl.churnCounts
}

// settledGoroutines waits, a bounded while, for goroutines that have
// finished their work to exit, and returns how many remain.
func settledGoroutines(want int) int {
	for end := time.Now().Add(5 * time.Second); time.Now().Before(end); {
		if n := runtime.NumGoroutine(); n <= want {
			return n
		}
		runtime.Gosched()
	}
	return runtime.NumGoroutine()
}

func allStacks() string {
	buf := make([]byte, 1<<20)
	return string(buf[:runtime.Stack(buf, true)])
}

// churnOptions picks random binding options.
func churnOptions(rng *rand.Rand) Options {
	o := Options{
		Offset:    [...]uint64{0, 4096, 64 << 10}[rng.IntN(3)],
		SizeLimit: [...]uint64{0, 256 << 10, 512 << 10}[rng.IntN(3)],
		BlockSize: [...]uint32{0, 512, 1024, 4096}[rng.IntN(4)],
	}
	if rng.IntN(4) == 0 {
		o.Flags |= FlagReadOnly
	}
	if rng.IntN(2) == 0 {
		o.Flags |= FlagAutoClear
	}
	if rng.IntN(8) == 0 {
		o.Flags |= FlagPartScan
	}
	return o
}

// churnWorker loops attach / check / I/O / detach on its own file.
func churnWorker(tl *tally, cfg churnConfig, id string, rng *rand.Rand) {
	path := filepath.Join(cfg.Dir, id+"-"+kerneltest.LongName)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		tl.fail(false, "%v", err)
		return
	}
	defer f.Close()
	if err := f.Truncate(1 << 20); err != nil {
		tl.fail(false, "%v", err)
		return
	}
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		tl.fail(false, "%v", err)
		return
	}
	for round := 0; time.Now().Before(cfg.Deadline); round++ {
		o := churnOptions(rng)
		o.Ref = churnRef()
		tag := blockTag(id, round, "file")
		if _, err := f.WriteAt(tag, int64(o.Offset)); err != nil {
			tl.fail(false, "%v", err)
			return
		}
		ctx, cancel := context.WithCancel(context.Background())
		cancelled := rng.IntN(8) == 0
		if cancelled {
			time.AfterFunc(time.Duration(rng.IntN(300))*time.Microsecond, cancel)
		}
		d, err := Attach(ctx, path, o)
		cancel()
		if err != nil {
			if cancelled && errors.Is(err, context.Canceled) {
				tl.count(func(c *churnCounts) { c.Cancelled++ })
				continue
			}
			tl.fail(false, "attach %+v: %v", o, err)
			continue
		}
		tl.count(func(c *churnCounts) {
			c.Attaches++
			if o.Flags&FlagReadOnly != 0 {
				c.ReadOnly++
			}
		})
		checkChurnDevice(tl, d, f, st, o, id, round)
		if o.Flags&FlagAutoClear != 0 && rng.IntN(2) == 0 {
			tl.count(func(c *churnCounts) { c.AutoClearClose++ })
		} else if err := d.ClearFD(); err != nil {
			tl.fail(false, "%v", err)
		}
		if err := d.Close(); err != nil {
			tl.fail(false, "%v", err)
		}
	}
}

// churnRef is the owner reference of this churn process's bindings.
func churnRef() string { return "churn-" + strconv.Itoa(os.Getpid()) }

// sweeper plays a runtime that crashes and starts again, over and over,
// beside every other party's churn: it binds three files of its own with
// its owner reference, lets go of them without a detach, as a crash does,
// and sweeps its reference. Sweep must detach exactly those three, each
// time: never a binding of another reference, nor one bound anew.
func sweeper(tl *tally, cfg churnConfig, id string) {
	ref := "churn-crashed-" + id
	mine := map[backingFileID]bool{}
	var files []*os.File
	for i := range 3 {
		f, err := os.Create(filepath.Join(cfg.Dir, fmt.Sprintf("sweep-%s-%d.img", id, i)))
		if err != nil {
			tl.fail(false, "%v", err)
			return
		}
		defer f.Close()
		var st unix.Stat_t
		if err := f.Truncate(256 << 10); err != nil || unix.Fstat(int(f.Fd()), &st) != nil {
			tl.fail(false, "sweeper's file: %v", err)
			return
		}
		files = append(files, f)
		mine[backingFileID{uint64(st.Dev), uint64(st.Ino)}] = true
	}
	for time.Now().Before(cfg.Deadline) {
		for _, f := range files {
			d, err := AttachFile(context.Background(), f, Options{Ref: ref})
			if err != nil {
				tl.fail(false, "sweeper's attach: %v", err)
				return
			}
			d.Close() // the crash: bound, held by nobody
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		swept, err := Sweep(ctx, ref)
		cancel()
		if err != nil {
			tl.fail(false, "Sweep: %v", err)
		}
		own := 0
		for _, s := range swept {
			if s.Ref != ref || !mine[backingFileID{s.BackingDevice, s.BackingInode}] {
				tl.count(func(c *churnCounts) { c.Foreign++ })
				tl.fail(true, "Sweep(%s) detached %+v", ref, s)
				continue
			}
			own++
		}
		tl.count(func(c *churnCounts) { c.Swept += own })
		if own != len(files) {
			tl.fail(false, "Sweep(%s) detached %d of the sweeper's %d bindings: %+v", ref, own, len(files), swept)
			return
		}
		for _, f := range files {
			if left, err := FindByBackingFile(f.Name()); err != nil || len(left) != 0 {
				tl.fail(false, "after Sweep(%s), %s: %+v, %v", ref, f.Name(), left, err)
				return
			}
		}
	}
}

// blockTag is a 512-byte block naming its writer and round.
func blockTag(id string, round int, what string) []byte {
	b := make([]byte, 512)
	copy(b, fmt.Sprintf("%s round %d %s", id, round, what))
	return b
}

// checkChurnDevice checks that d is bound to f with o, that a block read
// through d is the one just written to f, and that a block written through
// d lands in f (or is refused, read-only).
func checkChurnDevice(tl *tally, d *Device, f *os.File, st unix.Stat_t, o Options, id string, round int) {
	s, err := d.Status()
	if err != nil {
		tl.fail(false, "%v", err)
		return
	}
	if s.BackingDevice != uint64(st.Dev) || s.BackingInode != uint64(st.Ino) || s.BackingFile != f.Name() ||
		s.Offset != o.Offset || s.SizeLimit != o.SizeLimit || s.Flags&^FlagDirectIO != o.Flags || s.Ref != o.Ref {
		tl.fail(true, "%s: %+v, want %s (inode %d) with %+v", d.Path(), s, f.Name(), st.Ino, o)
		return
	}
	fd := d.h.(*fileHandle).fd
	got := make([]byte, 512)
	if _, err := unix.Pread(fd, got, 0); err != nil {
		tl.fail(false, "read %s: %v", d.Path(), err)
		return
	}
	if want := blockTag(id, round, "file"); !bytes.Equal(got, want) {
		tl.fail(true, "%s block 0 holds %q, want %q", d.Path(), bytes.TrimRight(got, "\x00"), bytes.TrimRight(want, "\x00"))
		return
	}
	tag := blockTag(id, round, "device")
	_, err = unix.Pwrite(fd, tag, 4096)
	if o.Flags&FlagReadOnly != 0 {
		// A read-only binding is held through a read-only descriptor
		// (the binding's read-only flag is checked above).
		if !errors.Is(err, unix.EBADF) {
			tl.fail(false, "write to read-only %s: %v, want EBADF (a read-only descriptor)", d.Path(), err)
		}
		return
	}
	if err == nil {
		err = unix.Fsync(fd)
	}
	if err != nil {
		tl.fail(false, "write %s: %v", d.Path(), err)
		return
	}
	if _, err := f.ReadAt(got, int64(o.Offset)+4096); err != nil || !bytes.Equal(got, tag) {
		tl.fail(true, "%s: block written through %s not in the file: %q, %v", f.Name(), d.Path(), bytes.TrimRight(got, "\x00"), err)
	}
}

// observe lists the test's devices and opens them while they churn: List
// must not fail, nor report a binding whose file is not the one it names;
// OpenBinding of a listed device may find it detached or bound anew since,
// and must then fail with ErrChanged, and with nothing else; when it
// opens one, it is the binding listed. (That List leaves
// out a device already being torn down is TestKernelListRundown's to show:
// here a device listed and then refusing its open may have started its
// teardown after List looked.)
func observe(tl *tally, cfg churnConfig) {
	for time.Now().Before(cfg.Deadline) {
		list, err := List()
		if err != nil {
			tl.fail(false, "List: %v", err)
			return
		}
		for _, s := range list {
			if !strings.HasPrefix(s.BackingFile, cfg.Dir) {
				continue
			}
			var st unix.Stat_t
			if err := unix.Stat(s.BackingFile, &st); err != nil || s.BackingInode != st.Ino || s.BackingDevice != uint64(st.Dev) {
				tl.fail(true, "List: %+v, but %s is inode %d (%v)", s, s.BackingFile, st.Ino, err)
				continue
			}
			tl.count(func(c *churnCounts) { c.Observed++ })
			// The binding listed, or ErrChanged: never another one.
			d, err := OpenBinding(s)
			if err != nil {
				if !errors.Is(err, ErrChanged) {
					tl.fail(false, "OpenBinding(%d) of a listed device: %v", s.Number, err)
				}
				continue
			}
			if got, err := d.Status(); err != nil && !errors.Is(err, ErrNotBound) {
				tl.fail(false, "Status of %s: %v", d.Path(), err)
			} else if err == nil && (got.DiskSeq != s.DiskSeq || got.BackingInode != s.BackingInode) {
				tl.fail(true, "OpenBinding(%+v) opened %+v", s, got)
			}
			d.Close()
		}
	}
}
