package main

import (
	"bytes"
	_ "embed"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"slices"
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
	fmt.Fprintf(&b, "![List against losetup](internal/bench/%s)\n\n", listPlot)
	h.printSweep(&b)
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
	var ts []target
	ratio := func(what, op, fast, slow string, min float64) {
		f, s := h.find(op, fast), h.find(op, slow)
		q := 1 / f.ratio(s)
		ts = append(ts, target{what, fmt.Sprintf("%s against %s: %.1f×", duration(f.median()), duration(s.median()), q), q >= min})
	}
	ratio("List, 256 bound, ≥ 10× faster than `losetup --json --list`", "list", "loopctl", "util-linux", 10)
	ratio("FindByBackingFile, one file on 256 devices, ≥ 10× faster than `losetup -j FILE`", "find", "loopctl", "util-linux", 10)
	cold := func(what, op, name string) {
		c, w := h.find(op, name+", first call"), h.find(op, name)
		cc, cw := h.find(op, "C (two threads), first"), h.find(op, "C (two threads)")
		q := c.ratio(w)
		ts = append(ts, target{what, fmt.Sprintf("%s against %s: %.2f× (C on two threads, the same calls: %s against %s, %.2f×)",
			duration(c.median()), duration(w.median()), q, duration(cc.median()), duration(cw.median()), cc.ratio(cw)), q <= 2})
	}
	cold("List, 256 bound: the first call in a new process within 2× of a later one", "list", "loopctl List")
	cold("FindByBackingFile, 256 bound: the first call in a new process within 2× of a later one", "find", "loopctl FindByBackingFile")
	// A process's own start and the kernel's calls bound what the example
	// can reach; the target line says how far.
	process := func(what, op string) {
		e, u := h.find(op, "example"), h.find(op, "util-linux")
		c, g := h.find(op, "C making"), h.find(op, "empty Go")
		q := 1 / e.ratio(u)
		ts = append(ts, target{what, fmt.Sprintf("%s against %s: %.1f×. Bounds, as processes: C making the same calls once, no output, %s (%.1f×); a Go program that does nothing, %s (%.1f×)",
			duration(e.median()), duration(u.median()), q, duration(c.median()), 1/c.ratio(u), duration(g.median()), 1/g.ratio(u)), q >= 3})
	}
	process("example `losetup --json --list`, 256 bound, ≥ 3× faster than util-linux's, as processes", "list")
	process("example `losetup -j FILE`, 256 bound, ≥ 3× faster than util-linux's, as processes", "find")
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

// perDevice says what the kernel costs a device and how close List gets.
func (h *harness) perDevice() string {
	var n float64
	for _, t := range h.tables {
		if t.op == "list" {
			fmt.Sscanf(t.title, "List, %g bound", &n)
		}
	}
	if n == 0 {
		return ""
	}
	c, fresh, two := h.find("list", "C (one").median(), h.find("list", "C, backing_file").median(), h.find("list", "C (two").median()
	l, u := h.find("list", "loopctl").median(), h.find("list", "util-linux").median()
	return fmt.Sprintf(`## What a device costs

The C row of the List table is the kernel's price: List's system calls, made one after another on one thread, cost %s a device here (%s for %.0f devices), with each backing_file held open and read again. Opening and closing backing_file each time instead, as losetup does, costs %s a device. Two C threads, sharing the devices, cost %s a device, %.2f× the C row: what the kernel gives a second core. loopctl.List costs %s a device, %.2f× the C row, because it spreads the devices over %d goroutines (GOMAXPROCS); on one goroutine it would be the Go floor's %s a device. util-linux's `+"`losetup --json --list`"+` costs %s a device, start-up included.
`, duration(c/n), duration(c), n, duration(fresh/n), duration(two/n), two/c, duration(l/n), l/c, runtime.GOMAXPROCS(0), duration(h.find("list", "Go floor").median()/n), duration(u/n))
}
