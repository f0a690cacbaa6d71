package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/loopctl/loopctl"
)

// The scale tables: the lookups and the attaches as the bound devices grow
// to what users run (one per snap on Ubuntu, thousands on some hosts), and
// with thousands of devices none of them bound, beside C making the same
// calls and holding nothing, on one thread and on GOMAXPROCS threads, and
// beside util-linux's losetup.

var (
	scaleCounts = flag.String("scale", "16,256,1024,4096", "bound-device counts of the scale tables")
	scaleNone   = flag.Int("none", 4096, "loop devices on the machine, none bound, for the scale tables' last column")
	pairs       = flag.Int("pairs", 20, "alternating runs of the example losetup and util-linux's at each point, for their ratio")
)

// A scalePoint is one state of the machine the scale tables are measured
// in: bound devices of the harness's, and loop devices in all.
type scalePoint struct {
	bound, devices int
}

func (p scalePoint) label() string {
	if p.bound == 0 {
		return commas(p.devices) + " devices, none bound"
	}
	return commas(p.bound) + " bound"
}

// commas writes n with thousands separated.
func commas(n int) string {
	s := strconv.Itoa(n)
	for i := len(s) - 3; i > 0; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	return s
}

// A scaleOp is one operation of the scale tables, and how each
// implementation makes it.
type scaleOp struct {
	key, title, note string
	// loopctl in this process: setup prepares it for a point and returns
	// one run, which reports the nanoseconds of the part timed.
	setup func(h *harness, first int) (run func() (float64, error), done func(), err error)
	cold  []string // the first-call program's arguments; "{file}", "{other}"
	c     []string // floor.c's arguments after OP N THREADS; "{file}", "{other}", "{first}"
	cOp   string
	// threads: C on GOMAXPROCS threads is a row (the lookups); openAll:
	// C telling a bound device by opening every device is a row (List).
	threads, openAll bool
	losetup, example []string // as processes; nil: none
	// attach: one operation binds a device, which the measurement
	// detaches, untimed, and removes if it was made for it (numbered
	// first or above: every device was bound).
	attach bool
}

// A scaleRow is one implementation of a scaleOp, measured at each point:
// the rounds' nanoseconds per operation.
type scaleRow struct {
	impl  string
	kind  int
	times [][]float64 // by point
}

// The kinds of scale rows.
const (
	rowLoopctl = iota // in this process, after a first untimed call
	rowLoopctlCold
	rowC
	rowCCold
	rowCThreads
	rowCOpenAll
	rowLosetup
	rowExample
	// What a process making the call can reach at best: C making the C
	// rows' calls once on GOMAXPROCS threads, with no output, started as
	// a process; and a Go program that does nothing.
	rowCProcess
	rowEmptyGo
)

// A scaleTable is one operation at every point.
type scaleTable struct {
	op   *scaleOp
	rows []*scaleRow
	// pairs holds, by point, the ratios of the example losetup's wall
	// time to util-linux's over alternating runs.
	pairs [][]float64
}

func (t *scaleTable) row(kind int) *scaleRow {
	for _, r := range t.rows {
		if r.kind == kind {
			return r
		}
	}
	return nil
}

// nobody is the owner reference of the Sweep rows: none of the harness's
// devices carries it.
const nobody = "nobody-bench"

