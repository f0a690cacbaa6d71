package uevent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl"
	"github.com/loopctl/loopctl/internal/sysfs"
)

// udev, which every distribution runs, processes each device's uevent
// after the kernel sends it: it probes the device (blkid), runs its rules,
// creates /dev/disk/by-label/..., by-uuid/... and by-diskseq/... links
// and partition nodes' permissions, writes its database entry
// (/run/udev/data/bMAJ:MIN), and then sends the event on, with all it
// learnt, to netlink group 2, where programs listen. A program that binds
// an image and at once looks for /dev/disk/by-label/NAME looks too soon.

// udevRoot is where udev keeps its state.
const udevRoot = "/run/udev"

// udev is where WaitUdev looks: the sysfs tree, and udev's state.
type udev struct{ sysfs, udev string }

func (u udev) wait(ctx context.Context, d *loopctl.Device) error {
	const op = "wait udev"
	if d == nil {
		return newError(op, "", fmt.Errorf("%w: a nil Device", os.ErrInvalid))
	}
	seq, err := d.DiskSeq()
	if err != nil {
		return err
	}
	if _, err := os.Stat(u.udev + "/control"); err != nil {
		return nil
	}
	f, err := openNetlinkGroup(udevGroup, 0)
	if err != nil {
		return newError(op, d.Path(), err)
	}
	defer f.Close()
	// What udev has done already, now that no message after it is missed.
	// An entry without the binding's link may be an older binding's, or
	// this one's made by rules that give it none (a partition outside any
	// partition table has no by-diskseq link): udev is asked to process
	// the device again, as `udevadm trigger` does, and its message tells.
	waiting := u.targets(d.Number())
	for dev, t := range waiting {
		switch {
		case u.done(dev, t, seq):
			delete(waiting, dev)
		case seq != 0 && u.hasEntry(dev):
			u.trigger(t.devpath)
		}
	}
	buf, oob := make([]byte, 1<<16), make([]byte, unix.CmsgSpace(unix.SizeofUcred))
	for len(waiting) > 0 {
		n, oobn, _, err := recvNetlink(ctx, f, buf, oob)
		switch {
		case err == unix.ENOBUFS || err == unix.EMSGSIZE:
			// Messages dropped or cut short: the database tells.
			for dev, t := range waiting {
				if u.done(dev, t, seq) {
					delete(waiting, dev)
				}
			}
			continue
		case err == ctx.Err() && err != nil:
			var left []string
			for dev, t := range waiting {
				left = append(left, t.devpath+" ("+dev+")")
			}
			return newError(op, d.Path(), fmt.Errorf("udev has not processed %s for disk sequence number %d: %w",
				strings.Join(left, ", "), seq, err))
		case err != nil:
			return newError(op, d.Path(), recvError(err))
		}
		if !fromRoot(oob[:oobn]) {
			continue
		}
		devpath, msgSeq, ok := parseUdevMessage(buf[:n])
		if !ok {
			continue
		}
		// The event of the binding; before 5.15, the device's latest.
		for dev, t := range waiting {
			if devpath == t.devpath && msgSeq == seq {
				delete(waiting, dev)
			}
		}
	}
	return nil
}

// A udevTarget is a device WaitUdev waits for: device n, or its
// partition part, at devpath in the kernel's device tree.
type udevTarget struct {
	devpath string
	part    int
}

// targets returns device n and its partitions, by device number
// (MAJ:MIN).
func (u udev) targets(n int) map[string]udevTarget {
	dir := sysfs.LoopDir(u.sysfs, n)
	devpath := loopDevpath + strconv.Itoa(n)
	out := map[string]udevTarget{}
	var buf [sysfs.BufSize]byte
	if b, err := sysfs.ReadFile(dir+"/dev", buf[:]); err == nil {
		out[sysfs.Value(b)] = udevTarget{devpath: devpath}
	}
	parts, _ := sysfs.Partitions(dir, n)
	for _, part := range parts {
		name := sysfs.PartitionName(n, part)
		if b, err := sysfs.ReadFile(dir+"/"+name+"/dev", buf[:]); err == nil {
			out[sysfs.Value(b)] = udevTarget{devpath: devpath + "/" + name, part: part}
		}
	}
	return out
}

// hasEntry tells whether udev's database has an entry of device dev.
func (u udev) hasEntry(dev string) bool {
	_, err := os.Stat(u.udev + "/data/b" + dev)
	return err == nil
}

// trigger has udev process the device at devpath again: a "change"
// written to its uevent file makes the kernel send a synthetic event.
// Where that fails (not root), messages alone tell.
func (u udev) trigger(devpath string) {
	os.WriteFile(u.sysfs+devpath+"/uevent", []byte("change"), 0)
}

// done tells whether udev's database entry of device dev (MAJ:MIN)
// shows the binding seq processed: its disk/by-diskseq link, SEQ for the
// disk and SEQ-partM for a partition. For seq 0 (before Linux 5.15), an
// entry and no event queued.
func (u udev) done(dev string, t udevTarget, seq uint64) bool {
	b, err := os.ReadFile(u.udev + "/data/b" + dev)
	if err != nil {
		return false
	}
	if seq == 0 {
		_, err := os.Stat(u.udev + "/queue")
		return errors.Is(err, os.ErrNotExist)
	}
	link := "S:disk/by-diskseq/" + strconv.FormatUint(seq, 10)
	if t.part != 0 {
		link += "-part" + strconv.Itoa(t.part)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if line == link {
			return true
		}
	}
	return false
}

// waitUdev is WaitUdev.
func waitUdev(ctx context.Context, d *loopctl.Device) error {
	return udev{sysfs: sysfs.Root, udev: udevRoot}.wait(ctx, d)
}
