package main

import (
	"bytes"
	_ "embed"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// method.md is the report's fixed text: how the harness measures, and
// what the figures mean.
//
//go:embed method.md
var method string

// writeReport writes BENCHMARKS.md: the machine, the targets as this run
// measured them, the tables, the plots and the method.
func (h *harness) writeReport() error {
	var b bytes.Buffer
	fmt.Fprintln(&b, "# Benchmarks")
	fmt.Fprintln(&b)
	fmt.Fprintln(&b, "Written by `internal/bench` (`cd internal/bench && go run .`, as root) from one run on one machine; every figure below comes from that run. Run it again to get your machine's.")
	fmt.Fprintln(&b)
	fmt.Fprintln(&b, "## Machine")
	fmt.Fprintln(&b)
	for _, kv := range h.machine() {
		fmt.Fprintf(&b, "- %s: %s\n", kv[0], kv[1])
	}
	fmt.Fprintln(&b)
	fmt.Fprintln(&b, "## Targets")
	fmt.Fprintln(&b)
	fmt.Fprintln(&b, "| target | measured | met |")
	fmt.Fprintln(&b, "| --- | --- | :---: |")
	for _, t := range h.targets() {
		mark := "yes"
		if !t.met {
			mark = "**no**"
		}
		fmt.Fprintf(&b, "| %s | %s | %s |\n", t.what, t.measured, mark)
	}
	fmt.Fprintln(&b)
	fmt.Fprintln(&b, "## Tables")
	fmt.Fprintln(&b)
	fmt.Fprintln(&b, "Time per operation is the median of the rounds; spread is half the rounds' range; × C is the ratio to the table's C row; syscalls/op are counted under `strace -f -c` (see Method).")
	fmt.Fprintln(&b)
	for _, t := range h.tables {
		fmt.Fprintln(&b, t.note)
		fmt.Fprintln(&b)
		printTable(&b, t)
	}
	h.printConcurrency(&b)
	fmt.Fprintf(&b, "![GetFree against the scan](internal/bench/%s)\n\n", scanPlot)
	h.printSweep(&b)
	fmt.Fprintln(&b, "## At scale")
	fmt.Fprintln(&b)
	fmt.Fprintln(&b, scaleIntro)
	fmt.Fprintln(&b)
	for _, t := range h.scaleTables {
		fmt.Fprintf(&b, "![%s](internal/bench/%s)\n\n", t.op.title, scalePlot(t.op.key))
	}
	h.printScale(&b)
	h.printData(&b)
	fmt.Fprintf(&b, "![The data path](internal/bench/%s)\n\n![The page cache it leaves](internal/bench/%s)\n\n", dataPlot, dataCachePlot)
	fmt.Fprintln(&b, h.perDevice())
	b.WriteString(method)
	return os.WriteFile(*mdPath, b.Bytes(), 0o644)
}

func (h *harness) machine() [][2]string {
	var u unix.Utsname
	unix.Uname(&u)
	cpu := "unknown"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range strings.Lines(string(b)) {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				cpu = strings.TrimSpace(v)
				break
			}
		}
	}
	first := func(name string, args ...string) string {
		out, err := exec.Command(name, args...).Output()
		if err != nil {
			return "unknown"
		}
		line, _, _ := strings.Cut(string(out), "\n")
		return strings.TrimSpace(line)
	}
	return [][2]string{
		{"date", time.Now().UTC().Format("2006-01-02 15:04 MST")},
		{"CPU", fmt.Sprintf("%s, %d cores", cpu, runtime.NumCPU())},
		{"kernel", unix.ByteSliceToString(u.Release[:]) + " " + unix.ByteSliceToString(u.Machine[:])},
		{"Go", runtime.Version()},
		{"C compiler", first("cc", "--version")},
		{"util-linux", first(h.losetup, "--version")},
		{"loop devices before the run", fmt.Sprintf("%d, none bound", h.devCount)},
		{"GOMAXPROCS", strconv.Itoa(runtime.GOMAXPROCS(0))},
		{"rounds", fmt.Sprintf("%d, each about %v a row", *rounds, *budget)},
	}
}

