package kerneltest

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// controlPath is the loop driver's control device.
const controlPath = "/dev/loop-control"

// Require skips a test that needs root and the loop driver, with a hint,
// or fails it under LOOPCTL_REQUIRE_INTEGRATION=1.
func Require(t testing.TB) {
	t.Helper()
	var reason string
	switch _, err := os.Stat(controlPath); {
	case os.Geteuid() != 0:
		reason = "needs root: run the integration tests as root (sudo go test -tags integration ./...)"
	case err != nil:
		reason = controlPath + " is missing: load the loop driver (modprobe loop)"
	default:
		return
	}
	if os.Getenv("LOOPCTL_REQUIRE_INTEGRATION") == "1" {
		t.Fatal(reason + "; LOOPCTL_REQUIRE_INTEGRATION=1 forbids skipping")
	}
	t.Skip(reason)
}

// LongName makes backing paths longer than lo_file_name's 64 bytes, so
// that tests see where the full name comes from.
const LongName = "a-backing-file-whose-path-is-longer-than-the-kernels-64-byte-lo_file_name.img"

// TempFile creates a backing file of size bytes for the test, named
// LongName in a directory of its own.
func TempFile(t testing.TB, size int64) *os.File {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), LongName))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	return f
}

// Release is the running kernel's release, such as "6.18.0-1-amd64".
func Release() string {
	var u unix.Utsname
	if unix.Uname(&u) != nil {
		return "?"
	}
	return unix.ByteSliceToString(u.Release[:])
}

// Version returns the running kernel's major and minor version.
func Version(t testing.TB) (major, minor int) {
	t.Helper()
	rel := Release()
	f := strings.FieldsFunc(rel, func(r rune) bool { return r < '0' || r > '9' })
	if len(f) < 2 {
		t.Fatalf("kernel release %q", rel)
	}
	major, _ = strconv.Atoi(f[0])
	minor, _ = strconv.Atoi(f[1])
	return major, minor
}

// AtLeast reports whether the running kernel is major.minor or newer.
func AtLeast(t testing.TB, major, minor int) bool {
	t.Helper()
	ma, mi := Version(t)
	return ma > major || ma == major && mi >= minor
}

// DiskSeq reads /sys/block/loopN/diskseq: 0 where the kernel has none.
func DiskSeq(t testing.TB, n int) uint64 {
	t.Helper()
	b, err := os.ReadFile("/sys/block/loop" + strconv.Itoa(n) + "/diskseq")
	if errors.Is(err, os.ErrNotExist) {
		return 0
	}
	if err != nil {
		t.Fatal(err)
	}
	seq, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return seq
}

// ChurnDuration is how long churn and interference tests run:
// LOOPCTL_CHURN_DURATION, or 30 s; 3 s with -short, or where udev runs,
// which works through each binding's events at a few hundred a second
// (on two cores): 30 s of churn would leave it, and the machine, minutes
// behind (see SettleUdev).
func ChurnDuration(t testing.TB) time.Duration {
	t.Helper()
	if s := os.Getenv("LOOPCTL_CHURN_DURATION"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil {
			t.Fatalf("LOOPCTL_CHURN_DURATION: %v", err)
		}
		return d
	}
	if testing.Short() || UdevRunning() {
		return 3 * time.Second
	}
	return 30 * time.Second
}

// UdevRunning tells whether udev runs (its control socket exists).
func UdevRunning() bool {
	_, err := os.Stat("/run/udev/control")
	return err == nil
}

// SettleUdev waits, where udev runs, until it has processed every event
// queued (udevadm settle), and fails the test if it has not within a
// minute: a test that made many bindings calls it before it returns, so
// that the tests after it, and the machine, do not wait behind its
// events; a test that depends on udev, before it starts.
func SettleUdev(t testing.TB) {
	t.Helper()
	took, err := Settle()
	if err != nil {
		t.Fatal(err)
	}
	if took > time.Second {
		t.Logf("udev took %v to process the events queued", took.Round(time.Millisecond))
	}
}

// Settle waits, where udev runs, until it has processed every event
// queued (udevadm settle), up to a minute, and returns how long that took.
func Settle() (time.Duration, error) {
	if !UdevRunning() {
		return 0, nil
	}
	start := time.Now()
	if out, err := exec.Command("udevadm", "settle", "--timeout=60").CombinedOutput(); err != nil {
		return time.Since(start), fmt.Errorf("udev still busy after a minute: udevadm settle: %v: %s", err, out)
	}
	return time.Since(start), nil
}

// Udevd makes sure systemd-udevd runs for the test: the one already
// running, or one the test starts and stops by its pid; it skips the test
// where Debian's udev is not installed.
func Udevd(t testing.TB) {
	t.Helper()
	Require(t)
	if _, err := os.Stat("/run/udev/control"); err == nil {
		return
	}
	const bin = "/lib/systemd/systemd-udevd"
	if _, err := os.Stat(bin); err != nil {
		t.Skip("udev is not installed (apt-get install udev); CI runs the tests with it once")
	}
	cmd := exec.Command(bin)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		os.RemoveAll("/run/udev")
	})
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if _, err := os.Stat("/run/udev/control"); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("systemd-udevd did not start")
		}
	}
	ColdplugLoop(t)
}

// ColdplugLoop has udev process the loop devices there are, as a
// distribution's boot does (udevadm trigger), and waits for it: a udev
// started by hand knows only the devices that change after it started,
// and leaves the others root's.
func ColdplugLoop(t testing.TB) {
	t.Helper()
	for _, args := range [][]string{
		{"trigger", "--action=add", "--subsystem-match=block", "--sysname-match=loop*"},
		{"trigger", "--action=add", "--subsystem-match=misc", "--sysname-match=loop-control"},
	} {
		if out, err := exec.Command("udevadm", args...).CombinedOutput(); err != nil {
			t.Fatalf("udevadm %v: %v: %s", args, err, out)
		}
	}
	SettleUdev(t)
}

