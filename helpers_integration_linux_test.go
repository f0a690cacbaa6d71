//go:build integration

package loopctl

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/loopctl/loopctl/internal/kerneltest"
	"github.com/loopctl/loopctl/internal/sysfs"
	"golang.org/x/sys/unix"
)

func openControl(t *testing.T) *Control {
	t.Helper()
	return openControlOn(t, host)
}

// openControlOn is openControl on system s: the devices newDevice opens
// through the Control are s's too.
func openControlOn(t *testing.T, s *system) *Control {
	t.Helper()
	kerneltest.Require(t)
	c, err := s.Open()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// newDevice adds a loop device of the test's own and opens it. Cleanup
// clears a binding left on it, closes it and removes it.
func newDevice(t *testing.T, c *Control) *Device {
	t.Helper()
	n, err := c.Add(AnyNumber)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Detached by the test, or by the cleanup below: gone once its
		// last opener, udev's probe maybe, closes it.
		kerneltest.WaitUnbound(t, n)
		if err := c.Remove(n); err != nil {
			t.Errorf("removing the test's device: %v", err)
		}
	})
	d, err := c.sys.OpenDevice(n)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { detach(t, d) })
	return d
}

// detach clears d's binding if it still has one, and closes it.
func detach(t *testing.T, d *Device) {
	if err := d.ClearFD(); err != nil && !errors.Is(err, ErrNotBound) && !errors.Is(err, fs.ErrClosed) {
		t.Errorf("detaching %s: %v", d.Path(), err)
	}
	d.Close()
}

// clearAlone clears d as its only opener: the device is then torn down
// at once (since Linux 6.11: put in rundown until d's Close). Another
// process may have it open for a moment, udev probing it after its bind,
// and a ClearFD then only sets autoclear. So clearAlone takes the
// device's lock, which keeps udev from starting a probe and waits for one
// under way to end, and clears again until the device is no longer bound
// for d.
func clearAlone(t *testing.T, d *Device) {
	t.Helper()
	if err := d.h.flock(unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(time.Millisecond) {
		if err := d.ClearFD(); err != nil {
			t.Fatal(err)
		}
		_, err := d.Status()
		if errors.Is(err, ErrNotBound) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s still bound a minute after ClearFD (%v); held open by %s", d.Path(), err,
				strings.Join(kerneltest.Openers(d.Number()), ", "))
		}
	}
}

func fileID(t *testing.T, path string) (dev, ino uint64) {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return uint64(st.Dev), uint64(st.Ino)
}

func wantErrno(t *testing.T, err error, errno unix.Errno, sentinel error) {
	t.Helper()
	var e *Error
	if !errors.As(err, &e) || e.Op == "" || e.Path == "" {
		t.Fatalf("got %v, want an *Error naming op and path", err)
	}
	if !errors.Is(err, errno) || !errors.Is(err, sentinel) {
		t.Fatalf("got %v, want %s matching %v", err, unix.ErrnoName(errno), sentinel)
	}
}

// losetupDevice is one device of `losetup --json --list`.
type losetupDevice struct {
	Name      string `json:"name"`
	SizeLimit uint64 `json:"sizelimit"`
	Offset    uint64 `json:"offset"`
	AutoClear bool   `json:"autoclear"`
	RO        bool   `json:"ro"`
	BackFile  string `json:"back-file"`
	DIO       bool   `json:"dio"`
	LogSec    uint32 `json:"log-sec"`
}

func losetup(t *testing.T, dev string) losetupDevice {
	t.Helper()
	out, err := exec.Command("losetup", "--json", "--list", dev).Output()
	if err != nil {
		t.Fatalf("losetup --json --list %s: %v", dev, err)
	}
	var list struct {
		Devices []losetupDevice `json:"loopdevices"`
	}
	if err := json.Unmarshal(out, &list); err != nil || len(list.Devices) != 1 {
		t.Fatalf("losetup output %q: %v", out, err)
	}
	return list.Devices[0]
}

