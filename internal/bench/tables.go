package main

import (
	"fmt"
	"io"
	"log"
	"slices"
	"strconv"
	"strings"
)

// The tables. In each, the C row comes first: the others' ratio is to it.

func (h *harness) getFreeTable() *table {
	return &table{
		title: "GetFree", op: "getfree",
		note: "LOOP_CTL_GET_FREE on /dev/loop-control. C, Go's floor, loopctl and u-root's GetFree(fd) keep the control device open; go-losetup's GetFree opens and closes it on every call. The row \"Go floor + a descriptor reference\" is the floor with what loopctl adds around the call, a reference taken (a compare-and-swap) and dropped (an atomic add), so that a concurrent Close cannot send the call to a reused descriptor number.",
		rows: []*row{
			{impl: "C", cOp: "getfree"},
			{impl: "Go floor (unix.Syscall)", goOp: "getfree/go"},
			{impl: "Go floor + a descriptor reference", goOp: "getfree/go-ref"},
			{impl: "loopctl Control.GetFree", goOp: "getfree/loopctl"},
			{impl: "u-root loop.GetFree(fd)", goOp: "getfree/u-root"},
			{impl: "go-losetup GetFree", goOp: "getfree/go-losetup"},
		},
	}
}

func (h *harness) cycleTable() *table {
	return &table{
		title: "Attach and detach", op: "cycle",
		note: "One cycle: bind a 1 MiB file to a free device and detach it. C, Go's floor and loopctl make the same calls: fstat, fstatfs and F_GETFL of the file, flock(LOCK_EX) of /dev/loop-control, LOOP_CTL_GET_FREE, open, flock(LOCK_EX) of the device, on kernels before 7.2 a statx of the device's sysfs directory (partitions an earlier binding left), LOOP_CONFIGURE, BLKGETDISKSEQ (the binding's disk sequence number, as systemd reads it), both unlocks, LOOP_CLR_FD, close (loopctl.AttachFile, Device.ClearFD, Device.Close). The peers take no lock and open the file and the control device on every cycle; go-losetup binds with LOOP_SET_FD and LOOP_SET_STATUS64. The losetup rows run `losetup -f --show FILE`, then `losetup -d DEVICE`.",
		rows: []*row{
			{impl: "C", cOp: "cycle", file: true},
			{impl: "Go floor (unix.Syscall)", goOp: "cycle/go"},
			{impl: "loopctl AttachFile, ClearFD, Close", goOp: "cycle/loopctl"},
			{impl: "u-root FindDevice, SetFile, ClearFile", goOp: "cycle/u-root"},
			{impl: "containerd AttachLoopDevice, DetachLoopDevice", goOp: "cycle/containerd"},
			{impl: "go-losetup Attach, Detach", goOp: "cycle/go-losetup"},
			{impl: "util-linux losetup (2 processes)", procs: [][]string{{h.losetup, "-f", "--show", "{file}"}, {h.losetup, "-d", "{prev}"}}},
			{impl: "example losetup (2 processes)", procs: [][]string{{h.example, "-f", "--show", "{file}"}, {h.example, "-d", "{prev}"}}},
		},
	}
}

// A sweepPoint is GetFree against the scan it replaced at one count of
// bound devices.
type sweepPoint struct {
	bound                  int
	getFree, scanC, scanGo float64 // ns
}

// sweepCounts binds more and more devices and measures, at each count,
// GetFree and the scan.
func (h *harness) sweepCounts() error {
	var nums []int
	for _, f := range strings.Split(*counts, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			return fmt.Errorf("bad -counts %q", *counts)
		}
		nums = append(nums, n)
	}
	slices.Sort(nums)
	for _, n := range nums {
		log.Printf("binding %d devices", n)
		if err := h.bindTo(n); err != nil {
			return err
		}
		t := &table{title: fmt.Sprintf("sweep at %d", n), rows: []*row{
			{impl: "loopctl GetFree", goOp: "getfree/loopctl"},
			{impl: "scan, C", cOp: "scan"},
			{impl: "scan, Go", goOp: "scan/go"},
		}}
		log.Printf("measuring the sweep at %d", n)
		for range *rounds {
			for _, r := range t.rows {
				ns, err := h.time(r)
				if err != nil {
					return fmt.Errorf("sweep at %d, %s: %w", n, r.impl, err)
				}
				r.times = append(r.times, ns)
			}
		}
		h.sweep = append(h.sweep, sweepPoint{bound: n,
			getFree: t.rows[0].median(), scanC: t.rows[1].median(), scanGo: t.rows[2].median()})
	}
	return nil
}

