// Command bench measures loopctl beside the other ways of doing the same
// work on this machine: C making the same system calls (the limit), Go's
// bare syscalls (Go's floor), util-linux's losetup, the Go peers
// (u-root, containerd, go-losetup) and the example losetup. It prints one
// table from one run and writes it, with the machine, the kernel and the
// date, to BENCHMARKS.md, and the plots as SVG.
//
// It needs root, cc and strace (installed with apt-get when missing), and
// a machine whose loop devices no one else is binding meanwhile:
//
//	cd internal/bench && go run .
//
// Every device it binds is bound with autoclear and detached when it ends,
// however it ends; devices that LOOP_CTL_GET_FREE created for its larger
// counts are removed again once unbound.
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/loopctl/loopctl"
)

var (
	mdPath  = flag.String("md", "../../BENCHMARKS.md", "write the report here")
	svgDir  = flag.String("svg", ".", "write the plots into this directory")
	rounds  = flag.Int("rounds", 9, "measure each row this many times, interleaved with the other rows of its table; the median is reported")
	budget  = flag.Duration("budget", 200*time.Millisecond, "time one measurement of one row for about this long")
	only    = flag.String("only", "", "measure only these parts, comma-separated (tables, scale, data), and write no report")
	quick   = flag.Bool("quick", false, "a short run that checks the harness: one round, 8 to 64 bound devices, 256 none bound, no report written")
	counts  = flag.String("counts", "8,64,256,1024", "bound-device counts for the GetFree-against-scan sweep")
	childOp = flag.String("op", "", "child mode: run this operation -n times and print the nanoseconds per operation")
	childN  = flag.Int("n", 0, "child mode: how many times")
	file    = flag.String("file", "", "child mode: the backing file")
	workers = flag.Int("goroutines", 0, "child mode with -op cycle/loopctl: attach and detach on this many goroutines for -for, then print the cycles made")
	forDur  = flag.Duration("for", time.Second, "child mode: how long -goroutines runs")
)

func main() {
	log.SetFlags(0)
	log.SetPrefix("bench: ")
	flag.Parse()
	if *childOp != "" {
		child()
		return
	}
	if os.Geteuid() != 0 {
		log.Fatal("needs root: it binds loop devices")
	}
	if *quick {
		*rounds, *budget, *counts = 1, 20*time.Millisecond, "8,64"
		*scaleCounts, *scaleNone, *pairs = "16,64", 256, 2
		*dataSize, *dataRounds = 16<<20, 1
	}
	h, err := newHarness()
	if err != nil {
		log.Fatal(err)
	}
	defer h.close()
	if err := h.run(); err != nil {
		h.close()
		log.Fatal(err)
	}
}

// child runs one in-process operation for a parent: under strace, to count
// its system calls, or as the second process of the concurrency table.
func child() {
	o, ok := ops[*childOp]
	if !ok {
		log.Fatalf("no operation %q", *childOp)
	}
	if *workers > 0 {
		n, err := attachFor(*file, *workers, *forDur)
		if err != nil {
			log.Fatal(err)
		}
		fmt.Println(n)
		return
	}
	run, done, err := o.setup(*file)
	if err != nil {
		log.Fatal(err)
	}
	defer done()
	start := time.Now()
	for range *childN {
		if err := run(); err != nil {
			log.Fatal(err)
		}
	}
	fmt.Println(float64(time.Since(start).Nanoseconds()) / float64(max(*childN, 1)))
}

// A harness holds what one run shares: the programs it built, the backing
// file, the devices it bound.
type harness struct {
	dir      string // scratch: programs and the backing file
	floor    string // floor.c, built
	example  string // examples/losetup, built
	first    string // first/, built: one call in a new process
	empty    string // a Go program that does nothing, built
	losetup  string // util-linux's
	file     string // a 1 MiB backing file
	other    string // another, which the attach rows of the scale tables bind
	before   map[int]bool
	bound    []*loopctl.Device
	tables   []*table
	sweep    []sweepPoint
	conc     []concRow
	data     []*dataRow
	devCount int // loop devices on the machine when the run began
	// The scale tables, and the points they are measured at.
	points      []scalePoint
	scaleTables []*scaleTable
}