func readAttr(t *testing.T, n int, name string) string {
	t.Helper()
	var buf [sysfs.BufSize]byte
	b, err := sysfs.ReadFile(sysfs.LoopDir(sysfs.Root, n)+"/"+name, buf[:])
	if err != nil {
		t.Fatal(err)
	}
	return sysfs.Value(b)
}

// checkConfigure binds a new device with o and checks what the kernel,
// sysfs and losetup report.
func checkConfigure(t *testing.T, c *Control, o Options) {
	t.Helper()
	d := newDevice(t, c)
	f := kerneltest.TempFile(t, 2<<20)
	err := d.Configure(f, o)
	if o.Flags&FlagDirectIO != 0 && !directIOOK(t, filepath.Dir(f.Name())) {
		wantNoDirectIO(t, err, f.Name())
		return
	}
	if err != nil {
		t.Fatal(err)
	}
	checkBound(t, d, f.Name(), o)
}

// deviceSize is the size of a device bound to the file at path with o: the
// file's size less the offset, at most the size limit, in whole sectors.
func deviceSize(t *testing.T, path string, o Options) uint64 {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	size := uint64(max(fi.Size()-int64(o.Offset), 0))
	if o.SizeLimit != 0 {
		size = min(size, o.SizeLimit)
	}
	return size &^ 511
}

// checkBound checks that d is bound to the file at path with o, as Status,
// List, FindByBackingFile, sysfs, losetup --json --list and losetup -j see
// it.
func checkBound(t *testing.T, d *Device, path string, o Options) {
	t.Helper()
	s, err := d.Status()
	if err != nil {
		t.Fatal(err)
	}
	dev, ino := fileID(t, path)
	want := Status{Number: d.Number(), BackingFile: path, BackingDevice: dev, BackingInode: ino,
		Offset: o.Offset, SizeLimit: o.SizeLimit, Flags: o.Flags, BlockSize: max(o.BlockSize, 512),
		Size: deviceSize(t, path, o), DiskSeq: kerneltest.DiskSeq(t, d.Number()), Ref: refOfBinding(path, o)}
	if s != want {
		t.Fatalf("Status = %+v, want %+v", s, want)
	}
	if seq, err := d.DiskSeq(); err != nil || seq != want.DiskSeq {
		t.Fatalf("DiskSeq = %d, %v; want sysfs's %d", seq, err, want.DiskSeq)
	}
	if got := readAttr(t, d.Number(), "size"); got != strconv.FormatUint(want.Size/512, 10) {
		t.Fatalf("sysfs size %s sectors, want %d bytes", got, want.Size)
	}
	list, err := List()
	if err != nil {
		t.Fatal(err)
	}
	if i := slices.IndexFunc(list, func(s Status) bool { return s.Number == d.Number() }); i < 0 || list[i] != want {
		t.Fatalf("List has %+v, want %+v", list, want)
	}
	found, err := FindByBackingFile(path)
	if err != nil || len(found) != 1 || found[0] != want {
		t.Fatalf("FindByBackingFile = %+v, %v; want [%+v]", found, err, want)
	}
	blockSize := o.BlockSize
	if blockSize == 0 {
		blockSize = 512
	}
	l := losetup(t, d.Path())
	wantL := losetupDevice{Name: d.Path(), SizeLimit: o.SizeLimit, Offset: o.Offset, AutoClear: o.Flags&FlagAutoClear != 0,
		RO: o.Flags&FlagReadOnly != 0, BackFile: path, DIO: o.Flags&FlagDirectIO != 0, LogSec: blockSize}
	if l != wantL {
		t.Fatalf("losetup = %+v, want %+v", l, wantL)
	}
	if j := losetupJ(t, path); !slices.Contains(j, fmt.Sprintf("%s: [%04d]:%d", d.Path(), dev, ino)) {
		t.Fatalf("losetup -j %s = %q, want %s with [%d]:%d", path, j, d.Path(), dev, ino)
	}
	if got := readAttr(t, d.Number(), "queue/logical_block_size"); got != strconv.Itoa(int(blockSize)) {
		t.Fatalf("logical block size %s, want %d", got, blockSize)
	}
}