// LockNode takes flock how (unix.LOCK_SH, unix.LOCK_EX) of the node at
// path, on a read-only descriptor of its own, and returns what releases
// it (once, however often it is called).
func LockNode(t testing.TB, path string, how int) func() {
	t.Helper()
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Flock(fd, how); err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	var once sync.Once
	return func() { once.Do(func() { unix.Close(fd) }) }
}

// AddPartition adds partition num of the disk at path by hand, as
// partitioning tools do (BLKPG, through util-linux's addpart), start and
// size in sectors: the kernel may have no partition table parsers built
// in. udev re-reads a disk's partition table (BLKRRPART) when a writer
// closes it, and that drops partitions added by hand, unless someone
// holds a lock of the disk: AddPartition holds a shared one, through the
// node at lockPath, until release or the test's end. (udev locks the
// machine's node; a container's node of the same disk is another inode,
// whose lock holds udev off nothing.)
func AddPartition(t testing.TB, path, lockPath string, num, start, size int) (release func()) {
	t.Helper()
	release = LockNode(t, lockPath, unix.LOCK_SH)
	t.Cleanup(release)
	args := []string{path, strconv.Itoa(num), strconv.Itoa(start), strconv.Itoa(size)}
	if out, err := exec.Command("addpart", args...).CombinedOutput(); err != nil {
		release()
		t.Fatalf("addpart %v: %v: %s", args, err, out)
	}
	return release
}

// MkfsExt4 makes an ext4 file system at path with mkfs.ext4's args, and
// skips the test where mkfs.ext4 is missing.
func MkfsExt4(t testing.TB, path string, args ...string) {
	t.Helper()
	if _, err := exec.LookPath("mkfs.ext4"); err != nil {
		t.Skip("no mkfs.ext4")
	}
	if out, err := exec.Command("mkfs.ext4", append(append([]string{"-q", "-F"}, args...), path)...).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v\n%s", err, out)
	}
}

// OpenFDs returns the process's open descriptors and what each is open
// on, from /proc/self/fd, leaving out anonymous inodes (the runtime's
// epoll and its event descriptor).
func OpenFDs(t testing.TB) map[int]string {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	fds := map[int]string{}
	for _, e := range ents {
		n, _ := strconv.Atoi(e.Name())
		target, err := os.Readlink("/proc/self/fd/" + e.Name())
		// A descriptor closed since the directory was read (the
		// directory's own, one a cleanup closes) is not open.
		if err == nil && !strings.HasPrefix(target, "anon_inode:") {
			fds[n] = target
		}
	}
	return fds
}

// NewFDs returns the descriptors open now that were not open before (an
// OpenFDs), or are open on another file now: what a call left open. One
// closed meanwhile is passed over: the runtime closes a file an earlier
// test dropped when it collects it, at a moment of its own.
func NewFDs(t testing.TB, before map[int]string) []int {
	t.Helper()
	var fds []int
	for fd, target := range OpenFDs(t) {
		if was, ok := before[fd]; !ok || was != target {
			fds = append(fds, fd)
		}
	}
	slices.Sort(fds)
	return fds
}

// Nobody is the user a test runs a child as to see what a user who is
// not root may do: uid and gid 65534, no capabilities.
const Nobody = 65534

// DiskGroup returns the id of the group "disk", which distributions give
// /dev/loop-control and the loop devices to (udev's rules), and skips the
// test where there is none.
func DiskGroup(t testing.TB) uint32 {
	t.Helper()
	g, err := user.LookupGroup("disk")
	if err != nil {
		t.Skipf("no disk group: %v", err)
	}
	gid, err := strconv.ParseUint(g.Gid, 10, 32)
	if err != nil {
		t.Fatal(err)
	}
	return uint32(gid)
}

// An Unprivileged is a directory that user Nobody can reach, holding a
// copy of the test binary it can run (go test builds it where only root
// may), for files the child works on.
type Unprivileged struct{ Dir, Binary string }

// NewUnprivileged makes the directory and copies the test binary into it.
func NewUnprivileged(t testing.TB) *Unprivileged {
	t.Helper()
	dir := t.TempDir()
	// t.TempDir's parent is the test's own, made for root alone.
	for _, d := range []string{filepath.Dir(dir), dir} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, filepath.Base(self))
	if err := os.WriteFile(bin, b, 0o755); err != nil {
		t.Fatal(err)
	}
	return &Unprivileged{Dir: dir, Binary: bin}
}

// File makes a file of size bytes in the directory that Nobody may read
// and write.
func (u *Unprivileged) File(t testing.TB, name string, size int64) string {
	t.Helper()
	p := filepath.Join(u.Dir, name)
	if err := os.WriteFile(p, nil, 0o666); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, 0o666); err != nil { // past the umask
		t.Fatal(err)
	}
	if err := os.Truncate(p, size); err != nil {
		t.Fatal(err)
	}
	return p
}

// Run runs test in the copied binary as Nobody, in group groups, with env
// added, and returns what it wrote; err is its exit's.
func (u *Unprivileged) Run(t testing.TB, test string, groups []uint32, env ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(u.Binary, "-test.run=^"+test+"$", "-test.count=1", "-test.v")
	cmd.Dir = u.Dir
	cmd.Env = append(os.Environ(), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: Nobody, Gid: Nobody, Groups: groups}}
	out, err := cmd.CombinedOutput()
	return string(out), err
}