// buildEmpty builds, in dir, a Go program whose main does nothing: the
// start and exit of a Go process, which no Go program goes below.
func buildEmpty(dir string) (string, error) {
	src := filepath.Join(dir, "empty")
	if err := os.MkdirAll(src, 0o755); err != nil {
		return "", err
	}
	for name, text := range map[string]string{"go.mod": "module empty\n", "main.go": "package main\n\nfunc main() {}\n"} {
		if err := os.WriteFile(filepath.Join(src, name), []byte(text), 0o644); err != nil {
			return "", err
		}
	}
	bin := filepath.Join(dir, "empty-go")
	if out, err := exec.Command("go", "build", "-C", src, "-o", bin, ".").CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build of an empty program: %v\n%s", err, out)
	}
	return bin, nil
}

func newHarness() (*harness, error) {
	h := &harness{losetup: "/usr/sbin/losetup"}
	var err error
	if h.dir, err = os.MkdirTemp("", "loopctl-bench-"); err != nil {
		return nil, err
	}
	if err := ensureStrace(); err != nil {
		return h, err
	}
	h.floor = filepath.Join(h.dir, "floor")
	if out, err := exec.Command("cc", "-O2", "-o", h.floor, "floor/floor.c").CombinedOutput(); err != nil {
		return h, fmt.Errorf("cc floor/floor.c: %v\n%s", err, out)
	}
	h.example = filepath.Join(h.dir, "losetup")
	if out, err := exec.Command("go", "build", "-C", "../..", "-o", h.example, "./examples/losetup").CombinedOutput(); err != nil {
		return h, fmt.Errorf("go build examples/losetup: %v\n%s", err, out)
	}
	h.first = filepath.Join(h.dir, "first")
	if out, err := exec.Command("go", "build", "-o", h.first, "./first").CombinedOutput(); err != nil {
		return h, fmt.Errorf("go build ./first: %v\n%s", err, out)
	}
	if h.empty, err = buildEmpty(h.dir); err != nil {
		return h, err
	}
	h.file = filepath.Join(h.dir, "backing.img")
	if err := os.WriteFile(h.file, make([]byte, 1<<20), 0o644); err != nil {
		return h, err
	}
	if err := h.otherFile(); err != nil {
		return h, err
	}
	h.before = map[int]bool{}
	nums, err := loopNumbers()
	if err != nil {
		return h, err
	}
	h.devCount = len(nums)
	for _, n := range nums {
		h.before[n] = true
	}
	if st, err := loopctl.List(); err != nil || len(st) > 0 {
		return h, fmt.Errorf("want a machine without bound loop devices, found %d (%v): other devices would skew the tables", len(st), err)
	}
	return h, nil
}

// ensureStrace installs strace when it is missing.
func ensureStrace() error {
	if _, err := exec.LookPath("strace"); err == nil {
		return nil
	}
	log.Print("installing strace")
	cmd := exec.Command("apt-get", "install", "-y", "-qq", "strace")
	cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("apt-get install strace: %v\n%s", err, out)
	}
	return nil
}

// close detaches every device the harness bound, removes the devices that
// appeared during the run once they are unbound, and its scratch files.
func (h *harness) close() {
	h.unbind(0)
	if h.before != nil {
		h.removeMade()
		h.before = nil
	}
	if h.dir != "" {
		os.RemoveAll(h.dir)
		h.dir = ""
	}
}

func (h *harness) run() error {
	log.Printf("%d loop devices on the machine, none bound", len(h.before))
	parts := map[string]bool{}
	for _, p := range strings.Split(*only, ",") {
		parts[strings.TrimSpace(p)] = true
	}
	part := func(name string) bool { return *only == "" || parts[name] }
	if part("tables") {
		for _, t := range []*table{h.getFreeTable(), h.cycleTable()} {
			if err := h.measure(t); err != nil {
				return err
			}
		}
		if err := h.concurrency(); err != nil {
			return err
		}
		if err := h.sweepCounts(); err != nil {
			return err
		}
	}
	// The scale tables start from the machine's own devices.
	h.unbind(0)
	h.removeMade()
	if part("scale") {
		if err := h.scale(); err != nil {
			return err
		}
		h.unbind(0)
		h.removeMade()
	}
	if part("data") {
		if err := h.dataPath(); err != nil {
			return err
		}
		h.removeMade()
	}
	h.before = nil
	h.print(os.Stdout)
	if *quick || *only != "" {
		return nil // a report is of a whole run
	}
	if err := h.plots(); err != nil {
		return err
	}
	if err := h.dataPlots(); err != nil {
		return err
	}
	return h.writeReport()
}