// refOfBinding is what the device's lo_file_name holds after a bind of
// path with o: o.Ref, or the path's first 63 bytes.
func refOfBinding(path string, o Options) string {
	if o.Ref != "" {
		return o.Ref
	}
	return path[:min(len(path), 63)]
}

// losetupJ returns `losetup -j path`, one "NAME: [DEV]:INO" per device.
func losetupJ(t *testing.T, path string) []string {
	t.Helper()
	out, err := exec.Command("losetup", "-j", path).Output()
	if err != nil {
		t.Fatalf("losetup -j %s: %v", path, err)
	}
	var devs []string
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if name, _, ok := strings.Cut(line, " ("); ok {
			devs = append(devs, name)
		}
	}
	return devs
}

// mustFd returns f's descriptor number for a raw call; f stays open for
// the test.
func mustFd(t *testing.T, f *os.File) int {
	t.Helper()
	rc, err := f.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var fd int
	rc.Control(func(u uintptr) { fd = int(u) })
	return fd
}

// A forcedKernel is the real kernel with chosen requests failing, to drive
// fallbacks and rollbacks on a kernel that would not take them.
type forcedKernel struct {
	sys  *system
	mu   sync.Mutex
	fail map[uint]error
	seen []uint
}

// useKernel returns a system of the real sysfs whose kernel is k, for the
// test to call: what the package does when the kernel's opens do what k's
// do.
func useKernel(t *testing.T, k kernel) *system {
	t.Helper()
	kerneltest.Require(t)
	s := newSystem(k, sysfs.Root)
	t.Cleanup(s.resetShared)
	return s
}

// useForced returns a forcedKernel failing the requests in fail, with its
// system (k.sys).
func useForced(t *testing.T, fail map[uint]error) *forcedKernel {
	k := &forcedKernel{fail: fail}
	k.sys = useKernel(t, k)
	return k
}

func (k *forcedKernel) open(path string, mode int) (handle, error) {
	h, err := osKernel{}.open(path, mode)
	if err != nil {
		return nil, err
	}
	return &forcedHandle{handle: h, k: k}, nil
}

type forcedHandle struct {
	handle
	k *forcedKernel
}

func (h *forcedHandle) check(req uint) error {
	h.k.mu.Lock()
	defer h.k.mu.Unlock()
	h.k.seen = append(h.k.seen, req)
	return h.k.fail[req]
}

func (h *forcedHandle) rawIoctl(req uint, arg uintptr) (int, error) {
	if err := h.check(req); err != nil {
		return -1, err
	}
	return h.handle.rawIoctl(req, arg)
}

func (h *forcedHandle) rawIoctlPtr(req uint, arg unsafe.Pointer) error {
	if err := h.check(req); err != nil {
		return err
	}
	return h.handle.rawIoctlPtr(req, arg)
}

func containsReq(seen []uint, req uint) bool {
	for _, r := range seen {
		if r == req {
			return true
		}
	}
	return false
}

// addPartition adds partition num of d by hand (kerneltest.AddPartition),
// holding a shared lock of d's node until release, or the test's end.
func addPartition(t *testing.T, d *Device, num, start, size int) (release func()) {
	t.Helper()
	return kerneltest.AddPartition(t, d.Path(), d.Path(), num, start, size)
}

// attachT attaches path with o for the test; cleanup detaches and closes.
func attachT(t *testing.T, path string, o Options) *Device {
	t.Helper()
	return attachOn(t, host, path, o)
}

// attachOn is attachT on system s.
func attachOn(t *testing.T, s *system, path string, o Options) *Device {
	t.Helper()
	kerneltest.Require(t)
	d, err := s.Attach(context.Background(), path, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { detach(t, d) })
	return d
}

// A pipedChild is the test binary running one test as a child process,
// talking with its parent through its standard input and output.
type pipedChild struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	out   *bufio.Scanner
}

// startPiped runs test again in a child process with env added.
func startPiped(t *testing.T, test string, env ...string) *pipedChild {
	t.Helper()
	return startPipedIn(t, nil, test, env...)
}

