//go:build integration

package loopctl

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/loopctl/loopctl/internal/kerneltest"
	"golang.org/x/sys/unix"
)

// envHoldBindings makes a test binary a holder of bindings (holdBindings)
// for the test that started it: "COUNT DIR REF".
const envHoldBindings = "LOOPCTL_HOLD_BINDINGS"

// A holder is another program holding loop devices bound: the test binary
// run again as holdBindings.
type holder struct {
	*pipedChild
	file string // the file bound to every device
	ref  string // the devices' owner reference
	nums []int  // the devices, added by the holder for itself
}

// holdBound starts a holder of count devices, added for the purpose and
// each bound to one file of the test's own with autoclear, and returns
// once they are bound. Cleanup has the holder let go of them and remove
// them, and removes any it could not.
func holdBound(t *testing.T, test string, count int) *holder {
	t.Helper()
	kerneltest.Require(t)
	dir := t.TempDir()
	h := &holder{file: filepath.Join(dir, kerneltest.LongName), ref: "holder-" + strconv.Itoa(os.Getpid())}
	if err := os.WriteFile(h.file, make([]byte, 64<<10), 0o644); err != nil {
		t.Fatal(err)
	}
	h.pipedChild = startPiped(t, test, fmt.Sprintf("%s=%d %s %s", envHoldBindings, count, h.file, h.ref))
	t.Cleanup(func() {
		h.stdin.Close()
		for h.out.Scan() {
		}
		if err := h.cmd.Wait(); err != nil {
			t.Errorf("the holder of %d devices: %v", count, err)
		}
		// What a holder that failed left: unbound once its descriptors
		// closed (autoclear), then the test's to remove.
		c, err := Open()
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		removeAll(t, c, slices.DeleteFunc(h.nums, func(n int) bool {
			_, err := os.Lstat("/sys/block/loop" + strconv.Itoa(n))
			return err != nil
		}))
	})
	for h.out.Scan() {
		line := h.out.Text()
		if line == "held" {
			if len(h.nums) != count {
				t.Fatalf("the holder bound %d devices, want %d", len(h.nums), count)
			}
			return h
		}
		var n int
		if _, err := fmt.Sscanf(line, "bound %d", &n); err == nil {
			h.nums = append(h.nums, n)
		}
	}
	t.Fatalf("the holder ended before it held %d devices (%d bound)", count, len(h.nums))
	return nil
}

// holdBindings is the holder itself, run by holdBound: it adds count
// devices, binds file to each with autoclear and ref, reports each as
// "bound N" and then "held", and waits for its standard input to close.
// Then it detaches them, each at its last close, and removes them.
func holdBindings(t *testing.T, spec string) {
	var count int
	var file, ref string
	if _, err := fmt.Sscanf(spec, "%d %s %s", &count, &file, &ref); err != nil {
		t.Fatalf("%s=%q: %v", envHoldBindings, spec, err)
	}
	c, err := Open()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	nums := addDevices(t, c, count)
	defer removeAll(t, c, nums)
	devs := make([]*Device, 0, count)
	defer func() {
		for _, d := range devs {
			if err := d.Detach(context.Background()); err != nil {
				t.Errorf("detaching %s: %v", d.Path(), err)
			}
		}
	}()
	for _, n := range nums {
		d, err := OpenDevice(n)
		if err != nil {
			t.Fatal(err)
		}
		devs = append(devs, d)
		if err := d.Configure(f, Options{Flags: FlagAutoClear | FlagReadOnly, Ref: ref}); err != nil {
			t.Fatal(err)
		}
		fmt.Printf("bound %d\n", n)
	}
	fmt.Println("held")
	io.Copy(io.Discard, os.Stdin)
}

// addDevices adds count loop devices and returns their numbers.
func addDevices(t testing.TB, c *Control, count int) []int {
	t.Helper()
	nums := make([]int, 0, count)
	for range count {
		n, err := c.Add(AnyNumber)
		if err != nil {
			removeAll(t, c, nums)
			t.Fatalf("adding device %d of %d: %v", len(nums)+1, count, err)
		}
		nums = append(nums, n)
	}
	return nums
}

