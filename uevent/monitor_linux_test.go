package uevent

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"testing"
	"time"
)

// TestChanges: a device's change uevents, read late or on time, make each
// binding's Bound and Unbound once, in order.
func TestChanges(t *testing.T) {
	t.Parallel()
	b := func(seq uint64) Event { return Event{Kind: EventBound, Number: 3, DiskSeq: seq} }
	u := func(seq uint64) Event { return Event{Kind: EventUnbound, Number: 3, DiskSeq: seq} }
	st := func(bound bool, seq uint64) devState { return devState{bound: bound, diskSeq: seq} }
	for _, tt := range []struct {
		name      string
		last, now devState
		seq       uint64 // the uevent's DISKSEQ
		want      []Event
		then      devState
	}{
		{"bind, read on time", st(false, 9), st(true, 10), 10, []Event{b(10)}, st(true, 10)},
		{"unbind, read on time", st(true, 10), st(false, 11), 10, []Event{u(10)}, st(false, 10)},
		{"unbind's second event", st(false, 10), st(false, 11), 10, nil, st(false, 10)},
		{"unbind, the number not moved on yet", st(true, 10), st(false, 10), 10, []Event{u(10)}, st(false, 10)},
		{"bind, read after its unbind", st(false, 9), st(false, 11), 10, []Event{b(10), u(10)}, st(false, 10)},
		{"bind, read after a later bind", st(false, 9), st(true, 12), 10, []Event{b(10), u(10)}, st(false, 10)},
		{"the later bind's own event", st(false, 10), st(true, 12), 12, []Event{b(12)}, st(true, 12)},
		{"unbind, read after the next bind", st(true, 10), st(true, 12), 10, []Event{u(10)}, st(false, 10)},
		{"a bind whose unbind was missed", st(true, 10), st(true, 12), 12, []Event{u(10), b(12)}, st(true, 12)},
		{"an event older than the last reported", st(true, 12), st(true, 12), 10, nil, st(true, 12)},
		{"a rescan of a bound device", st(true, 12), st(true, 12), 12, nil, st(true, 12)},
		{"before 5.15: bound", st(false, 0), st(true, 0), 0, []Event{b(0)}, st(true, 0)},
		{"before 5.15: unbound", st(true, 0), st(false, 0), 0, []Event{u(0)}, st(false, 0)},
		{"before 5.15: nothing new", st(true, 0), st(true, 0), 0, nil, st(true, 0)},
	} {
		got, then := changes(tt.last, tt.now, uevent{action: "change", number: 3, diskSeq: tt.seq}, Event{Number: 3})
		if !slices.Equal(got, tt.want) || !slices.Equal(then.parts, tt.then.parts) || then.bound != tt.then.bound || then.diskSeq != tt.then.diskSeq {
			t.Errorf("%s: %+v, then %+v; want %+v, then %+v", tt.name, got, then, tt.want, tt.then)
		}
	}
}

// TestPollEvents: what a polling Monitor makes of two looks at sysfs.
func TestPollEvents(t *testing.T) {
	t.Parallel()
	before := map[int]devState{
		0: {bound: true, diskSeq: 5, size: 100},
		1: {bound: true, diskSeq: 6, size: 100, parts: []int{1, 2}},
		2: {diskSeq: 7},
		3: {bound: true, diskSeq: 8, size: 100},
	}
	now := map[int]devState{
		0: {bound: true, diskSeq: 5, size: 200},                     // resized
		1: {bound: true, diskSeq: 6, size: 100, parts: []int{2, 3}}, // a partition gone, another come
		2: {bound: true, diskSeq: 9},                                // bound
		3: {bound: true, diskSeq: 12, size: 100},                    // bound anew
		4: {diskSeq: 13},                                            // added
	}
	want := []Event{
		{Kind: EventResized, Number: 0, DiskSeq: 5},
		{Kind: EventPartitionRemoved, Number: 1, Partition: 1, DiskSeq: 6},
		{Kind: EventPartitionAdded, Number: 1, Partition: 3, DiskSeq: 6},
		{Kind: EventBound, Number: 2, DiskSeq: 9},
		{Kind: EventUnbound, Number: 3, DiskSeq: 8},
		{Kind: EventBound, Number: 3, DiskSeq: 12},
		{Kind: EventAdded, Number: 4},
	}
	if got := pollEvents(before, now); !slices.Equal(got, want) {
		t.Fatalf("pollEvents:\n%+v\nwant:\n%+v", got, want)
	}
	gone := map[int]devState{0: {bound: true, diskSeq: 5, parts: []int{1}}}
	want = []Event{{Kind: EventPartitionRemoved, Number: 0, Partition: 1, DiskSeq: 5},
		{Kind: EventUnbound, Number: 0, DiskSeq: 5}, {Kind: EventRemoved, Number: 0}}
	if got := pollEvents(gone, map[int]devState{}); !slices.Equal(got, want) {
		t.Fatalf("pollEvents of a device removed:\n%+v\nwant:\n%+v", got, want)
	}
}