// startPipedIn is startPiped with the child started with attr: in
// namespaces of its own, for one.
func startPipedIn(t *testing.T, attr *syscall.SysProcAttr, test string, env ...string) *pipedChild {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^"+test+"$", "-test.count=1", "-test.v")
	cmd.Env = append(os.Environ(), env...)
	cmd.SysProcAttr = attr
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return &pipedChild{cmd, stdin, bufio.NewScanner(stdout)}
}

// deviceNumber returns N of the path /dev/loopN.
func deviceNumber(t *testing.T, path string) int {
	t.Helper()
	n, err := strconv.Atoi(strings.TrimPrefix(path, "/dev/loop"))
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// rawBind binds f to the device at path as another program would, and
// returns its descriptor of the device.
func rawBind(t *testing.T, path string, f *os.File) int {
	t.Helper()
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.IoctlLoopConfigure(fd, &unix.LoopConfig{Fd: uint32(mustFd(t, f))}); err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	return fd
}

// fileIn makes a file of size bytes in dir for the test.
func fileIn(t *testing.T, dir string, size int64) *os.File {
	t.Helper()
	f, err := os.CreateTemp(dir, "image-*.img")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close(); os.Remove(f.Name()) })
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	return f
}

// writeDevice writes b at off through d's node, and syncs it, which
// writes it through to the backing file.
func writeDevice(d *Device, b []byte, off int64) error {
	w, err := os.OpenFile(d.Path(), os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer w.Close()
	if _, err := w.WriteAt(b, off); err != nil {
		return err
	}
	return w.Sync()
}

// What the tests know of the running kernel: where its behaviour differs,
// a test says which kernels and why.

var kernelConfig = sync.OnceValues(func() (map[string]string, error) {
	var r io.Reader
	if f, err := os.Open("/proc/config.gz"); err == nil {
		defer f.Close()
		if r, err = gzip.NewReader(f); err != nil {
			return nil, err
		}
	} else {
		b, err := os.ReadFile("/boot/config-" + kerneltest.Release())
		if err != nil {
			return nil, errors.New("neither /proc/config.gz nor /boot/config-" + kerneltest.Release() + " tells how the kernel was built")
		}
		r = bytes.NewReader(b)
	}
	cfg := map[string]string{}
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok && strings.HasPrefix(k, "CONFIG_") {
			cfg[k] = v
		}
	}
	return cfg, sc.Err()
})

// requireConfig skips the test unless the kernel was built with every
// option named (=y or =m).
func requireConfig(t *testing.T, options ...string) {
	t.Helper()
	cfg, err := kernelConfig()
	if err != nil {
		t.Skip(err)
	}
	for _, o := range options {
		if v := cfg[o]; v != "y" && v != "m" {
			t.Skipf("kernel %s is built without %s", kerneltest.Release(), o)
		}
	}
}

// directIOOK reports whether files in dir can be opened with O_DIRECT:
// tmpfs could not before Linux 6.6, and the kernel then cannot give a loop
// device direct I/O on them.
func directIOOK(t testing.TB, dir string) bool {
	t.Helper()
	p := filepath.Join(dir, "odirect-probe")
	if err := os.WriteFile(p, make([]byte, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	defer os.Remove(p)
	fd, err := unix.Open(p, unix.O_RDONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err == unix.EINVAL {
		return false
	}
	if err != nil {
		t.Fatal(err)
	}
	unix.Close(fd)
	return true
}

// wantNoDirectIO checks that binding file with FlagDirectIO failed with
// ErrNoDirectIO and left nothing bound to it.
func wantNoDirectIO(t *testing.T, err error, file string) {
	t.Helper()
	if !errors.Is(err, ErrNoDirectIO) || !errors.Is(err, unix.EINVAL) {
		t.Fatalf("bind with direct I/O on a file system without O_DIRECT = %v, want ErrNoDirectIO", err)
	}
	if found, err := FindByBackingFile(file); err != nil || len(found) != 0 {
		t.Fatalf("left bound after ErrNoDirectIO: %+v, %v", found, err)
	}
	t.Logf("kernel %s, %s: no O_DIRECT, so no direct I/O: %v", kerneltest.Release(), filepath.Dir(file), err)
}