// duration formats ns for the tables.
func duration(ns float64) string {
	switch {
	case ns >= 1e6:
		return strconv.FormatFloat(ns/1e6, 'f', 2, 64) + " ms"
	case ns >= 1e3:
		return strconv.FormatFloat(ns/1e3, 'f', 2, 64) + " µs"
	}
	return strconv.FormatFloat(ns, 'f', 0, 64) + " ns"
}

func count(v float64) string {
	if v < 0 {
		return "–"
	}
	if v == float64(int64(v)) {
		return strconv.FormatInt(int64(v), 10)
	}
	return strconv.FormatFloat(v, 'f', 1, 64)
}

// ratio is the median over the rounds of r's time to base's in the same
// round: rows of a table are measured one after the other in each round,
// so that a round's ratio is little moved by the machine's drift between
// rounds.
func (r *row) ratio(base *row) float64 {
	n := min(len(r.times), len(base.times))
	if n == 0 {
		return 0
	}
	q := make([]float64, n)
	for i := range n {
		q[i] = r.times[i] / base.times[i]
	}
	slices.Sort(q)
	return q[n/2]
}

// spread is the rounds' range as a share of the median.
func (r *row) spread() string {
	if len(r.times) < 2 {
		return "–"
	}
	m := r.median()
	return fmt.Sprintf("±%.0f%%", 100*(slices.Max(r.times)-slices.Min(r.times))/2/m)
}

// print writes the tables in Markdown.
func (h *harness) print(w io.Writer) {
	h.printTables(w)
	h.printConcurrency(w)
	h.printSweep(w)
	h.printScale(w)
	h.printData(w)
}

func (h *harness) printTables(w io.Writer) {
	for _, t := range h.tables {
		printTable(w, t)
	}
}

// printTable writes one table; × C is to its first row, C.
func printTable(w io.Writer, t *table) {
	fmt.Fprintf(w, "### %s\n\n", t.title)
	fmt.Fprintln(w, "| implementation | time/op | spread | × C | allocs/op | syscalls/op |")
	fmt.Fprintln(w, "| --- | ---: | ---: | ---: | ---: | ---: |")
	c := t.rows[0]
	for _, r := range t.rows {
		fmt.Fprintf(w, "| %s | %s | %s | %.2f | %s | %s |\n", r.impl, duration(r.median()), r.spread(),
			r.ratio(c), count(r.allocs), count(r.syscalls))
	}
	fmt.Fprintln(w)
}

func (h *harness) printConcurrency(w io.Writer) {
	fmt.Fprintln(w, "### Concurrent attach throughput (AttachFile, ClearFD, Close)")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| attachers | cycles/s (median) | range |")
	fmt.Fprintln(w, "| --- | ---: | ---: |")
	for _, c := range h.conc {
		t := slices.Clone(c.perSec)
		slices.Sort(t)
		fmt.Fprintf(w, "| %s | %.0f | %.0f–%.0f |\n", c.setting, t[len(t)/2], t[0], t[len(t)-1])
	}
	fmt.Fprintln(w)
}

func (h *harness) printSweep(w io.Writer) {
	fmt.Fprintln(w, "### GetFree against the scan it replaced, by bound devices")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| bound | loopctl GetFree | scan (C) | scan (Go) | scan (C) ÷ GetFree |")
	fmt.Fprintln(w, "| ---: | ---: | ---: | ---: | ---: |")
	for _, p := range h.sweep {
		fmt.Fprintf(w, "| %d | %s | %s | %s | %.0f |\n", p.bound, duration(p.getFree),
			duration(p.scanC), duration(p.scanGo), p.scanC/p.getFree)
	}
	fmt.Fprintln(w)
}