func scaleOps() []*scaleOp {
	listOp := func(run func() error) func(*harness, int) (func() (float64, error), func(), error) {
		return func(*harness, int) (func() (float64, error), func(), error) {
			return func() (float64, error) {
				start := time.Now()
				err := run()
				return float64(time.Since(start).Nanoseconds()), err
			}, func() {}, nil
		}
	}
	return []*scaleOp{
		{key: "list", title: "List: every bound device's status",
			note:  "`loopctl.List`; C makes its calls: the devices from /sys/devices/virtual/block, then per device an faccessat of loopN/loop relative to it (ENOENT: not bound, nothing more), or after a bound device the open of loopN/loop/backing_file, which tells the same; open of /dev/loopN, LOOP_GET_STATUS64, BLKSSZGET, BLKGETSIZE64, BLKGETDISKSEQ, the backing_file read, both closes. The row opening every device tells a bound one as programs did before, by opening it and asking LOOP_GET_STATUS64. The process rows run `losetup --json --list`.",
			setup: listOp(func() error { _, err := loopctl.List(); return err }),
			cold:  []string{"list"}, cOp: "list", threads: true, openAll: true,
			losetup: []string{"--json", "--list"}, example: []string{"--json", "--list"}},
		{key: "find", title: "FindByBackingFile: the devices of one file",
			note: "`loopctl.FindByBackingFile` of the file bound to every device the harness holds; C makes its calls: a stat of the file, the devices from sysfs, then per device List's check, open, LOOP_GET_STATUS64 and, for the file's devices, what List asks and the backing_file's read; the closes. The process rows run `losetup -j FILE`.",
			setup: func(h *harness, _ int) (func() (float64, error), func(), error) {
				return listOp(func() error { _, err := loopctl.FindByBackingFile(h.file); return err })(h, 0)
			},
			cold: []string{"find", "{file}"}, cOp: "find", c: []string{"{file}"}, threads: true,
			losetup: []string{"-j", "{file}"}, example: []string{"-j", "{file}"}},
		{key: "attach", title: "Attach, every device bound: LOOP_CTL_GET_FREE makes one",
			note: "`loopctl.AttachFile` of another file, the attach alone timed; C makes its calls (the cycle table's attach). Every device is bound, so that LOOP_CTL_GET_FREE makes a new one each time: after each attach the device is detached and removed, untimed. The first call in a new process is `loopctl.Attach` of the path, its open and checks of the file included. The process row runs `losetup -f --show FILE`. With every device bound but none of them the harness's (the last column) nothing is made.",
			setup: func(h *harness, first int) (func() (float64, error), func(), error) {
				return attachOp(h, first, loopctl.Options{})
			},
			cold: []string{"attach", "{other}"}, cOp: "attach", c: []string{"{other}", "{first}"}, attach: true,
			losetup: []string{"-f", "--show", "{other}"}},
		{key: "reuse", title: "Attach with Options.Reuse, nothing to share",
			note: "`loopctl.AttachFile` of another file with `Options.Reuse`: a look at every bound device for that file (as FindByBackingFile's, on GOMAXPROCS goroutines), then the attach, as above. C makes its calls. The process row runs `losetup -f --show --nooverlap FILE`, which looks for an overlapping device first.",
			setup: func(h *harness, first int) (func() (float64, error), func(), error) {
				return attachOp(h, first, loopctl.Options{Reuse: true})
			},
			cold: []string{"reuse", "{other}"}, cOp: "attach-reuse", c: []string{"{other}", "{first}"}, attach: true, threads: true,
			losetup: []string{"-f", "--show", "--nooverlap", "{other}"}},
		{key: "sweep", title: "Sweep of an owner reference that matches nothing",
			note:  "`loopctl.Sweep` of a reference no device carries: the look of `FindByRef`, an faccessat of loopN/loop and, for a bound device, open, LOOP_GET_STATUS64 and close. C makes its calls. util-linux has no such command.",
			setup: listOp(func() error { _, err := loopctl.Sweep(context.Background(), nobody); return err }),
			cold:  []string{"sweep", nobody}, cOp: "ref", c: []string{nobody}, threads: true},
	}
}

// attachOp is loopctl's attach row: AttachFile of the other file with o,
// timed, then untimed its detach and, if numbered first or above, the
// removal of the device made for it.
func attachOp(h *harness, first int, o loopctl.Options) (func() (float64, error), func(), error) {
	f, err := os.OpenFile(h.other, os.O_RDWR, 0)
	if err != nil {
		return nil, nil, err
	}
	c, err := loopctl.Open()
	if err != nil {
		f.Close()
		return nil, nil, err
	}
	run := func() (float64, error) {
		start := time.Now()
		d, err := loopctl.AttachFile(context.Background(), f, o)
		ns := float64(time.Since(start).Nanoseconds())
		if err != nil {
			return 0, err
		}
		n := d.Number()
		err = d.ClearFD()
		d.Close()
		if err == nil && n >= first {
			err = removeDevice(c, n)
		}
		return ns, err
	}
	return run, func() { c.Close(); f.Close() }, nil
}

