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
		note: "One cycle: bind a 1 MiB file to a free device and detach it. C, Go's floor and loopctl make the same calls: fstat and fstatfs of the file, flock(LOCK_EX) of /dev/loop-control, LOOP_CTL_GET_FREE, open, flock(LOCK_EX) of the device, LOOP_CONFIGURE, BLKGETDISKSEQ (the binding's disk sequence number, as systemd reads it), both unlocks, LOOP_CLR_FD, close (loopctl.AttachFile, Device.ClearFD, Device.Close). The peers take no lock and open the file and the control device on every cycle; go-losetup binds with LOOP_SET_FD and LOOP_SET_STATUS64. The losetup rows run `losetup -f --show FILE`, then `losetup -d DEVICE`.",
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

func (h *harness) listTable(n int) *table {
	return &table{
		title: fmt.Sprintf("List, %d bound devices", n), op: "list",
		note: "Every bound device's status with the backing file's full path. C and Go's floor make List's calls on one thread: per device open, LOOP_GET_STATUS64 (ENXIO for an unbound device) and, for a bound one, BLKSSZGET, BLKGETSIZE64, BLKGETDISKSEQ and a read of backing_file while the device is open, then close. The backing_file attribute is held open from one list to the next and read again at offset 0 (opened relative to /sys/devices/virtual/block the first time, or when the device was bound anew since); the fresh row opens and closes it each time instead, as losetup does. The two-thread row shares the devices between two threads, every other device each: what the kernel gives a second core. loopctl.List makes the held rows' calls, spread over GOMAXPROCS goroutines; its first call in a new process (the median of 7 processes a round) opens every backing_file, as the fresh row does, and starts its second goroutine's thread; the C row of a new process does the same on two threads, its second thread's start included. The losetup rows run `losetup --json --list`. The last two rows are what no program can go below as a process here: the C floor listing once on two threads, started as a process, and a Go program that does nothing.",
		rows: []*row{
			{impl: "C (one thread)", cOp: "list"},
			{impl: "C, backing_file opened afresh (one thread)", cOp: "list-fresh"},
			{impl: "C (two threads)", cOp: "list-2threads"},
			{impl: "C (two threads), first list of a new process", cOp: "list-2threads", cold: true},
			{impl: "Go floor (one goroutine)", goOp: "list/go"},
			{impl: "loopctl List", goOp: "list/loopctl"},
			{impl: "loopctl List, first call in a new process", goOp: "list/loopctl", cold: true},
			{impl: "util-linux losetup --json --list", procs: [][]string{{h.losetup, "--json", "--list"}}},
			{impl: "example losetup --json --list", procs: [][]string{{h.example, "--json", "--list"}}},
			{impl: "C making the C rows' calls once, as a process (no output)", procs: [][]string{{h.floor, "list-2threads", "1"}}},
			{impl: "empty Go program, as a process", procs: [][]string{{h.empty}}},
		},
	}
}

func (h *harness) findTable(n int) *table {
	return &table{
		title: fmt.Sprintf("FindByBackingFile, one file bound to %d devices", n), op: "find",
		note: "The devices of one file, found by its device and inode: stat of the file, then per device open, LOOP_GET_STATUS64 and, for the file's devices, BLKSSZGET, BLKGETSIZE64, BLKGETDISKSEQ and the backing_file read (held open, or opened afresh in the fresh row, as in the List table). The losetup rows run `losetup -j FILE`. The last two rows are what no program can go below as a process here: the C floor looking once on two threads, started as a process, and a Go program that does nothing.",
		rows: []*row{
			{impl: "C (one thread)", cOp: "find", file: true},
			{impl: "C, backing_file opened afresh (one thread)", cOp: "find-fresh", file: true},
			{impl: "C (two threads)", cOp: "find-2threads", file: true},
			{impl: "C (two threads), first look of a new process", cOp: "find-2threads", file: true, cold: true},
			{impl: "Go floor (one goroutine)", goOp: "find/go"},
			{impl: "loopctl FindByBackingFile", goOp: "find/loopctl"},
			{impl: "loopctl FindByBackingFile, first call in a new process", goOp: "find/loopctl", cold: true},
			{impl: "util-linux losetup -j FILE", procs: [][]string{{h.losetup, "-j", "{file}"}}},
			{impl: "example losetup -j FILE", procs: [][]string{{h.example, "-j", "{file}"}}},
			{impl: "C making the C rows' calls once, as a process (no output)", procs: [][]string{{h.floor, "find-2threads", "1", "{file}"}}},
			{impl: "empty Go program, as a process", procs: [][]string{{h.empty}}},
		},
	}
}

// A sweepPoint is GetFree against the scan it replaced, and List against
// losetup, at one count of bound devices.
type sweepPoint struct {
	bound                  int
	getFree, scanC, scanGo float64 // ns
	list, listC, losetup   float64 // ns
}

// sweepCounts binds more and more devices and measures, at each count,
// GetFree and the scan, and List; at 256 the List and FindByBackingFile
// tables too.
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
	tablesAt := 256
	if !slices.Contains(nums, tablesAt) {
		tablesAt = nums[len(nums)-1]
	}
	for _, n := range nums {
		log.Printf("binding %d devices", n)
		if err := h.bindTo(n); err != nil {
			return err
		}
		if n == tablesAt {
			for _, t := range []*table{h.listTable(n), h.findTable(n)} {
				if err := h.measure(t); err != nil {
					return err
				}
			}
		}
		t := &table{title: fmt.Sprintf("sweep at %d", n), rows: []*row{
			{impl: "loopctl GetFree", goOp: "getfree/loopctl"},
			{impl: "scan, C", cOp: "scan"},
			{impl: "scan, Go", goOp: "scan/go"},
			{impl: "loopctl List", goOp: "list/loopctl"},
			{impl: "C list", cOp: "list"},
			{impl: "losetup --json --list", procs: [][]string{{h.losetup, "--json", "--list"}}},
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
			getFree: t.rows[0].median(), scanC: t.rows[1].median(), scanGo: t.rows[2].median(),
			list: t.rows[3].median(), listC: t.rows[4].median(), losetup: t.rows[5].median()})
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
	fmt.Fprintln(w, "### GetFree against the scan it replaced, and List against losetup, by bound devices")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| bound | loopctl GetFree | scan (C) | scan (Go) | scan (C) ÷ GetFree | loopctl List | C list | losetup --json --list | losetup ÷ List |")
	fmt.Fprintln(w, "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
	for _, p := range h.sweep {
		fmt.Fprintf(w, "| %d | %s | %s | %s | %.0f | %s | %s | %s | %.1f |\n", p.bound, duration(p.getFree),
			duration(p.scanC), duration(p.scanGo), p.scanC/p.getFree, duration(p.list), duration(p.listC),
			duration(p.losetup), p.losetup/p.list)
	}
	fmt.Fprintln(w)
}
