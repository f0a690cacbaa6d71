//go:build linux

// Command guestinit is the init of vmrun's virtual machines: it mounts what
// the tests need, loads the kernel modules it is given, puts /tmp on a tmpfs
// or on the ext4 disk, runs the test binaries in turn, reports the first
// failure's exit status (0 when all pass) on the console and powers the
// machine off. vmrun builds it statically and puts it in the initramfs as
// /init, with its configuration in /vmrun.json.
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
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
		cmd := exec.Command(test[0], test[1:]...)
		cmd.Dir, cmd.Env = "/tmp", cfg.Env
		cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
		start := time.Now()
		err := cmd.Run()
		var ee *exec.ExitError
		switch {
		case errors.As(err, &ee):
			if status == 0 {
				status = ee.ExitCode()
			}
		case err != nil:
			return 0, err
		}
		fmt.Printf("vmrun-guest: %s: exit %d after %s\n", test[0], cmd.ProcessState.ExitCode(), time.Since(start).Round(time.Second))
	}
	return status, nil
}

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