// removeDevice removes device n, unbound, waiting out an opener's last
// close (a teardown that runs at it, udev's probe).
func removeDevice(c *loopctl.Control, n int) error {
	var err error
	for range 10000 {
		if err = c.Remove(n); !errors.Is(err, loopctl.ErrBusy) {
			return err
		}
		time.Sleep(100 * time.Microsecond)
	}
	return err
}

// scalePoints are the points of the scale tables, in the order measured:
// bound counts rising, then the devices unbound.
func scalePoints() ([]scalePoint, error) {
	var ps []scalePoint
	for _, f := range strings.Split(*scaleCounts, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			return nil, fmt.Errorf("bad -scale %q", *scaleCounts)
		}
		ps = append(ps, scalePoint{bound: n, devices: n})
	}
	slices.SortFunc(ps, func(a, b scalePoint) int { return a.bound - b.bound })
	if *scaleNone > 0 {
		ps = append(ps, scalePoint{devices: *scaleNone})
	}
	return ps, nil
}

// scale measures the scale tables: at each point, every operation's rows
// round after round.
func (h *harness) scale() error {
	points, err := scalePoints()
	if err != nil {
		return err
	}
	h.points = points
	for _, op := range scaleOps() {
		t := &scaleTable{op: op, pairs: make([][]float64, len(points))}
		add := func(impl string, kind int) {
			t.rows = append(t.rows, &scaleRow{impl: impl, kind: kind, times: make([][]float64, len(points))})
		}
		add("loopctl", rowLoopctl)
		add("loopctl, first call in a new process", rowLoopctlCold)
		add("C, one thread", rowC)
		add("C, one thread, first call in a new process", rowCCold)
		if op.threads {
			add(fmt.Sprintf("C, %d threads (GOMAXPROCS)", runtime.GOMAXPROCS(0)), rowCThreads)
		}
		if op.openAll {
			add("C opening every device, one thread", rowCOpenAll)
		}
		if op.losetup != nil {
			add("util-linux `losetup "+strings.Join(op.losetup, " ")+"`, as a process", rowLosetup)
		}
		if op.example != nil {
			add("example `losetup "+strings.Join(op.example, " ")+"`, as a process", rowExample)
			add(fmt.Sprintf("C making the C rows' calls once on %d threads, no output, as a process", runtime.GOMAXPROCS(0)), rowCProcess)
			add("a Go program that does nothing, as a process", rowEmptyGo)
		}
		h.scaleTables = append(h.scaleTables, t)
	}
	for i, p := range points {
		if err := h.setPoint(p); err != nil {
			return err
		}
		for _, t := range h.scaleTables {
			if err := h.measureScale(t, i); err != nil {
				return fmt.Errorf("%s at %s: %w", t.op.title, p.label(), err)
			}
		}
	}
	return nil
}

// setPoint brings the machine to p: at least p.devices loop devices (made
// with LOOP_CTL_ADD, as an administrator or a test makes them), and
// p.bound of them bound by the harness to its file.
func (h *harness) setPoint(p scalePoint) error {
	log.Printf("scale tables at %s", p.label())
	if err := raiseFileLimit(p.bound + 256); err != nil {
		return err
	}
	h.unbind(p.bound)
	nums, err := loopNumbers()
	if err != nil {
		return err
	}
	if len(nums) < p.devices {
		c, err := loopctl.Open()
		if err != nil {
			return err
		}
		defer c.Close()
		for range p.devices - len(nums) {
			if _, err := c.Add(loopctl.AnyNumber); err != nil {
				return err
			}
		}
	}
	return h.bindTo(p.bound)
}

