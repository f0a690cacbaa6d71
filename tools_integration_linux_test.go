//go:build integration

package loopctl

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/loopctl/loopctl/internal/sysfs"
	"golang.org/x/sys/unix"
)

// losetupChurn attaches and detaches its own files with util-linux
// losetup until deadline, checking each device it is given. With locked, it
// runs `flock /dev/loop-control losetup -f --show FILE`, as losetup's manual
// advises for concurrent use.
func losetupChurn(t *testing.T, dir string, deadline time.Time, locked bool) churnCounts {
	name := "losetup"
	if locked {
		name = "flock-losetup"
	}
	var files []string
	for i := range 2 {
		p := filepath.Join(dir, fmt.Sprintf("%s-%d.img", name, i))
		if err := os.WriteFile(p, make([]byte, 256<<10), 0o644); err != nil {
			t.Error(err)
			return churnCounts{}
		}
		files = append(files, p)
	}
	var tl tally
	for i := 0; time.Now().Before(deadline); i++ {
		path := files[i%len(files)]
		args := []string{"losetup", "-f", "--show", path}
		if locked {
			args = append([]string{"flock", ControlPath}, args...)
		}
		out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
		if err != nil {
			tl.fail(false, "%s: %v: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
			continue
		}
		dev := strings.TrimSpace(string(out))
		tl.count(func(c *churnCounts) { c.Attaches++ })
		var n int
		if _, err := fmt.Sscanf(dev, "/dev/loop%d", &n); err != nil {
			tl.fail(false, "losetup printed %q", dev)
			continue
		}
		var buf [sysfs.BufSize]byte
		if b, err := sysfs.ReadFile(sysfs.LoopAttr(sysfs.Root, n, "backing_file"), buf[:]); err != nil || sysfs.Value(b) != path {
			tl.fail(true, "losetup's %s: backing %q, %v; want %s", dev, b, err, path)
		}
		if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
			tl.fail(false, "losetup -d %s: %v: %s", dev, err, bytes.TrimSpace(out))
		}
	}
	return tl.churnCounts
}

// systemdProcess attaches and detaches its own files the way systemd's
// loop-util does, with raw system calls: flock(LOCK_EX) on /dev/loop-control
// across GET_FREE, open and LOOP_CONFIGURE, LOCK_EX on the device on a
// second descriptor, a check that the device is unbound, LOOP_CONFIGURE with
// autoclear; a lost race (ENXIO, ENOENT, ENODEV at open, EBUSY) is retried
// with a new number. It checks that every device it gets is its own.
func systemdProcess(cfg churnConfig) churnCounts {
	var tl tally
	var wg sync.WaitGroup
	for g := range cfg.Goroutines {
		wg.Go(func() {
			// Each goroutine its own control descriptor, as separate
			// systemd processes have.
			ctl, err := unix.Open(ControlPath, unix.O_RDWR|unix.O_CLOEXEC, 0)
			if err != nil {
				tl.fail(false, "%v", err)
				return
			}
			defer unix.Close(ctl)
			path := filepath.Join(cfg.Dir, fmt.Sprintf("systemd-%d-%d.img", os.Getpid(), g))
			if err := os.WriteFile(path, make([]byte, 256<<10), 0o644); err != nil {
				tl.fail(false, "%v", err)
				return
			}
			var st unix.Stat_t
			unix.Stat(path, &st)
			for time.Now().Before(cfg.Deadline) {
				systemdAttach(&tl, ctl, path, st)
			}
		})
	}
	wg.Wait()
	return tl.churnCounts
}

// systemdAttach is one attach and detach by systemd's protocol.
func systemdAttach(tl *tally, ctl int, path string, st unix.Stat_t) {
	file, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		tl.fail(false, "%v", err)
		return
	}
	defer unix.Close(file)
	for attempt := 0; ; attempt++ {
		if attempt == 64 {
			tl.fail(false, "%s: gave up after 64 lost races", path)
			return
		}
		if err := unix.Flock(ctl, unix.LOCK_EX); err != nil {
			tl.fail(false, "flock control: %v", err)
			return
		}
		dev, lost, err := systemdConfigure(ctl, file)
		unix.Flock(ctl, unix.LOCK_UN)
		if lost {
			tl.count(func(c *churnCounts) { c.LostRaces++ })
			continue
		}
		if err != nil {
			tl.fail(false, "%s: %v", path, err)
			return
		}
		tl.count(func(c *churnCounts) { c.Attaches++ })
		if info, err := unix.IoctlLoopGetStatus64(dev); err != nil || info.Inode != st.Ino || info.Device != uint64(st.Dev) {
			tl.fail(true, "%s: device holds %+v, %v; want inode %d", path, info, err, st.Ino)
		}
		unix.Close(dev) // autoclear: the last close detaches
		return
	}
}

// systemdConfigure is the locked part: GET_FREE, open, lock, check, bind.
func systemdConfigure(ctl, file int) (dev int, lost bool, err error) {
	n, err := unix.IoctlRetInt(ctl, unix.LOOP_CTL_GET_FREE)
	if err != nil {
		return -1, false, err
	}
	dev, err = unix.Open(DevicePath(n), unix.O_RDWR|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return -1, err == unix.ENXIO || err == unix.ENOENT || err == unix.ENODEV, err
	}
	lock, err := unix.Open("/proc/self/fd/"+fmt.Sprint(dev), unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err == nil {
		err = unix.Flock(lock, unix.LOCK_EX)
		defer unix.Close(lock)
	}
	if err != nil {
		unix.Close(dev)
		return -1, err == unix.ENXIO, err
	}
	if _, err := unix.IoctlLoopGetStatus64(dev); err == nil {
		unix.Close(dev)
		return -1, true, unix.EBUSY // bound by someone without the lock
	}
	cfg := unix.LoopConfig{Fd: uint32(file), Size: 512, Info: unix.LoopInfo64{Flags: unix.LO_FLAGS_AUTOCLEAR}}
	if err := unix.IoctlLoopConfigure(dev, &cfg); err != nil {
		unix.Close(dev)
		return -1, err == unix.EBUSY, err
	}
	return dev, false, nil
}