// removeAll removes the devices nums, unbound, 64 at a time: the kernel
// takes tens of milliseconds over each removal, mostly waiting.
func removeAll(t testing.TB, c *Control, nums []int) {
	t.Helper()
	var next atomic.Int64
	var wg sync.WaitGroup
	for range min(64, len(nums)) {
		wg.Go(func() {
			for i := int(next.Add(1)) - 1; i < len(nums); i = int(next.Add(1)) - 1 {
				kerneltest.WaitUnbound(t, nums[i])
				if err := c.Remove(nums[i]); err != nil {
					t.Errorf("removing loop%d: %v", nums[i], err)
				}
			}
		})
	}
	wg.Wait()
}

// TestKernelLookupsHoldNothing counts the process's descriptors before and
// after each lookup, with 40 devices bound by another program: List,
// FindByBackingFile, FindByRef, Attach with Reuse (after the shared
// device's Close), and Sweep of a reference that matches nothing. Each
// must leave them as they were: nothing is held from one call to the next.
// (uevent's TestKernelMonitorHoldsNothing checks the Monitor's looks.)
func TestKernelLookupsHoldNothing(t *testing.T) {
	if spec := os.Getenv(envHoldBindings); spec != "" {
		holdBindings(t, spec)
		return
	}
	h := holdBound(t, "TestKernelLookupsHoldNothing", 40)
	mine := func(list []Status) []int {
		var nums []int
		for _, s := range list {
			if s.Ref == h.ref {
				nums = append(nums, s.Number)
			}
		}
		return nums
	}
	// What the process keeps by design: the control device Attach shares
	// (see Attach), internal state opened first so that the count leaves
	// it out.
	if _, err := host.sharedControl(); err != nil {
		t.Fatal(err)
	}
	for _, l := range []struct {
		name string
		run  func() error
	}{
		{"List", func() error {
			list, err := List()
			if err == nil && !slices.Equal(mine(list), h.nums) {
				err = fmt.Errorf("listed %v of the holder's, want %v", mine(list), h.nums)
			}
			return err
		}},
		{"FindByBackingFile", func() error {
			found, err := FindByBackingFile(h.file)
			if err == nil && !slices.Equal(mine(found), h.nums) {
				err = fmt.Errorf("found %v, want %v", mine(found), h.nums)
			}
			return err
		}},
		{"FindByRef", func() error {
			found, err := FindByRef(h.ref)
			if err == nil && !slices.Equal(mine(found), h.nums) {
				err = fmt.Errorf("found %v, want %v", mine(found), h.nums)
			}
			return err
		}},
		{"Attach with Reuse", func() error {
			d, err := Attach(context.Background(), h.file, Options{Flags: FlagAutoClear | FlagReadOnly, Ref: h.ref, Reuse: true})
			if err != nil {
				return err
			}
			defer d.Close()
			if !d.Shared() || !slices.Contains(h.nums, d.Number()) {
				return fmt.Errorf("Attach with Reuse gave %s, shared %t; want one of the holder's", d.Path(), d.Shared())
			}
			return nil
		}},
		{"Sweep", func() error {
			swept, err := Sweep(context.Background(), "nobody-"+h.ref)
			if err == nil && len(swept) != 0 {
				err = fmt.Errorf("swept %+v", swept)
			}
			return err
		}},
	} {
		before := kerneltest.OpenFDs(t)
		if err := l.run(); err != nil {
			t.Fatalf("%s: %v", l.name, err)
		}
		if left := kerneltest.NewFDs(t, before); len(left) != 0 {
			t.Errorf("%s: descriptors %v left open", l.name, left)
		}
	}
}