// raiseFileLimit makes room for n descriptors: the harness holds one for
// each device it binds.
func raiseFileLimit(n int) error {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return err
	}
	if lim.Cur >= uint64(n) {
		return nil
	}
	lim.Cur = max(lim.Cur, uint64(n))
	lim.Max = max(lim.Max, lim.Cur)
	return syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
}

// measureScale measures every row of t at point i, rounds times,
// interleaved, then the example losetup against util-linux's in
// alternating pairs. An attach table binds every free device first, so
// that LOOP_CTL_GET_FREE has to make one, and lets go of them after.
func (h *harness) measureScale(t *scaleTable, i int) error {
	log.Printf("  %s", t.op.title)
	first := 0
	if t.op.attach && h.points[i].bound > 0 {
		fill, err := h.fillFree()
		if err != nil {
			return err
		}
		defer func() {
			for _, d := range fill {
				d.Close()
			}
		}()
		nums, err := loopNumbers()
		if err != nil {
			return err
		}
		first = nums[len(nums)-1] + 1
	} else if t.op.attach {
		first = loopctl.MaxNumber + 1 // nothing made: nothing removed
	}
	for round := range *rounds {
		for j := range t.rows {
			r := t.rows[(round+j)%len(t.rows)]
			ns, err := h.timeScale(t.op, r, first)
			if err != nil {
				return fmt.Errorf("%s: %w", r.impl, err)
			}
			r.times[i] = append(r.times[i], ns)
		}
	}
	if t.op.example == nil {
		return nil
	}
	ex, ul := h.procArgs(h.example, t.op.example), h.procArgs(h.losetup, t.op.losetup)
	for range *pairs {
		a, err := wallTime(ex)
		if err != nil {
			return err
		}
		b, err := wallTime(ul)
		if err != nil {
			return err
		}
		t.pairs[i] = append(t.pairs[i], a/b)
	}
	return nil
}

// fillFree binds the harness's file to every free device, with
// autoclear, and returns them open: for a table that needs every device
// bound.
func (h *harness) fillFree() ([]*loopctl.Device, error) {
	c, err := loopctl.Open()
	if err != nil {
		return nil, err
	}
	defer c.Close()
	f, err := os.Open(h.file)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	nums, err := loopNumbers()
	if err != nil {
		return nil, err
	}
	var fill []*loopctl.Device
	for _, n := range nums {
		if _, err := os.Lstat("/sys/block/loop" + strconv.Itoa(n) + "/loop"); err == nil {
			continue
		}
		d, err := loopctl.OpenDevice(n)
		if err == nil {
			if err = d.Configure(f, loopctl.Options{Flags: loopctl.FlagAutoClear | loopctl.FlagReadOnly}); err != nil {
				d.Close()
			}
		}
		if err != nil {
			for _, d := range fill {
				d.Close()
			}
			return nil, fmt.Errorf("binding free loop%d: %w", n, err)
		}
		fill = append(fill, d)
	}
	return fill, nil
}

// attachesPerMeasurement bounds an attach row's measurement: each attach
// is followed by a removal, which takes the kernel tens of milliseconds.
const attachesPerMeasurement = 5

