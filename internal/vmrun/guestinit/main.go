//go:build linux

// Command guestinit is the init of vmrun's virtual machines: it mounts what
// the tests need, loads the kernel modules it is given, puts /tmp on a tmpfs
// or on the ext4 disk, runs the test binaries in turn, reports the first
// failure's exit status (0 when all pass) on the console and powers the
// machine off. vmrun builds it statically and puts it in the initramfs as
// /init, with its configuration in /vmrun.json.
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Config is /vmrun.json, written by vmrun.
type Config struct {
	Modules []string   // kernel modules to load, in order (dependencies first)
	Tmp     string     // what /tmp is: "tmpfs", or "ext4" on /dev/vda
	Tests   [][]string // the test binaries, each with its arguments, run in turn
	Env     []string   // the test binary's environment
}

func main() {
	code, err := run()
	if err != nil {
		fmt.Println("vmrun-guest:", err)
		code = 125
	}
	// vmrun reads this line; everything before it is the tests' output.
	fmt.Printf("vmrun: exit %d\n", code)
	unix.Sync()
	unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
}

func run() (int, error) {
	for _, m := range []struct{ fs, dir string }{{"proc", "/proc"}, {"sysfs", "/sys"}, {"devtmpfs", "/dev"}} {
		if err := os.MkdirAll(m.dir, 0o755); err != nil {
			return 0, err
		}
		if err := unix.Mount(m.fs, m.dir, m.fs, 0, ""); err != nil {
			return 0, fmt.Errorf("mount %s: %w", m.dir, err)
		}
	}
	b, err := os.ReadFile("/vmrun.json")
	if err != nil {
		return 0, err
	}
	var cfg Config
	if err := json.Unmarshal(b, &cfg); err != nil {
		return 0, err
	}
	for _, m := range cfg.Modules {
		if err := loadModule(m); err != nil {
			return 0, err
		}
	}
	if err := mountTmp(cfg.Tmp); err != nil {
		return 0, err
	}
	var u unix.Utsname
	unix.Uname(&u)
	fmt.Printf("vmrun-guest: Linux %s, /tmp on %s\n", unix.ByteSliceToString(u.Release[:]), cfg.Tmp)

	// Every binary runs, so that one failure does not hide another's; the
	// status is the first failure's.
	status := 0
	for _, test := range cfg.Tests {
		fmt.Printf("vmrun-guest: %s\n", test[0])
		start := time.Now()
		code, n, err := runTest(os.Stdout, test, cfg.Env)
		if err != nil {
			return 0, err
		}
		if status == 0 {
			status = code
		}
		fmt.Printf("vmrun-guest: %s: exit %d after %s: %d passed, %d skipped, %d failed (tests and subtests)\n",
			test[0], code, time.Since(start).Round(time.Second), n.passed, n.skipped, n.failed)
	}
	return status, nil
}

// counts are how many tests and subtests passed, skipped and failed.
type counts struct{ passed, skipped, failed int }

// runTest runs a test binary with -test.v, so that every result is known,
// and copies its output to the console as go test prints it without
// -test.v: a passing or skipped test's log and the === lines are left out,
// a failing test's log follows its --- FAIL line. With -test.v among its
// arguments the output is copied whole.
func runTest(console io.Writer, test, env []string) (int, counts, error) {
	verbose := slices.Contains(test[1:], "-test.v")
	cmd := exec.Command(test[0], append(slices.Clone(test[1:]), "-test.v")...)
	cmd.Dir, cmd.Env = "/tmp", env
	out, err := cmd.StdoutPipe()
	if err != nil {
		return 0, counts{}, err
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return 0, counts{}, err
	}
	var n counts
	logs := map[string][]string{} // the lines each running test logged
	current := ""                 // the test the indented lines are of
	sc := bufio.NewScanner(out)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if verbose {
			fmt.Fprintln(console, line)
		}
		if m := resultLine.FindStringSubmatch(line); m != nil {
			switch m[1] {
			case "PASS":
				n.passed++
			case "SKIP":
				n.skipped++
			case "FAIL":
				n.failed++
				if !verbose {
					fmt.Fprintln(console, strings.TrimLeft(line, " "))
					for _, l := range logs[m[2]] {
						fmt.Fprintln(console, l)
					}
				}
			}
			delete(logs, m[2])
			continue
		}
		if verbose {
			continue
		}
		switch {
		case strings.HasPrefix(line, "=== "):
			if f := strings.Fields(line); len(f) == 3 && f[1] != "PAUSE" {
				current = f[2]
			}
		case strings.HasPrefix(line, "    ") && current != "":
			logs[current] = append(logs[current], line)
		default:
			fmt.Fprintln(console, line)
		}
	}
	if err := sc.Err(); err != nil {
		// A line too long to scan: say so, and drain the rest, so that
		// the test does not block on a full pipe.
		fmt.Fprintf(console, "(%s: its output from here on is not shown: %v)\n", test[0], err)
		io.Copy(io.Discard, out)
	}
	// A test that never ended (the binary's timeout panicked, or it
	// crashed) shows what it logged.
	for _, name := range slices.Sorted(maps.Keys(logs)) {
		if len(logs[name]) > 0 {
			fmt.Fprintf(console, "(%s did not end; it logged:)\n%s\n", name, strings.Join(logs[name], "\n"))
		}
	}
	err = cmd.Wait()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode(), n, nil
	}
	return 0, n, err
}

// resultLine is a test's or subtest's result line in -test.v output.
var resultLine = regexp.MustCompile(`^\s*--- (PASS|FAIL|SKIP): (\S+) `)

// loadModule loads the module at path; one built in or loaded already is
// no error.
func loadModule(path string) error {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := unix.FinitModule(fd, "", 0); err != nil && err != unix.EEXIST {
		return fmt.Errorf("load %s: %w", path, err)
	}
	return nil
}

// mountTmp puts /tmp on a tmpfs, or on the ext4 file system of /dev/vda,
// which appears once virtio_blk has probed the disk.
func mountTmp(kind string) error {
	if err := os.MkdirAll("/tmp", 0o1777); err != nil {
		return err
	}
	switch kind {
	case "tmpfs":
		return unix.Mount("tmpfs", "/tmp", "tmpfs", 0, "mode=1777")
	case "ext4":
		for end := time.Now().Add(30 * time.Second); ; time.Sleep(10 * time.Millisecond) {
			if _, err := os.Stat("/dev/vda"); err == nil {
				break
			} else if time.Now().After(end) {
				return fmt.Errorf("/dev/vda: %w", err)
			}
		}
		if err := unix.Mount("/dev/vda", "/tmp", "ext4", 0, ""); err != nil {
			return fmt.Errorf("mount /dev/vda on /tmp: %w", err)
		}
		return os.Chmod("/tmp", 0o1777)
	}
	return fmt.Errorf("unknown /tmp kind %q", kind)
}