// bindTo binds the backing file until the harness holds n devices, or
// detaches its last ones down to n.
func (h *harness) bindTo(n int) error {
	h.unbind(n)
	f, err := os.OpenFile(h.file, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	for len(h.bound) < n {
		d, err := loopctl.AttachFile(context.Background(), f, loopctl.Options{Flags: loopctl.FlagAutoClear})
		if err != nil {
			return err
		}
		h.bound = append(h.bound, d)
	}
	return nil
}

// unbind closes the harness's devices beyond the first n: with autoclear,
// the last close detaches each.
func (h *harness) unbind(n int) {
	for len(h.bound) > n {
		h.bound[len(h.bound)-1].Close()
		h.bound = h.bound[:len(h.bound)-1]
	}
}

// loopNumbers lists the loop devices in /sys/block.
func loopNumbers() ([]int, error) {
	entries, err := os.ReadDir("/sys/block")
	if err != nil {
		return nil, err
	}
	var nums []int
	for _, e := range entries {
		if n, ok := loopName([]byte(e.Name())); ok {
			nums = append(nums, n)
		}
	}
	slices.Sort(nums)
	return nums, nil
}

// A table is one operation as every implementation does it.
type table struct {
	title, op, note string
	rows            []*row
}

// A row is one implementation of a table's operation.
type row struct {
	impl string
	// Exactly one of these says how to run it.
	goOp  string     // an in-process op
	cOp   string     // an operation of floor.c
	procs [][]string // commands run in turn for one operation; "{prev}" is the previous one's output
	file  bool       // pass the backing file

	times    []float64 // ns per operation, one a round
	allocs   float64   // per operation; -1 when not counted
	syscalls float64   // per operation; -1 when not counted
}

func (r *row) median() float64 {
	t := slices.Clone(r.times)
	sort.Float64s(t)
	if len(t) == 0 {
		return 0
	}
	return t[len(t)/2]
}

// measure runs every row of t rounds times, interleaved, then counts each
// row's allocations and system calls once.
func (h *harness) measure(t *table) error {
	log.Printf("measuring %s", t.title)
	for round := range *rounds {
		// Each round starts one row further on, so that no row is always
		// measured just after the same other.
		for i := range t.rows {
			r := t.rows[(round+i)%len(t.rows)]
			ns, err := h.time(r)
			if err != nil {
				return fmt.Errorf("%s, %s: %w", t.title, r.impl, err)
			}
			r.times = append(r.times, ns)
		}
	}
	for _, r := range t.rows {
		var err error
		if r.allocs, err = h.allocs(r); err != nil {
			return fmt.Errorf("%s, %s: %w", t.title, r.impl, err)
		}
		if r.syscalls, err = h.syscalls(r); err != nil {
			return fmt.Errorf("%s, %s: strace: %w", t.title, r.impl, err)
		}
	}
	h.tables = append(h.tables, t)
	return nil
}

// time measures one row once, for about the budget, in ns per operation.
func (h *harness) time(r *row) (float64, error) {
	if _, ok := ops[r.goOp]; r.goOp != "" && !ok {
		return 0, fmt.Errorf("no operation %q", r.goOp)
	}
	switch {
	case r.goOp != "":
		run, done, err := ops[r.goOp].setup(h.file)
		if err != nil {
			return 0, err
		}
		defer done()
		return timeLoop(run)
	case r.cOp != "":
		one, err := h.cFloor(r, 1)
		if err != nil {
			return 0, err
		}
		n := max(1, int(float64(budget.Nanoseconds())/max(one, 1)))
		return h.cFloor(r, n)
	default:
		return timeLoop(func() error { _, err := h.runProcs(r.procs, nil); return err })
	}
}

// coldProcs is how many new processes one measurement of a cold row
// starts; it gives their median.
const coldProcs = 7

// medianOfProcs runs one, which times an operation in a new process,
// coldProcs times and returns the median.
func medianOfProcs(one func() (float64, error)) (float64, error) {
	ns := make([]float64, 0, coldProcs)
	for range coldProcs {
		v, err := one()
		if err != nil {
			return 0, err
		}
		ns = append(ns, v)
	}
	sort.Float64s(ns)
	return ns[len(ns)/2], nil
}

// timeLoop runs fn for about the budget and returns its ns per call.
func timeLoop(fn func() error) (float64, error) {
	start := time.Now()
	if err := fn(); err != nil {
		return 0, err
	}
	n := max(1, int(budget.Nanoseconds()/max(time.Since(start).Nanoseconds(), 1)))
	n = min(n, 10_000_000)
	start = time.Now()
	for range n {
		if err := fn(); err != nil {
			return 0, err
		}
	}
	return float64(time.Since(start).Nanoseconds()) / float64(n), nil
}

func (h *harness) cFloor(r *row, n int) (float64, error) {
	args := []string{r.cOp, strconv.Itoa(n), "1"}
	if r.file {
		args = append(args, h.file)
	}
	out, err := exec.Command(h.floor, args...).Output()
	if err != nil {
		return 0, fmt.Errorf("floor %s: %w", strings.Join(args, " "), err)
	}
	return strconv.ParseFloat(strings.TrimSpace(string(out)), 64)
}

// runProcs runs one operation's commands in turn; wrap, if not nil, runs
// each under another command (strace) and is given its output file.
func (h *harness) runProcs(procs [][]string, wrap func(i int) []string) (string, error) {
	prev := ""
	for i, p := range procs {
		args := slices.Clone(p)
		for j := range args {
			args[j] = strings.ReplaceAll(strings.ReplaceAll(args[j], "{prev}", prev), "{file}", h.file)
		}
		if wrap != nil {
			args = append(wrap(i), args...)
		}
		out, err := exec.Command(args[0], args[1:]...).Output()
		if err != nil {
			return "", fmt.Errorf("%s: %w", strings.Join(args, " "), err)
		}
		prev = strings.TrimSpace(string(out))
	}
	return prev, nil
}

// allocs counts an in-process row's heap allocations per operation.
func (h *harness) allocs(r *row) (float64, error) {
	if r.goOp == "" {
		return -1, nil
	}
	run, done, err := ops[r.goOp].setup(h.file)
	if err != nil {
		return 0, err
	}
	defer done()
	if err := run(); err != nil { // warm up: pools, lazily made state
		return 0, err
	}
	n := 200
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for range n {
		if err := run(); err != nil {
			return 0, err
		}
	}
	runtime.ReadMemStats(&after)
	return float64(after.Mallocs-before.Mallocs) / float64(n), nil
}

// strace's -c summary counts every thread's calls; these are the Go
// runtime's own (scheduling, signals, memory), not the operation's, and
// vary from run to run.
var runtimeCalls = map[string]bool{
	"futex": true, "nanosleep": true, "sched_yield": true, "rt_sigreturn": true, "tgkill": true,
	"getpid": true, "gettid": true, "rt_sigprocmask": true, "sigaltstack": true, "clone": true,
	"clone3": true, "mmap": true, "munmap": true, "madvise": true, "epoll_pwait": true,
	"sched_getaffinity": true, "rt_sigaction": true, "mprotect": true,
}

// syscalls counts a row's system calls per operation under strace -f -c:
// an in-process or C row runs n operations and none, and the difference is
// divided by n; a process row counts its commands whole, start-up
// included, since a program that runs losetup pays for that too.
func (h *harness) syscalls(r *row) (float64, error) {
	const n = 200
	switch {
	case r.goOp != "" || r.cOp != "":
		var calls [2]float64
		for i, k := range []int{n, 0} {
			out := filepath.Join(h.dir, "strace.out")
			args := []string{"strace", "-f", "-c", "-o", out, "--"}
			if r.goOp != "" {
				self, err := os.Executable()
				if err != nil {
					return 0, err
				}
				args = append(args, self, "-op", r.goOp, "-n", strconv.Itoa(k), "-file", h.file)
			} else {
				args = append(args, h.floor, r.cOp, strconv.Itoa(k), "1", h.file)
			}
			if b, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
				return 0, fmt.Errorf("%v\n%s", err, b)
			}
			c, err := straceTotal(out, r.goOp != "")
			if err != nil {
				return 0, err
			}
			calls[i] = c
		}
		return (calls[0] - calls[1]) / n, nil
	default:
		var total float64
		outs := make([]string, len(r.procs))
		_, err := h.runProcs(r.procs, func(i int) []string {
			outs[i] = filepath.Join(h.dir, "strace"+strconv.Itoa(i)+".out")
			return []string{"strace", "-f", "-c", "-o", outs[i], "--"}
		})
		if err != nil {
			return 0, err
		}
		for _, out := range outs {
			c, err := straceTotal(out, false)
			if err != nil {
				return 0, err
			}
			total += c
		}
		return total, nil
	}
}