// timeScale measures row r of op once, in nanoseconds per operation.
func (h *harness) timeScale(op *scaleOp, r *scaleRow, first int) (float64, error) {
	switch r.kind {
	case rowLoopctl:
		run, done, err := op.setup(h, first)
		if err != nil {
			return 0, err
		}
		defer done()
		if _, err := run(); err != nil { // the first call is the other row's
			return 0, err
		}
		var total float64
		n := 0
		for start := time.Now(); n == 0 || time.Since(start) < *budget && !(op.attach && n == attachesPerMeasurement); n++ {
			ns, err := run()
			if err != nil {
				return 0, err
			}
			total += ns
		}
		return total / float64(n), nil
	case rowLoopctlCold:
		return medianOfProcs(func() (float64, error) {
			out, err := exec.Command(h.first, h.subst(op.cold, first)...).Output()
			if err != nil {
				return 0, fmt.Errorf("%s %s: %w", h.first, strings.Join(op.cold, " "), err)
			}
			f := strings.Fields(string(out))
			if len(f) == 0 {
				return 0, fmt.Errorf("%s printed nothing", h.first)
			}
			if len(f) > 1 {
				if n, _ := strconv.Atoi(f[1]); n >= first {
					if err := h.remove(n); err != nil {
						return 0, err
					}
				}
			}
			return strconv.ParseFloat(f[0], 64)
		})
	case rowC, rowCThreads, rowCOpenAll:
		cop, threads := op.cOp, 1
		if r.kind == rowCThreads {
			threads = runtime.GOMAXPROCS(0)
		}
		if r.kind == rowCOpenAll {
			cop = "list-open"
		}
		if op.attach {
			return h.floorScale(cop, attachesPerMeasurement, threads, op, first)
		}
		one, err := h.floorScale(cop, 1, threads, op, first)
		if err != nil {
			return 0, err
		}
		return h.floorScale(cop, max(1, int(float64(budget.Nanoseconds())/max(one, 1))), threads, op, first)
	case rowCCold:
		return medianOfProcs(func() (float64, error) { return h.floorScale(op.cOp, 1, 1, op, first) })
	default: // a process
		var args []string
		switch r.kind {
		case rowExample:
			args = h.procArgs(h.example, op.example)
		case rowCProcess:
			args = h.procArgs(h.floor, append([]string{op.cOp, "1", strconv.Itoa(runtime.GOMAXPROCS(0))}, op.c...))
		case rowEmptyGo:
			args = []string{h.empty}
		default:
			args = h.procArgs(h.losetup, op.losetup)
		}
		var total float64
		n := 0
		for start := time.Now(); n == 0 || time.Since(start) < *budget && !(op.attach && n == attachesPerMeasurement); n++ {
			if !op.attach {
				ns, err := wallTime(args)
				if err != nil {
					return 0, err
				}
				total += ns
				continue
			}
			t0 := time.Now()
			out, err := exec.Command(args[0], args[1:]...).Output()
			total += float64(time.Since(t0).Nanoseconds())
			if err != nil {
				return 0, fmt.Errorf("%s: %w", strings.Join(args, " "), err)
			}
			if err := h.detachPath(strings.TrimSpace(string(out)), first); err != nil {
				return 0, err
			}
		}
		return total / float64(n), nil
	}
}

// subst replaces the placeholders of args: the harness's file, the other
// file, the first device number an attach makes.
func (h *harness) subst(args []string, first int) []string {
	out := slices.Clone(args)
	for i, a := range out {
		out[i] = strings.NewReplacer("{file}", h.file, "{other}", h.other, "{first}", strconv.Itoa(first)).Replace(a)
	}
	return out
}

func (h *harness) procArgs(bin string, args []string) []string {
	return append([]string{bin}, h.subst(args, 0)...)
}

// floorScale runs floor.c's op n times on threads threads and returns its
// nanoseconds per operation.
func (h *harness) floorScale(cop string, n, threads int, op *scaleOp, first int) (float64, error) {
	args := append([]string{cop, strconv.Itoa(n), strconv.Itoa(threads)}, h.subst(op.c, first)...)
	out, err := exec.Command(h.floor, args...).Output()
	if err != nil {
		return 0, fmt.Errorf("floor %s: %w", strings.Join(args, " "), err)
	}
	return strconv.ParseFloat(strings.TrimSpace(string(out)), 64)
}

// wallTime runs a command to its end, its output discarded, and returns
// how long it took.
func wallTime(args []string) (float64, error) {
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Stdout = io.Discard
	start := time.Now()
	if err := cmd.Run(); err != nil {
		return 0, fmt.Errorf("%s: %w", strings.Join(args, " "), err)
	}
	return float64(time.Since(start).Nanoseconds()), nil
}

// detachPath detaches the device at path, which a process bound, and
// removes it if it is numbered first or above.
func (h *harness) detachPath(path string, first int) error {
	d, err := loopctl.OpenDevicePath(path)
	if err != nil {
		return err
	}
	n := d.Number()
	err = d.ClearFD()
	d.Close()
	if err == nil && n >= first {
		err = h.remove(n)
	}
	return err
}

