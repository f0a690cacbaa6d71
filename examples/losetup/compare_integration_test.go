//go:build integration && linux

package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/loopctl/loopctl"
	"github.com/loopctl/loopctl/internal/kerneltest"
	"github.com/loopctl/loopctl/internal/testlock"
)

// The test binary is this losetup too: run as "losetup" with
// LOSETUP_MAIN=1, it is the program, so that both tools are compared as
// processes, with the same argv[0] and environment.
//
// The comparisons list every loop device, so the machine's must stay still
// while both programs run: the module's test packages take turns
// (internal/testlock); other activity on the machine makes them differ.
func TestMain(m *testing.M) {
	if os.Getenv("LOSETUP_MAIN") == "1" {
		os.Exit(run(os.Args, os.Stdout, os.Stderr))
	}
	os.Exit(testlock.Run(m))
}

const utilLinux = "/usr/sbin/losetup"

// result is what a run printed and returned.
type result struct {
	stdout, stderr string
	code           int
}

func (r result) String() string {
	return fmt.Sprintf("exit %d\n--- stdout\n%s--- stderr\n%s", r.code, r.stdout, r.stderr)
}

// raceNoExitSleep keeps a race-enabled program from sleeping a second as
// it exits (the race detector's default, to let other threads report),
// which would make the comparisons' hundreds of runs take minutes.
var raceNoExitSleep = "GORACE=" + strings.TrimSpace(os.Getenv("GORACE")+" atexit_sleep_ms=0")

