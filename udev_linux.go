package loopctl

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/user"
	"strconv"
	"time"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/call"
	"github.com/loopctl/loopctl/internal/sysfs"
)

// udevRoot is where udev keeps its state: its control socket while it
// runs, and its database of the devices it processed (data/bMAJ:MIN).
const udevRoot = "/run/udev"

// Distributions give /dev/loop-control and /dev/loopN to the disk group,
// mode 0660, by udev's rules. A device that LOOP_CTL_GET_FREE or
// LOOP_CTL_ADD has just made is root's, mode 0600, until udev has
// processed its add event, a few milliseconds later: a member of the disk
// group that opens it meanwhile is refused (EACCES).

// openGranted opens device n as openDeviceMode does, and, where the open
// is refused (EACCES) while udev runs and has not processed the device
// yet, waits for udev to do so, while ctx allows, and opens it again:
// udev writes its database entry of a device after it has applied its
// rules to the node. A refusal that waiting cannot change (no udev, or
// udev done with the device) is explained.
func (s *system) openGranted(ctx context.Context, n, mode int) (*Device, error) {
	d, err := s.openDeviceMode(n, mode)
	if err == nil || !errors.Is(err, unix.EACCES) {
		return d, err
	}
	entry, ok := s.udevEntry(n)
	if !ok {
		return nil, s.explainRefusedNode(n, err, false)
	}
	w, werr := watchDir(s.udev + "/data")
	if werr != nil {
		return nil, err // udev is not running after all (no data directory)
	}
	defer w.Close()
	// A udev that has stopped leaves its socket behind: waited for as long
	// as a busy udev may take, not for ever.
	ctx, cancel := context.WithTimeout(ctx, udevPatience)
	defer cancel()
	for {
		// Looked at once the watch is set, so that no entry written since
		// the refused open is missed.
		if processed(entry, DevicePath(n)) {
			d, err := s.openDeviceMode(n, mode)
			if errors.Is(err, unix.EACCES) {
				return nil, s.explainRefusedNode(n, err, true)
			}
			return d, err
		}
		if werr := w.wait(ctx); werr != nil {
			return nil, newError("open", DevicePath(n), fmt.Errorf("waiting for udev to give %s to a group of this process (%w): %w",
				DevicePath(n), unix.EACCES, werr))
		}
	}
}

// udevPatience bounds the wait for udev to process a device it has been
// told of: a few milliseconds on an idle machine, seconds behind a burst
// of thousands of events.
const udevPatience = 10 * time.Second

// udevEntry returns the path of udev's database entry of device n, and
// whether udev runs (its control socket exists).
func (s *system) udevEntry(n int) (string, bool) {
	if _, err := os.Stat(s.udev + "/control"); err != nil {
		return "", false
	}
	var buf [sysfs.BufSize]byte
	b, err := sysfs.ReadFile(sysfs.LoopDir(s.sysfs, n)+"/dev", buf[:])
	if err != nil {
		return "", false
	}
	return s.udev + "/data/b" + sysfs.Value(b), true
}

// processed tells whether udev's database entry, at entry, is of the node
// at node as it is: udev writes an entry once it has applied its rules to
// the node, which changes the node's ctime, so an entry written before
// the node last changed (made anew, or not yet processed) is an earlier
// device's of that number, or the node is still to be processed. A node
// that cannot be looked at counts as processed: the open tells.
func processed(entry, node string) bool {
	var e, nd unix.Stat_t
	if call.Retry(func() error { return unix.Stat(entry, &e) }) != nil {
		return false
	}
	if call.Retry(func() error { return unix.Stat(node, &nd) }) != nil {
		return true
	}
	return e.Mtim.Sec > nd.Ctim.Sec || e.Mtim.Sec == nd.Ctim.Sec && e.Mtim.Nsec >= nd.Ctim.Nsec
}

// explainRefusedNode explains err, the EACCES of an open of device n's
// node: udev, which gives loop devices to the disk group, is not running,
// or has processed the device and left it as it is.
func (s *system) explainRefusedNode(n int, err error, processed bool) error {
	why := "udev, which gives loop devices to the disk group (mode 0660) by its rules, is not running"
	if processed {
		why = "udev has processed the device and left it so: no rule of udev's gives it to a group of this process"
	}
	return explainRefused(DevicePath(n), err, why)
}

// explainRefused explains err, the EACCES of an open of the node at path,
// by the node's owner and mode: root's alone (mode 0600, as the kernel
// makes loop nodes), because of rootOnly; a group's that this process is
// not in (mode 0660, as udev's rules make them: group disk). Otherwise,
// and for root, the errno says enough.
func explainRefused(path string, err error, rootOnly string) error {
	var st unix.Stat_t
	if os.Geteuid() == 0 || call.Retry(func() error { return unix.Stat(path, &st) }) != nil || st.Uid != 0 {
		return err
	}
	var text string
	switch mode := st.Mode & 0o7777; {
	case mode&0o077 == 0:
		text = fmt.Sprintf("%s is root's, mode %04o, and this process is not root: %s", path, mode, rootOnly)
	case mode&0o060 == 0o060 && mode&0o006 == 0:
		group := strconv.FormatUint(uint64(st.Gid), 10)
		if g, err := user.LookupGroupId(group); err == nil {
			group = g.Name
		}
		text = fmt.Sprintf("%s is root's and group %s's, mode %04o, and this process is neither root nor in group %s", path, group, mode, group)
	default:
		return err
	}
	var e *Error
	if errors.As(err, &e) {
		e.Err = explain(text, unix.EACCES, nil)
		return e
	}
	return newError("open", path, explain(text, unix.EACCES, nil))
}

// A dirWatch tells of files made in a directory (inotify IN_CREATE and
// IN_MOVED_TO: udev writes its entries elsewhere and renames them in).
type dirWatch struct{ f *os.File }

func watchDir(dir string) (*dirWatch, error) {
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		return nil, os.NewSyscallError("inotify_init1", err)
	}
	if _, err := unix.InotifyAddWatch(fd, dir, unix.IN_CREATE|unix.IN_MOVED_TO); err != nil {
		unix.Close(fd)
		return nil, &os.PathError{Op: "inotify_add_watch", Path: dir, Err: err}
	}
	// Nonblocking: the runtime's poller waits for it, and ctx's end
	// wakes it through a deadline.
	return &dirWatch{f: os.NewFile(uintptr(fd), "inotify:"+dir)}, nil
}

// wait returns when a file is made in the directory, or with ctx's error
// when ctx ends first.
func (w *dirWatch) wait(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	stop := context.AfterFunc(ctx, func() { w.f.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	var buf [4096]byte
	if _, err := w.f.Read(buf[:]); err != nil {
		if cerr := ctx.Err(); cerr != nil {
			return cerr
		}
		return err
	}
	return nil
}

func (w *dirWatch) Close() error { return w.f.Close() }