// remove removes device n, made for an attach row.
func (h *harness) remove(n int) error {
	c, err := loopctl.Open()
	if err != nil {
		return err
	}
	defer c.Close()
	return removeDevice(c, n)
}

// removeAll removes the devices nums, 64 at a time: the kernel takes tens
// of milliseconds over each, mostly waiting. A device someone else holds
// or has bound meanwhile refuses with EBUSY and stays.
func removeAll(nums []int) {
	c, err := loopctl.Open()
	if err != nil {
		return
	}
	defer c.Close()
	var next atomic.Int64
	var wg sync.WaitGroup
	for range min(64, len(nums)) {
		wg.Go(func() {
			for i := int(next.Add(1)) - 1; i < len(nums); i = int(next.Add(1)) - 1 {
				removeDevice(c, nums[i])
			}
		})
	}
	wg.Wait()
}

// medianRatio is the median over the rounds of a's time to b's in the
// same round at point i.
func medianRatio(a, b *scaleRow, i int) float64 {
	if a == nil || b == nil {
		return 0
	}
	n := min(len(a.times[i]), len(b.times[i]))
	if n == 0 {
		return 0
	}
	q := make([]float64, n)
	for j := range n {
		q[j] = a.times[i][j] / b.times[i][j]
	}
	return medianOf(q)
}

// printScale writes the scale tables: a column a point, and the ratios
// the targets are about.
func (h *harness) printScale(w io.Writer) {
	for _, t := range h.scaleTables {
		fmt.Fprintf(w, "### %s\n\n%s\n\n", t.op.title, t.op.note)
		fmt.Fprint(w, "| implementation |")
		for _, p := range h.points {
			fmt.Fprintf(w, " %s |", p.label())
		}
		fmt.Fprint(w, "\n| --- |")
		for range h.points {
			fmt.Fprint(w, " ---: |")
		}
		fmt.Fprintln(w)
		for _, r := range t.rows {
			fmt.Fprintf(w, "| %s |", r.impl)
			for i := range h.points {
				fmt.Fprintf(w, " %s |", duration(medianOf(r.times[i])))
			}
			fmt.Fprintln(w)
		}
		ratio := func(name string, a, b *scaleRow) {
			if a == nil || b == nil {
				return
			}
			fmt.Fprintf(w, "| *%s* |", name)
			for i := range h.points {
				fmt.Fprintf(w, " %.2f× |", medianRatio(a, b, i))
			}
			fmt.Fprintln(w)
		}
		ratio("loopctl ÷ C on GOMAXPROCS threads", t.row(rowLoopctl), t.row(rowCThreads))
		ratio("loopctl ÷ C, one thread", t.row(rowLoopctl), t.row(rowC))
		ratio("first calls: loopctl ÷ C, one thread", t.row(rowLoopctlCold), t.row(rowCCold))
		ratio("util-linux ÷ loopctl", t.row(rowLosetup), t.row(rowLoopctl))
		if t.op.example != nil {
			fmt.Fprintf(w, "| *example ÷ util-linux, median of %d alternating pairs (range)* |", *pairs)
			for i := range h.points {
				q := t.pairs[i]
				if len(q) == 0 {
					fmt.Fprint(w, " – |")
					continue
				}
				fmt.Fprintf(w, " %.2f× (%.2f–%.2f) |", medianOf(q), slices.Min(q), slices.Max(q))
			}
			fmt.Fprintln(w)
		}
		fmt.Fprintln(w)
	}
}

// scaleTable returns the table of op key.
func (h *harness) scaleTable(key string) *scaleTable {
	for _, t := range h.scaleTables {
		if t.op.key == key {
			return t
		}
	}
	return nil
}

// pointAt returns the index of the point with bound devices (none: 0
// bound), or -1.
func (h *harness) pointAt(bound int) int {
	return slices.IndexFunc(h.points, func(p scalePoint) bool { return p.bound == bound })
}