// straceTotal sums the calls column of an strace -c summary, without the
// Go runtime's own calls when goRuntime is set.
func straceTotal(path string, goRuntime bool) (float64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	var total float64
	for line := range strings.Lines(string(b)) {
		f := strings.Fields(line)
		if len(f) < 5 || f[len(f)-1] == "total" || f[len(f)-1] == "syscall" {
			continue
		}
		calls, err := strconv.ParseFloat(f[3], 64)
		if err != nil {
			continue
		}
		if goRuntime && runtimeCalls[f[len(f)-1]] {
			continue
		}
		total += calls
	}
	return total, nil
}

// attachFor attaches and detaches on n goroutines, each with a file of its
// own beside file, for d, and returns the cycles made. A failure stops
// every goroutine; each detaches what it bound before it returns.
func attachFor(file string, n int, d time.Duration) (int64, error) {
	var files []*os.File
	for i := range n {
		path := file + ".g" + strconv.Itoa(os.Getpid()) + "-" + strconv.Itoa(i)
		if err := os.WriteFile(path, make([]byte, 1<<20), 0o644); err != nil {
			return 0, err
		}
		defer os.Remove(path)
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			return 0, err
		}
		defer f.Close()
		files = append(files, f)
	}
	var cycles atomic.Int64
	var stop atomic.Bool
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i, f := range files {
		wg.Go(func() {
			for !stop.Load() {
				dev, err := loopctl.AttachFile(context.Background(), f, loopctl.Options{})
				if err == nil {
					err = dev.ClearFD()
					dev.Close()
				}
				if err != nil {
					errs[i] = err
					stop.Store(true)
					return
				}
				cycles.Add(1)
			}
		})
	}
	timer := time.AfterFunc(d, func() { stop.Store(true) }) // the measurement's length
	wg.Wait()
	timer.Stop()
	return cycles.Load(), errors.Join(errs...)
}