// runTool runs util-linux's losetup (ours false) or this one with args,
// named "losetup", in the locale given.
func runTool(t *testing.T, ours bool, locale string, args ...string) result {
	t.Helper()
	path := utilLinux
	if ours {
		path = os.Args[0]
	}
	cmd := &exec.Cmd{Path: path, Args: append([]string{"losetup"}, args...)}
	cmd.Env = append(os.Environ(), "LC_ALL="+locale)
	if ours {
		cmd.Env = append(cmd.Env, "LOSETUP_MAIN=1", raceNoExitSleep)
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return result{stdout.String(), stderr.String(), code}
}

// requireRoot skips without root and util-linux, or fails under
// LOOPCTL_REQUIRE_INTEGRATION=1.
func requireRoot(t testing.TB) {
	t.Helper()
	reason := ""
	if os.Geteuid() != 0 {
		reason = "needs root: run the integration tests as root"
	} else if _, err := os.Stat(utilLinux); err != nil {
		reason = utilLinux + " is missing: the comparison needs util-linux"
	} else if _, err := os.Stat(loopctl.ControlPath); err != nil {
		reason = loopctl.ControlPath + " is missing: load the loop driver (modprobe loop)"
	}
	if reason == "" {
		return
	}
	if os.Getenv("LOOPCTL_REQUIRE_INTEGRATION") == "1" {
		t.Fatal(reason + "; LOOPCTL_REQUIRE_INTEGRATION=1 forbids skipping")
	}
	t.Skip(reason)
}

// A fixture is a set of bindings of the test's own, and names for them.
type fixture struct {
	dir                string
	plain, odd, ro     string // backing files: plain, with awkward names, read-only bound
	small, unaligned   string // 100 and 1000 bytes
	devPlain, devOdd   string
	devRO, devFree     string // devFree: unbound
	devs               []*loopctl.Device
	missing, directory string
	offsetRO           uint64
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	requireRoot(t)
	f := &fixture{dir: t.TempDir()}
	mk := func(rel string, size int64) string {
		p := filepath.Join(f.dir, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(p, size); err != nil {
			t.Fatal(err)
		}
		return p
	}
	f.plain = mk("a.img", 1<<20)
	f.odd = mk("dir with space/b \"q\" é\ttab\\x41.img", 2<<20)
	f.ro = mk("ro.img", 1<<20)
	f.small = mk("small.img", 100)
	f.unaligned = mk("unaligned.img", 1000)
	f.missing = filepath.Join(f.dir, "missing.img")
	f.directory = f.dir
	f.offsetRO = 4096
	for _, b := range []struct {
		file string
		o    loopctl.Options
		dev  *string
	}{
		{f.plain, loopctl.Options{}, &f.devPlain},
		{f.odd, loopctl.Options{Flags: loopctl.FlagPartScan | loopctl.FlagAutoClear}, &f.devOdd},
		{f.ro, loopctl.Options{Offset: f.offsetRO, SizeLimit: 8192, BlockSize: 4096, Flags: loopctl.FlagReadOnly}, &f.devRO},
	} {
		d, err := loopctl.Attach(context.Background(), b.file, b.o)
		if err != nil {
			t.Fatal(err)
		}
		f.devs = append(f.devs, d)
		*b.dev = d.Path()
	}
	t.Cleanup(func() {
		for _, d := range f.devs {
			d.ClearFD()
			d.Close()
		}
	})
	f.devFree = loopctl.DevicePath(addDevice(t))
	return f
}

// addDevice creates a device of the test's own, removed at the end.
func addDevice(t *testing.T) int {
	t.Helper()
	ctl, err := loopctl.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer ctl.Close()
	n, err := ctl.Add(loopctl.AnyNumber)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { removeDevice(t, n) })
	return n
}

// removeDevice detaches what a run bound to device n and removes it.
func removeDevice(t *testing.T, n int) {
	t.Helper()
	if d, err := loopctl.OpenDevice(n); err == nil {
		d.ClearFD()
		d.Close()
		kerneltest.WaitUnbound(t, n) // at the last close, maybe udev's
	}
	ctl, err := loopctl.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer ctl.Close()
	if err := ctl.Remove(n); err != nil && !errors.Is(err, fs.ErrNotExist) {
		t.Error(err)
	}
}

// compare runs both tools with args and reports any difference.
func compare(t *testing.T, locale string, args ...string) result {
	t.Helper()
	want := runTool(t, false, locale, args...)
	got := runTool(t, true, locale, args...)
	if got != want {
		t.Errorf("losetup %q, LC_ALL=%s:\nutil-linux:\n%s\nloopctl:\n%s", args, locale, want, got)
	}
	return want
}

// TestCompareReadOnly runs the forms that change nothing with both tools,
// on the same devices, in the C and a UTF-8 locale.
func TestCompareReadOnly(t *testing.T) {
	f := newFixture(t)
	forms := [][]string{
		{},
		{"-a"}, {"--all"}, {"-l"}, {"--list"}, {"-l", "-n"}, {"--raw"}, {"-J"}, {"-l", "--raw"}, {"-l", "-J"},
		{"-l", "--raw", "-n"}, {"-l", "-J", "-n"}, {"-l", "--output-all"}, {"--output-all", "-l", "--raw"},
		{"-J", "--output-all", "-l"}, {"-l", "-O", "NAME,BACK-INO,BACK-MAJ:MIN,MAJ:MIN,PARTSCAN"},
		{"-l", "-O", "+MAJ:MIN"}, {"-O", "name,ro"}, {"-l", "-O", "log-sec,dio,name"},
		{"-j", f.plain}, {"-j", f.ro, "-o", "4096"}, {"-j", f.ro, "-o", "4KiB"}, {"-j", f.ro, "-o", "512"},
		{"-l", "-j", f.odd}, {"-J", "-l", "-j", f.missing}, {"--raw", "-l", "-j", f.missing}, {"-l", "-j", f.missing},
		{"--associated", f.plain}, {"-j", f.missing},
		{f.devPlain}, {f.devRO}, {f.devOdd}, {"-l", f.devPlain}, {"-J", "-l", f.devRO}, {"--raw", "-n", "-l", f.devOdd},
		{"--output-all", "-l", f.devOdd}, {"-J", f.devPlain}, {"--output-all", f.devPlain}, {"-v", "-l", f.devPlain},
		{f.devFree}, {"-l", f.devFree}, {"-J", "-l", f.devFree}, {"--raw", "-l", "--output-all", f.devFree},
		{"-l", "-O", "NAME,BACK-FILE", f.devFree},
		// Mistakes: the same words, on stderr, and exit status 1.
		{"-x"}, {"--bogus"}, {"--bogus=1"}, {"--s"}, {"--d"}, {"--o"}, {"--show=1"}, {"--all=x"}, {"--offset"},
		{"-o"}, {"-j"}, {"-O"}, {"-a", "-d", f.devPlain}, {"-D", "-l"}, {"-c", f.devPlain, "-f"}, {"--raw", "-J"},
		{"-l", "-O", "FOO"}, {"-l", "-O", "NAME,,RO"}, {"-O", "", f.devPlain}, {"-O", "NAME,", f.devPlain},
		{"-r"}, {"-n"}, {"-L"}, {"-o", "10", "-a"}, {"--sizelimit", "10", "-l"}, {"--show", "-a"}, {"-P", f.devPlain},
		{"-f", f.plain, "extra"}, {"/dev/loop999999"}, {f.plain}, {"loop0"}, {"-d", "loop0"}, {"-c", f.plain},
		{"--direct-io=maybe", f.devPlain}, {"-o", "1x", "-f", f.plain}, {"-o", "-1", "-f", f.plain},
		{"--sizelimit", "1Q", "-f", f.plain}, {"-b", "x", f.devPlain}, {"-o", "18446744073709551616", "-j", f.plain},
		{"-d", f.devFree}, {"-c", f.devFree},
	}
	locales := []string{"C", "C.UTF-8"}
	if testing.Short() {
		locales = locales[:1] // the locale's part does not depend on the kernel
	}
	for _, locale := range locales {
		for _, args := range forms {
			compare(t, locale, args...)
		}
	}
}

// TestCompareSizes cross-checks size parsing with util-linux's: each tool
// binds a file with the size as its offset and size limit, and what they
// print and the binding they leave must agree. Parsing does not depend on
// the kernel, so -short (the test machines) leaves it out.
func TestCompareSizes(t *testing.T) {
	if testing.Short() {
		t.Skip("size parsing is the same on every kernel; -short leaves it to the host")
	}
	f := newFixture(t)
	for _, s := range []string{
		"4096", "4KiB", "4K", "4k", "4kib", "4KB", "4Kb", "4096B", "0x1000", "0X1000", "010000", " 4096", "+4096",
		"-4096", "4.0K", "4.0KiB", "4.00K", "3.5K", "0.004MiB", "1.5K", "2.25K", "4KiBB", "4Ki", "4i", "", "4 K",
		"18446744073709551615", "18446744073709551616", "99999999999999999999E", "1E", "16E", "15E", "7E", "0x", "09",
		"0.5Y", "1.K", "4.5", "0x1.8K", "1.08K", "1.010K", "4Y", "1Z", "0.999999999999999999999K", "1.00000000000000000001E",
		"0x1p3", "1e3", "0b101", "1.5", "1.0", "0.1Z", "7.99999E", "1.05GB", "3.14159MiB",
	} {
		args := []string{"-f", "--show", "-o", s, "--sizelimit", s, f.plain}
		want, wantState := runChange(t, f, false, args)
		got, gotState := runChange(t, f, true, args)
		if got != want || gotState != wantState {
			t.Errorf("losetup %q:\nutil-linux:\n%s--- devices after\n%s\nloopctl:\n%s--- devices after\n%s",
				args, want, wantState, got, gotState)
		}
	}
}

// TestCompareChanges runs each form that changes devices with util-linux,
// records what it printed and what it left, restores the devices, and does
// the same with this losetup: outputs and outcomes must agree. Device
// numbers agree too, as both get the same from LOOP_CTL_GET_FREE.
func TestCompareChanges(t *testing.T) {
	f := newFixture(t)
	for _, tt := range []struct {
		name string
		args []string
		skip string
	}{
		{"attach", []string{"-f", "--show", f.plain}, ""},
		{"attach, no --show", []string{"-f", f.plain}, ""},
		{"attach read-only", []string{"--show", "-r", "-f", f.plain}, ""},
		{"attach with offset and size", []string{"-f", "--show", "-o", "4096", "--sizelimit", "64KiB", f.plain}, ""},
		{"attach partscan, 4K sectors", []string{"-f", "--show", "-P", "-b", "4096", f.plain}, ""},
		{"attach with direct I/O", []string{"-f", "--show", "--direct-io", f.plain}, noDirectIO(t, f.dir)},
		{"attach with direct I/O off", []string{"-f", "--show", "--direct-io=off", f.plain}, ""},
		{"attach awkward name", []string{"-f", "--show", f.odd}, ""},
		{"attach small file", []string{"-f", "--show", f.small}, ""},
		{"attach unaligned file", []string{"-f", "--show", f.unaligned}, ""},
		{"attach beyond the end", []string{"-f", "--show", "-o", "2MiB", f.plain}, ""},
		{"attach missing file", []string{"-f", "--show", f.missing}, ""},
		{"attach to a device", []string{f.devFree, f.plain}, ""},
		{"attach to a device, relative name", []string{strings.TrimPrefix(f.devFree, "/dev/"), f.plain}, ""},
		{"attach to a bound device", []string{f.devPlain, f.plain}, ""},
		{"attach missing file to a device", []string{f.devFree, f.missing}, ""},
		{"attach to no device", []string{filepath.Join(f.dir, "nodev"), f.plain}, ""},
		{"nooverlap, same range: reused", []string{"-f", "--show", "-L", f.plain}, ""},
		{"nooverlap, read-only asked, read-write found", []string{"-f", "--show", "-L", "-r", f.plain}, ""},
		{"nooverlap, read-only found", []string{"-f", "--show", "-L", "-o", "4096", "--sizelimit", "8192", f.ro}, ""},
		{"nooverlap, overlapping", []string{"-f", "--show", "-L", "-o", "512", f.plain}, ""},
		{"nooverlap, elsewhere", []string{"-f", "--show", "-L", "-o", "64KiB", "--sizelimit", "4096", f.ro}, ""},
		{"nooverlap to a device", []string{"-L", f.devFree, f.plain}, ""},
		{"find free", []string{"-f"}, ""},
		{"detach", []string{"-d", f.devPlain}, ""},
		{"detach two", []string{"-d", f.devPlain, f.devRO}, ""},
		{"detach, then no device", []string{"-d", f.devPlain, "/dev/loop999999"}, ""},
		{"detach unbound", []string{"-d", f.devFree}, ""},
		{"set capacity", []string{"-c", f.devPlain}, ""},
		{"direct I/O on", []string{"--direct-io=on", f.devPlain}, noDirectIO(t, f.dir)},
		{"direct I/O off", []string{"--direct-io=off", f.devPlain}, ""},
		{"sector size", []string{"-b", "4096", f.devPlain}, ""},
		{"bad sector size", []string{"-b", "999", f.devPlain}, ""},
		{"detach all", []string{"-D"}, onlyInVM()},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if tt.skip != "" {
				t.Skip(tt.skip)
			}
			want, wantState := runChange(t, f, false, tt.args)
			got, gotState := runChange(t, f, true, tt.args)
			if got != want || gotState != wantState {
				t.Errorf("losetup %q:\nutil-linux:\n%s--- devices after\n%s\nloopctl:\n%s--- devices after\n%s",
					tt.args, want, wantState, got, gotState)
			}
		})
	}
}