// TestKernelLookupsUnderFileLimit binds 300 devices in another program,
// then lowers RLIMIT_NOFILE to a few dozen above what this process has
// open: List and FindByBackingFile return all 300, three times in a row,
// and the process can still open files after.
func TestKernelLookupsUnderFileLimit(t *testing.T) {
	if spec := os.Getenv(envHoldBindings); spec != "" {
		holdBindings(t, spec)
		return
	}
	const count = 300
	h := holdBound(t, "TestKernelLookupsUnderFileLimit", count)
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			t.Errorf("setting RLIMIT_NOFILE back: %v", err)
		}
	})
	open := kerneltest.OpenFDs(t)
	low := lim
	low.Cur = uint64(slices.Max(slices.Collect(maps.Keys(open)))) + 1 + 36
	if low.Cur >= count {
		t.Fatalf("%d descriptors open already: the test needs a limit below %d", len(open), count)
	}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &low); err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		list, err := List()
		if err != nil {
			t.Fatalf("List %d with RLIMIT_NOFILE %d: %v", i+1, low.Cur, err)
		}
		found, err := FindByBackingFile(h.file)
		if err != nil {
			t.Fatalf("FindByBackingFile %d with RLIMIT_NOFILE %d: %v", i+1, low.Cur, err)
		}
		for what, got := range map[string][]Status{"List": list, "FindByBackingFile": found} {
			var nums []int
			for _, s := range got {
				if s.Ref == h.ref {
					nums = append(nums, s.Number)
				}
			}
			if !slices.Equal(nums, h.nums) {
				t.Fatalf("%s %d gave %d of the holder's %d devices", what, i+1, len(nums), count)
			}
		}
	}
	// The process can still open files: nothing was left open.
	f, err := os.CreateTemp(t.TempDir(), "after")
	if err != nil {
		t.Fatalf("opening a file after the lookups: %v", err)
	}
	f.Close()
	if after := kerneltest.OpenFDs(t); !maps.Equal(after, open) {
		t.Errorf("descriptors %v after the lookups, %v before", after, open)
	}
}

// TestKernelListThousands adds 4,096 loop devices, binds some, and checks
// that List and FindByBackingFile give exactly the bound ones, bound anew
// and unbound; then it removes them. The benchmark harness measures at
// this scale in the same way (internal/bench).
func TestKernelListThousands(t *testing.T) {
	if testing.Short() {
		t.Skip("adds 4,096 loop devices: not with -short")
	}
	c := openControl(t)
	nums := addDevices(t, c, 4096)
	t.Cleanup(func() { removeAll(t, c, nums) })
	f := kerneltest.TempFile(t, 1<<20)
	var bound []int
	var devs []*Device
	t.Cleanup(func() {
		for _, d := range devs {
			detach(t, d)
		}
	})
	// Every 97th device and the last: bound devices among many unbound,
	// on both sides of each reader's share.
	for i, n := range nums {
		if i%97 != 0 && i != len(nums)-1 {
			continue
		}
		d, err := OpenDevice(n)
		if err != nil {
			t.Fatal(err)
		}
		devs = append(devs, d)
		if err := d.Configure(f, Options{Flags: FlagReadOnly}); err != nil {
			t.Fatal(err)
		}
		bound = append(bound, n)
	}
	check := func(want []int) {
		t.Helper()
		list, err := List()
		if err != nil {
			t.Fatal(err)
		}
		found, err := FindByBackingFile(f.Name())
		if err != nil {
			t.Fatal(err)
		}
		for what, got := range map[string][]Status{"List": list, "FindByBackingFile": found} {
			var ours []int
			for _, s := range got {
				if _, ok := slices.BinarySearch(nums, s.Number); ok {
					ours = append(ours, s.Number)
					if s.BackingFile != f.Name() || s.Flags != FlagReadOnly || s.Size != 1<<20 {
						t.Errorf("%s: %+v", what, s)
					}
				}
			}
			if !slices.Equal(ours, want) {
				t.Fatalf("%s gave %v of the test's devices, want %v", what, ours, want)
			}
			if !slices.IsSortedFunc(got, func(a, b Status) int { return a.Number - b.Number }) {
				t.Fatalf("%s not in order of number", what)
			}
		}
	}
	check(bound)
	// Half of them let go of.
	var kept []int
	for i, d := range devs {
		if i%2 == 0 {
			kept = append(kept, d.Number())
			continue
		}
		clearAlone(t, d)
		d.Close()
		kerneltest.WaitUnbound(t, d.Number())
	}
	check(kept)
}