// A concRow is the attach throughput of one setting.
type concRow struct {
	setting string
	perSec  []float64
}

// concurrency measures Attach+ClearFD+Close throughput with 1, 8 and 32
// goroutines in this process, and with two processes of 8 each.
func (h *harness) concurrency() error {
	log.Print("measuring concurrent attach throughput")
	d := 4 * *budget
	rows := []concRow{{setting: "1 goroutine"}, {setting: "8 goroutines"}, {setting: "32 goroutines"},
		{setting: "2 processes × 8 goroutines"}}
	for range *rounds {
		for i, n := range []int{1, 8, 32} {
			cycles, err := attachFor(h.file, n, d)
			if err != nil {
				return err
			}
			rows[i].perSec = append(rows[i].perSec, float64(cycles)/d.Seconds())
		}
		total, err := h.twoProcesses(d)
		if err != nil {
			return err
		}
		rows[3].perSec = append(rows[3].perSec, total/d.Seconds())
	}
	h.conc = rows
	return nil
}

func (h *harness) twoProcesses(d time.Duration) (float64, error) {
	self, err := os.Executable()
	if err != nil {
		return 0, err
	}
	var cmds []*exec.Cmd
	var outs []*bytes.Buffer
	for range 2 {
		cmd := exec.Command(self, "-op", "cycle/loopctl", "-goroutines", "8", "-for", d.String(), "-file", h.file)
		out := new(bytes.Buffer)
		cmd.Stdout, cmd.Stderr = out, os.Stderr
		if err := cmd.Start(); err != nil {
			return 0, err
		}
		cmds, outs = append(cmds, cmd), append(outs, out)
	}
	var total float64
	for i, cmd := range cmds {
		if err := cmd.Wait(); err != nil {
			return 0, fmt.Errorf("second process: %w", err)
		}
		v, err := strconv.ParseFloat(strings.TrimSpace(outs[i].String()), 64)
		if err != nil {
			return 0, err
		}
		total += v
	}
	return total, nil
}