// runChange runs one tool and returns what it printed and the bindings of
// the test's files then (util-linux's listing of them), and puts the
// fixture's devices back as they were.
func runChange(t *testing.T, f *fixture, ours bool, args []string) (result, string) {
	t.Helper()
	r := runTool(t, ours, "C", args...)
	state := runTool(t, false, "C", "-l", "-O", "NAME,SIZELIMIT,OFFSET,AUTOCLEAR,RO,BACK-FILE,DIO,LOG-SEC,PARTSCAN")
	var mine []string
	for _, line := range strings.Split(state.stdout, "\n") {
		if strings.Contains(line, f.dir) {
			mine = append(mine, line)
		}
	}
	f.restore(t)
	return r, strings.Join(mine, "\n")
}

// restore detaches what a run bound to the fixture's files, beyond the
// fixture's own devices, and rebinds those of the fixture it detached.
func (f *fixture) restore(t *testing.T) {
	t.Helper()
	keep := map[string]bool{}
	for _, d := range f.devs {
		keep[d.Path()] = true
	}
	for _, file := range []string{f.plain, f.odd, f.ro, f.small, f.unaligned} {
		found, err := loopctl.FindByBackingFile(file)
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range found {
			if keep[loopctl.DevicePath(s.Number)] {
				continue
			}
			d, err := loopctl.OpenDevice(s.Number)
			if err != nil {
				t.Fatal(err)
			}
			d.ClearFD()
			d.Close()
			// The detach runs at the last close, which may be udev's.
			kerneltest.WaitUnbound(t, s.Number)
		}
	}
	for _, d := range f.devs {
		s, err := d.Status()
		if err == nil {
			// Undo what a run may have changed on it.
			if s.Flags&loopctl.FlagDirectIO != 0 {
				d.SetDirectIO(false)
			}
			if s.BlockSize != 512 && s.Flags&loopctl.FlagReadOnly == 0 {
				d.SetBlockSize(512)
			}
			continue
		}
		// Detached by the run: bind the fixture's file again, on the
		// same device, once it is gone.
		d.Close()
		kerneltest.WaitUnbound(t, d.Number())
		file, o := f.plain, loopctl.Options{}
		if d.Path() == f.devRO {
			file, o = f.ro, loopctl.Options{Offset: f.offsetRO, SizeLimit: 8192, BlockSize: 4096, Flags: loopctl.FlagReadOnly}
		}
		nd, err := loopctl.OpenDevicePath(d.Path())
		if err != nil {
			t.Fatal(err)
		}
		bf, err := os.OpenFile(file, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		err = nd.Configure(bf, o)
		bf.Close()
		if err != nil {
			t.Fatal(err)
		}
		for i := range f.devs {
			if f.devs[i] == d {
				f.devs[i] = nd
			}
		}
	}
}

// noDirectIO says why direct I/O cannot be compared here: on a file system
// without O_DIRECT the kernel binds without it, util-linux says nothing,
// and loopctl refuses (ErrNoDirectIO).
func noDirectIO(t *testing.T, dir string) string {
	p := filepath.Join(dir, "odirect")
	if err := os.WriteFile(p, make([]byte, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	defer os.Remove(p)
	fd, err := os.OpenFile(p, os.O_RDONLY|0o40000, 0) // O_DIRECT
	if err != nil {
		return "no O_DIRECT on " + dir + ": util-linux binds without direct I/O, loopctl refuses to"
	}
	fd.Close()
	return ""
}

// onlyInVM keeps -D, which detaches every device on the machine, to the
// test machines of internal/vmrun, which are the test's alone.
func onlyInVM() string {
	if os.Getenv("LOOPCTL_IN_VM") == "1" {
		return ""
	}
	return "-D detaches every loop device on the machine: compared only in internal/vmrun's machines"
}

// TestCompareMissingNode binds a file to /dev/loopN with no such device:
// util-linux creates it with LOOP_CTL_ADD, and so must this losetup. Each
// tool gets a number of its own, never used here, so that neither sees
// the other's device; the outputs are compared with the number replaced.
func TestCompareMissingNode(t *testing.T) {
	f := newFixture(t)
	var out [2]string
	next := 0
	for i, ours := range []bool{false, true} {
		n := unusedNumber(t, next)
		next = n + 1
		t.Cleanup(func() { removeDevice(t, n) })
		dev := loopctl.DevicePath(n)
		r := runTool(t, ours, "C", "--show", dev, f.plain)
		s, err := loopctl.FindByBackingFile(f.plain)
		if err != nil {
			t.Fatal(err)
		}
		bound := false
		for _, st := range s {
			bound = bound || st.Number == n
		}
		out[i] = strings.ReplaceAll(fmt.Sprintf("%v\nbound: %t\n", r, bound), dev, "/dev/loopN")
		removeDevice(t, n)
	}
	if out[0] != out[1] {
		t.Errorf("losetup --show /dev/loopN %s, with no such device:\nutil-linux:\n%s\nloopctl:\n%s", f.plain, out[0], out[1])
	}
	if !strings.Contains(out[0], "bound: true") {
		t.Errorf("util-linux did not create and bind the device:\n%s", out[0])
	}
}

// unusedNumber is the lowest device number from min that has neither a
// node nor a device: a device that never existed, beyond every one there.
func unusedNumber(t *testing.T, min int) int {
	t.Helper()
	entries, err := os.ReadDir("/sys/block")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if n, err := strconv.Atoi(strings.TrimPrefix(e.Name(), "loop")); err == nil && strings.HasPrefix(e.Name(), "loop") {
			min = max(min, n+1)
		}
	}
	for n := min; n < loopctl.MaxNumber; n++ {
		if _, err := os.Stat(loopctl.DevicePath(n)); errors.Is(err, fs.ErrNotExist) {
			return n
		}
	}
	t.Fatal("no unused device number")
	return 0
}

// TestAdditions runs what util-linux lacks, the /dev/loop-control
// operations, on devices of the test's own, and checks the library's
// errors come through.
// TestLoopRef: util-linux 2.40's --loop-ref and REF column, which 2.38
// lacks: the reference goes into the device and comes back in the
// listing, in JSON, and through the library's FindByRef.
func TestLoopRef(t *testing.T) {
	requireRoot(t)
	f := newFixture(t)
	ref := fmt.Sprintf("losetup-test-%d", os.Getpid())
	r := runTool(t, true, "C", "--loop-ref", ref, "-f", "--show", f.plain)
	dev := strings.TrimSpace(r.stdout)
	if r.code != 0 || !strings.HasPrefix(dev, "/dev/loop") {
		t.Fatalf("--loop-ref %s -f --show:\n%s", ref, r)
	}
	var n int
	fmt.Sscanf(dev, "/dev/loop%d", &n)
	t.Cleanup(func() { removeBinding(t, n) })
	found, err := loopctl.FindByRef(ref)
	if err != nil || len(found) != 1 || found[0].Number != n || found[0].BackingFile != f.plain {
		t.Fatalf("FindByRef(%s) = %+v, %v; want %s on %s", ref, found, err, dev, f.plain)
	}
	if r := runTool(t, true, "C", "-l", "-n", "-O", "NAME,REF", dev); r.code != 0 || r.stdout != dev+" "+ref+"\n" {
		t.Fatalf("-l -n -O NAME,REF %s:\n%s", dev, r)
	}
	want := fmt.Sprintf("{\n   \"loopdevices\": [\n      {\n         \"name\": \"%s\",\n         \"ref\": \"%s\"\n      }\n   ]\n}\n", dev, ref)
	if r := runTool(t, true, "C", "-J", "-O", "NAME,REF", dev); r.code != 0 || r.stdout != want {
		t.Fatalf("-J -O NAME,REF %s:\n%s\nwant:\n%s", dev, r, want)
	}
	// A device bound without one shows its path's first 63 bytes, which
	// losetup writes there.
	if r := runTool(t, true, "C", "-l", "-n", "-O", "REF", f.devPlain); r.code != 0 || r.stdout != f.plain[:min(63, len(f.plain))]+"\n" {
		t.Fatalf("-l -n -O REF %s:\n%s", f.devPlain, r)
	}
	// --output-all stays util-linux 2.38's.
	if r := runTool(t, true, "C", "-l", "--output-all", dev); strings.Contains(r.stdout, "REF") {
		t.Fatalf("--output-all shows REF:\n%s", r)
	}
}

// removeBinding detaches device n, bound by a test's run, through the
// library, and waits for the detach.
func removeBinding(t *testing.T, n int) {
	t.Helper()
	if d, err := loopctl.OpenDevice(n); err == nil {
		if err := d.Detach(context.Background()); err != nil {
			t.Error(err)
		}
	}
}

func TestAdditions(t *testing.T) {
	requireRoot(t)
	run := func(args ...string) result { return runTool(t, true, "C", args...) }
	expect := func(r result, code int, stdout, stderr string) {
		t.Helper()
		if r.code != code || r.stdout != stdout || r.stderr != stderr {
			t.Errorf("got:\n%s\nwant exit %d, stdout %q, stderr %q", r, code, stdout, stderr)
		}
	}

	r := run("--add", "any")
	var n int
	if _, err := fmt.Sscanf(r.stdout, "/dev/loop%d\n", &n); err != nil || r.code != 0 {
		t.Fatalf("--add any:\n%s", r)
	}
	t.Cleanup(func() { removeDevice(t, n) })
	dev := loopctl.DevicePath(n)
	d, err := loopctl.OpenDevice(n)
	if err != nil {
		t.Fatalf("--add any printed %s, which does not open: %v", dev, err)
	}
	if _, err := d.Status(); !errors.Is(err, loopctl.ErrNotBound) {
		t.Errorf("%s, just added: Status = %v, want ErrNotBound", dev, err)
	}
	d.Close()

	expect(run("--add", strconv.Itoa(n)), 1, "", "losetup: loopctl: add "+dev+": file exists\n")
	expect(run("--add", "-1"), 1, "", "losetup: invalid device number: '-1'\n")
	expect(run("--add", "seven"), 1, "", "losetup: invalid device number: 'seven'\n")
	expect(run("--remove", "-1"), 1, "", "losetup: loopctl: remove /dev/loop-control: invalid argument: device number -1 is outside [0, 1048575]\n")

	// Bound, it cannot go; detached, it goes, once.
	file := filepath.Join(t.TempDir(), "a.img")
	if err := os.WriteFile(file, make([]byte, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	bf, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer bf.Close()
	if d, err = loopctl.OpenDevice(n); err != nil {
		t.Fatal(err)
	}
	if err := d.Configure(bf, loopctl.Options{Flags: loopctl.FlagReadOnly}); err != nil {
		t.Fatal(err)
	}
	d.Close()
	expect(run("--remove", strconv.Itoa(n)), 1, "",
		"losetup: loopctl: remove "+dev+": the device is bound: detach it, and let its last opener close it, first (device or resource busy)\n")
	if d, err = loopctl.OpenDevice(n); err != nil {
		t.Fatal(err)
	}
	if err := d.ClearFD(); err != nil {
		t.Fatal(err)
	}
	d.Close()
	kerneltest.WaitUnbound(t, n) // at the last close, maybe udev's
	expect(run("--remove", strconv.Itoa(n)), 0, "", "")
	expect(run("--remove", strconv.Itoa(n)), 1, "", "losetup: loopctl: remove "+dev+": no such device\n")

	// --get-free names an unbound device.
	r = run("--get-free")
	var free int
	if _, err := fmt.Sscanf(r.stdout, "/dev/loop%d\n", &free); err != nil || r.code != 0 || r.stderr != "" {
		t.Fatalf("--get-free:\n%s", r)
	}
	if s, err := loopctl.List(); err != nil {
		t.Fatal(err)
	} else {
		for _, st := range s {
			if st.Number == free {
				t.Errorf("--get-free named %s, which is bound to %s", r.stdout, st.BackingFile)
			}
		}
	}
}

// BenchmarkList times --list with 256 devices bound, util-linux's and this
// one's, each as a process, and this one in process (the library's List and
// the table, without a program's start):
//
//	go test -tags integration -run '^$' -bench BenchmarkList ./examples/losetup
func BenchmarkList(b *testing.B) {
	requireRoot(b)
	file := filepath.Join(b.TempDir(), "a.img")
	if err := os.WriteFile(file, make([]byte, 1<<16), 0o644); err != nil {
		b.Fatal(err)
	}
	for range 256 {
		d, err := loopctl.Attach(context.Background(), file, loopctl.Options{Flags: loopctl.FlagReadOnly})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() {
			d.ClearFD()
			d.Close()
		})
	}
	for _, bb := range []struct {
		name string
		cmd  func() *exec.Cmd
	}{
		{"util-linux", func() *exec.Cmd { return exec.Command(utilLinux, "--list") }},
		{"loopctl", func() *exec.Cmd {
			cmd := &exec.Cmd{Path: os.Args[0], Args: []string{"losetup", "--list"}}
			cmd.Env = append(os.Environ(), "LOSETUP_MAIN=1", raceNoExitSleep)
			return cmd
		}},
	} {
		b.Run(bb.name, func(b *testing.B) {
			for b.Loop() {
				out, err := bb.cmd().Output()
				if err != nil || bytes.Count(out, []byte("\n")) < 257 {
					b.Fatalf("%v: %d lines", err, bytes.Count(out, []byte("\n")))
				}
			}
		})
	}
	b.Run("loopctl in process", func(b *testing.B) {
		var out, errOut bytes.Buffer
		for b.Loop() {
			out.Reset()
			if run([]string{"losetup", "--list"}, &out, &errOut) != 0 || bytes.Count(out.Bytes(), []byte("\n")) < 257 {
				b.Fatalf("%s", errOut.String())
			}
		}
	})
}