// scaleTargets are issue 24's targets, from the scale tables.
func (h *harness) scaleTargets() []target {
	var ts []target
	list, find := h.scaleTable("list"), h.scaleTable("find")
	if list == nil {
		return nil
	}
	for _, n := range []int{256, 4096} {
		i := h.pointAt(n)
		if i < 0 {
			continue
		}
		a, b := list.row(rowLoopctlCold), list.row(rowCCold)
		q := medianRatio(a, b, i)
		ts = append(ts, target{fmt.Sprintf("first List in a new process, %s, within 1.25× of C's first list on one thread", commas(n)+" bound"),
			fmt.Sprintf("%s against %s: %.2f×", duration(medianOf(a.times[i])), duration(medianOf(b.times[i])), q), q <= 1.25})
	}
	var parts []string
	met := true
	for i, p := range h.points {
		if p.bound == 0 {
			continue
		}
		a, b := list.row(rowLoopctl), list.row(rowCThreads)
		q := medianRatio(a, b, i)
		met = met && q <= 1.25
		parts = append(parts, fmt.Sprintf("%s: %s against %s, %.2f×", p.label(), duration(medianOf(a.times[i])), duration(medianOf(b.times[i])), q))
	}
	ts = append(ts, target{fmt.Sprintf("a later List within 1.25× of C on GOMAXPROCS (%d) threads", runtime.GOMAXPROCS(0)),
		strings.Join(parts, "; "), met})
	if i := h.pointAt(0); i >= 0 {
		a, b, c := list.row(rowLoopctl), list.row(rowCOpenAll), list.row(rowCThreads)
		q := 1 / medianRatio(a, b, i)
		ts = append(ts, target{fmt.Sprintf("List, %s, ≥ 3× faster than C opening every device on one thread", h.points[i].label()),
			fmt.Sprintf("%s against %s: %.1f× (C making loopctl's calls on %d threads: %.1f×)", duration(medianOf(a.times[i])),
				duration(medianOf(b.times[i])), q, runtime.GOMAXPROCS(0), 1/medianRatio(c, b, i)), q >= 3})
	}
	example := func(t *scaleTable, what string, bound int, limit float64) {
		i := h.pointAt(bound)
		if t == nil || i < 0 || len(t.pairs[i]) == 0 {
			return
		}
		q := medianOf(t.pairs[i])
		ul := t.row(rowLosetup)
		ts = append(ts, target{fmt.Sprintf("example `losetup %s`, %s, at most %.1f× util-linux's (median wall ratio, alternating runs)", what, h.points[i].label(), limit),
			fmt.Sprintf("%.2f× (%d pairs, %.2f–%.2f). As processes, against util-linux in the rounds: C making the same calls once, no output, %.2f×; a Go program that does nothing, %.2f×",
				q, len(t.pairs[i]), slices.Min(t.pairs[i]), slices.Max(t.pairs[i]),
				medianRatio(t.row(rowCProcess), ul, i), medianRatio(t.row(rowEmptyGo), ul, i)), q <= limit})
	}
	example(list, "--json --list", 256, 0.5)
	example(find, "-j FILE", 256, 0.7)
	example(list, "--json --list", 4096, 0.3)
	example(find, "-j FILE", 4096, 0.3)
	example(list, "--json --list", 0, 0.6)
	return ts
}

// removeMade removes the loop devices made during the run: by
// LOOP_CTL_ADD for the scale tables, by LOOP_CTL_GET_FREE for the
// larger counts.
func (h *harness) removeMade() {
	nums, err := loopNumbers()
	if err != nil {
		return
	}
	var made []int
	for _, n := range nums {
		if !h.before[n] {
			made = append(made, n)
		}
	}
	removeAll(made)
	if len(made) > 0 {
		log.Printf("removed the %d loop devices made during the run", len(made))
	}
}

// otherFile makes the file the attach rows bind, beside the harness's.
func (h *harness) otherFile() error {
	h.other = filepath.Join(h.dir, "other.img")
	return os.WriteFile(h.other, make([]byte, 1<<20), 0o644)
}