// TestMonitorCloseWakesPoll checks that Close wakes a Next waiting for a
// polling Monitor's next look, which is an hour away.
func TestMonitorCloseWakesPoll(t *testing.T) {
	t.Parallel()
	m := &Monitor{polling: true, done: make(chan struct{})}
	m.SetPollInterval(time.Hour)
	errc := make(chan error, 1)
	go func() {
		_, err := m.Next(context.Background())
		errc <- err
	}()
	// Next holds the Monitor's lock while it waits.
	for m.mu.TryLock() {
		m.mu.Unlock()
		runtime.Gosched()
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-errc:
		if !errors.Is(err, fs.ErrClosed) {
			t.Fatalf("Next after Close = %v, want fs.ErrClosed", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("Next still waits a minute after Close")
	}
}

// TestMonitorPollingTree: a polling Monitor of a sysfs tree of the test's
// own reports a device added, bound with a partition, resized, unbound
// and removed, as the tree shows them. Each state of the device is a
// directory of its own, and /block/loop7 a symbolic link to it (as in
// sysfs), replaced in one rename: a look sees one state or the next.
func TestMonitorPollingTree(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	if err := os.MkdirAll(root+"/block", 0o755); err != nil {
		t.Fatal(err)
	}
	states := 0
	show := func(attrs map[string]string) {
		t.Helper()
		states++
		dir := fmt.Sprintf("%s/state%d", root, states)
		for name, v := range attrs {
			if err := os.MkdirAll(filepath.Dir(dir+"/"+name), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(dir+"/"+name, []byte(v+"\n"), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		if err := os.Symlink(dir, root+"/new"); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(root+"/new", root+"/block/loop7"); err != nil {
			t.Fatal(err)
		}
	}
	m, err := open(root, true)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	m.SetPollInterval(time.Millisecond)
	expect := func(what string, want ...Event) {
		t.Helper()
		var got []Event
		for len(got) < len(want) {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			e, err := m.Next(ctx)
			cancel()
			if err != nil {
				t.Fatalf("%s: %v", what, err)
			}
			got = append(got, e)
		}
		if !slices.Equal(got, want) {
			t.Fatalf("%s: events %+v, want %+v", what, got, want)
		}
	}
	show(map[string]string{"diskseq": "40", "size": "0"})
	expect("add", Event{Kind: EventAdded, Number: 7})
	bound := map[string]string{"diskseq": "41", "size": "2048", "loop/backing_file": "/img", "loop7p1/start": "2048"}
	show(bound)
	expect("bind with a partition", Event{Kind: EventBound, Number: 7, DiskSeq: 41},
		Event{Kind: EventPartitionAdded, Number: 7, Partition: 1, DiskSeq: 41})
	bound["size"] = "4096"
	show(bound)
	expect("resize", Event{Kind: EventResized, Number: 7, DiskSeq: 41})
	show(map[string]string{"diskseq": "41", "size": "0"})
	expect("unbind", Event{Kind: EventPartitionRemoved, Number: 7, Partition: 1, DiskSeq: 41},
		Event{Kind: EventUnbound, Number: 7, DiskSeq: 41})
	if err := os.Remove(root + "/block/loop7"); err != nil {
		t.Fatal(err)
	}
	expect("remove", Event{Kind: EventRemoved, Number: 7})
}