// TestKernelListNames checks that List reads the binding of now (a file
// renamed or deleted since, another file bound since, the device unbound
// or removed), and holds no descriptor from one List to the next.
func TestKernelListNames(t *testing.T) {
	c := openControl(t)
	n, err := c.Add(AnyNumber)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if d, err := OpenDevice(n); err == nil {
			detach(t, d)
			kerneltest.WaitUnbound(t, n)
		}
		if err := c.Remove(n); err != nil && !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("removing the test's device: %v", err)
		}
	})
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	for _, p := range []string{a, b} {
		if err := os.WriteFile(p, make([]byte, 1<<20), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	listed := func(want string) {
		t.Helper()
		before := kerneltest.OpenFDs(t)
		list, err := List()
		if err != nil {
			t.Fatal(err)
		}
		i := slices.IndexFunc(list, func(s Status) bool { return s.Number == n })
		switch {
		case want == "" && i >= 0:
			t.Fatalf("List has %+v, want loop%d unbound", list[i], n)
		case want != "" && i < 0:
			t.Fatalf("List lacks loop%d, want it on %s", n, want)
		case want != "" && list[i].BackingFile != want:
			t.Fatalf("List has %+v, want loop%d on %s", list[i], n, want)
		}
		if after := kerneltest.OpenFDs(t); !maps.Equal(after, before) {
			t.Fatalf("descriptors %v after List, %v before", after, before)
		}
	}
	// Each step opens the device and closes it: a cleared device is torn
	// down at its last close.
	bind := func(path string) {
		t.Helper()
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		d, err := OpenDevice(n)
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		if err := d.Configure(f, Options{Flags: FlagReadOnly}); err != nil {
			t.Fatal(err)
		}
	}
	clear := func() {
		t.Helper()
		d, err := OpenDevice(n)
		if err != nil {
			t.Fatal(err)
		}
		if err := d.ClearFD(); err != nil {
			t.Fatal(err)
		}
		d.Close()
		kerneltest.WaitUnbound(t, n)
	}

	bind(a)
	listed(a)
	listed(a)
	renamed := a + "-renamed"
	if err := os.Rename(a, renamed); err != nil {
		t.Fatal(err)
	}
	listed(renamed)
	clear()
	bind(b)
	listed(b)
	if err := os.Remove(b); err != nil {
		t.Fatal(err)
	}
	listed(b + " (deleted)")
	clear()
	listed("")

	// A device removed is listed no more.
	bind(renamed)
	listed(renamed)
	clear()
	if err := c.Remove(n); err != nil {
		t.Fatal(err)
	}
	listed("")
}

// TestKernelListRundown checks what the package reports for a device between
// LOOP_CLR_FD and its last close, where Linux 6.11 and later keep it in
// "rundown": still in sysfs, but refusing opens with ENXIO.
func TestKernelListRundown(t *testing.T) {
	f := kerneltest.TempFile(t, 1<<20)
	d := attachT(t, f.Name(), Options{})
	clearAlone(t, d)
	inSysfs := len(boundUnder(t, filepath.Dir(f.Name()))) == 1
	_, err := d.Status()
	wantErrno(t, err, unix.ENXIO, ErrNotBound)
	od, err := OpenDevice(d.Number())
	switch {
	case inSysfs:
		// A kernel with detach at last close: the device is half torn down.
		if !errors.Is(err, ErrNotBound) || !errors.Is(err, unix.ENXIO) || !strings.Contains(err.Error(), "detached") {
			t.Fatalf("OpenDevice in rundown = %v, want ENXIO explained, matching ErrNotBound", err)
		}
		t.Logf("kernel %s keeps the device in sysfs until the last close", kerneltest.Release())
	case err != nil:
		t.Fatalf("OpenDevice after LOOP_CLR_FD = %v", err)
	default:
		od.Close() // an older kernel: LOOP_CLR_FD tore down at once
	}
	if list, err := FindByBackingFile(f.Name()); err != nil || len(list) != 0 {
		t.Fatalf("FindByBackingFile = %+v, %v; want nothing while the device is torn down", list, err)
	}
	list, err := List()
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range list {
		if s.Number == d.Number() {
			t.Fatalf("List reports %+v", s)
		}
	}
	d.Close()
	if left := boundUnder(t, filepath.Dir(f.Name())); len(left) != 0 {
		t.Fatalf("after the last close: %v", left)
	}
	od, err = OpenDevice(d.Number())
	if err != nil {
		t.Fatalf("OpenDevice after the teardown: %v", err)
	}
	od.Close()
}