type target struct {
	what, measured string
	met            bool
}

// find returns the row of table op whose name starts with impl.
func (h *harness) find(op, impl string) *row {
	for _, t := range h.tables {
		if t.op != op {
			continue
		}
		for _, r := range t.rows {
			if strings.HasPrefix(r.impl, impl) {
				return r
			}
		}
	}
	return &row{allocs: -1, syscalls: -1}
}

func (h *harness) targets() []target {
	ts := h.scaleTargets()
	gf, floor, ref := h.find("getfree", "loopctl"), h.find("getfree", "Go floor (unix"), h.find("getfree", "Go floor +")
	ts = append(ts, target{"GetFree within 1.05× of Go's floor, 0 allocs",
		fmt.Sprintf("%s against %s: %.3f×, %s allocs (the floor with a descriptor reference: %.3f×)", duration(gf.median()),
			duration(floor.median()), gf.ratio(floor), count(gf.allocs), ref.ratio(floor)),
		gf.ratio(floor) <= 1.05 && gf.allocs == 0})
	cy, c := h.find("cycle", "loopctl"), h.find("cycle", "C")
	ts = append(ts, target{"attach/detach cycle within 1.05× of C making the same calls, locks included",
		fmt.Sprintf("%s against %s: %.3f× (the medians' ratio: %.3f×); %s syscalls against %s", duration(cy.median()), duration(c.median()),
			cy.ratio(c), cy.median()/c.median(), count(cy.syscalls), count(c.syscalls)),
		cy.ratio(c) <= 1.05})
	i := slices.IndexFunc(h.sweep, func(p sweepPoint) bool { return p.bound == 256 })
	if i >= 0 {
		p := h.sweep[i]
		ts = append(ts, target{"GetFree at 256 bound ≥ 100× faster than the scan it replaced",
			fmt.Sprintf("%s against %s (C scan): %.0f×", duration(p.getFree), duration(p.scanC), p.scanC/p.getFree), p.scanC/p.getFree >= 100})
	}
	return ts
}

// scaleIntro says how the scale tables are made.
const scaleIntro = "Each operation at 16 to 4,096 devices bound by the harness (made with LOOP_CTL_ADD, as a test or an administrator makes them, then bound to one 1 MiB file with autoclear), and with 4,096 devices none of them bound. A time is the median of the rounds. loopctl's row runs in the harness, after one untimed call; its first call runs in a new process each time (`internal/bench/first`, whose main makes the call and nothing before it), timed inside that process, the median of 7 processes a round; C's first call likewise (`floor.c`, one thread). The C rows make loopctl's calls and hold nothing from one operation to the next; on GOMAXPROCS threads they share the devices in batches of 8, as loopctl's goroutines do. The process rows time the whole process, start-up included. The ratio rows are medians of the rounds' ratios; the example against util-linux is the median of alternating runs, each pair's ratio."

// perDevice says what a bound device costs the kernel and List, at the
// largest bound count of the scale tables.
func (h *harness) perDevice() string {
	list := h.scaleTable("list")
	i := -1
	for j, p := range h.points {
		if p.bound > 0 && (i < 0 || p.bound > h.points[i].bound) {
			i = j
		}
	}
	if list == nil || i < 0 {
		return ""
	}
	n := float64(h.points[i].bound)
	at := func(kind int) float64 { return medianOf(list.row(kind).times[i]) }
	c, two, l, u := at(rowC), at(rowCThreads), at(rowLoopctl), at(rowLosetup)
	return fmt.Sprintf(`## What a device costs

At %s the C row of the List table is the kernel's price: List's system calls, made one after another on one thread and holding nothing, cost %s a device here (%s in all). On %d threads, sharing the devices, they cost %s a device, %.2f× the one-thread row: what the kernel gives the other cores. loopctl.List costs %s a device, %.2f× the %d-thread row. util-linux's `+"`losetup --json --list`"+` costs %s a device, start-up included.
`, h.points[i].label(), duration(c/n), duration(c), runtime.GOMAXPROCS(0), duration(two/n), two/c, duration(l/n), l/two,
		runtime.GOMAXPROCS(0), duration(u/n))
}
