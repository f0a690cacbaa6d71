package loopctl

import (
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// A fakeKernel is an in-memory loop driver behind the handle seam, so that
// tests without root can drive every code path and fail any step.
type fakeKernel struct {
	mu     sync.Mutex
	devs   map[int]*fakeDev
	log    []string           // every call, in order: "open /dev/loop0", "LOOP_CONFIGURE /dev/loop0"
	counts map[string]int     // calls per step name
	faults map[string][]fault // pending faults per step name
	nopen  int                // handles not yet closed
	// noConfigure makes LOOP_CONFIGURE unknown, as before Linux 5.8.
	noConfigure bool
	// oldAdd makes LOOP_CTL_ADD -1 answer EEXIST while an unbound device
	// exists, as before Linux 5.14.
	oldAdd bool
	// noDirectIO is a backing file system without O_DIRECT: LOOP_CONFIGURE
	// leaves direct I/O off without a word, LOOP_SET_DIRECT_IO refuses it.
	noDirectIO bool
	// noControl hides /dev/loop-control; noNode hides /dev/loopN nodes
	// that sysfs still lists (a container without devtmpfs).
	noControl bool
	noNode    map[int]bool
	// noAccess refuses opens of /dev/loopN with EACCES: a process
	// without root or the disk group.
	noAccess bool
	// noAdmin is a caller without CAP_SYS_ADMIN: the requests that change
	// a device fail with EPERM through a descriptor open read-only.
	noAdmin bool
	// flatSysfs lays sysfs out without /sys/devices/virtual/block; see
	// sync.
	flatSysfs bool
	// noDiskSeq is a kernel before 5.15: BLKGETDISKSEQ is unknown
	// (EINVAL), and sysfs shows no diskseq. Otherwise seq is the
	// machine's last disk sequence number, raised at every add, bind and
	// unbind.
	noDiskSeq bool
	seq       uint64
	// ctlWait, when set, makes a blocking flock of the control device wait
	// until it is closed: another process holding the lock.
	ctlWait chan struct{}
	// devWait does the same for a blocking flock of a device.
	devWait chan struct{}
	// inUse holds the partitions ("loop0p1") that someone has open: BLKPG
	// refuses to delete them.
	inUse map[string]bool
	// root is the fake sysfs tree, kept in step with devs.
	root string
	// sys is the system of this kernel and tree, which the test calls.
	sys *system
	t   *testing.T
}

type fakeDev struct {
	diskSeq   uint64
	backing   string // what sysfs shows as loop/backing_file
	bound     bool
	rundown   bool // cleared while its only opener held it: torn down at the last close
	info      unix.LoopInfo64
	fileSize  int64 // the backing file's, when bound
	blockSize uint32
	directIO  bool
	opens     int
}

// A fault fails the nth call (1-based, counted per step) with err, after
// running act (under the kernel's lock) if set: what another process did
// meanwhile.
type fault struct {
	nth int
	err error
	act func(k *fakeKernel)
}

// useFake installs a fake kernel with devices 0..n-1 for the test.
func useFake(t *testing.T, n int) *fakeKernel {
	t.Helper()
	k := &fakeKernel{devs: map[int]*fakeDev{}, counts: map[string]int{}, faults: map[string][]fault{},
		noNode: map[int]bool{}, root: t.TempDir(), t: t}
	for _, dir := range []string{"/block", "/devices/virtual/block"} {
		if err := os.MkdirAll(k.root+dir, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for i := range n {
		k.add(i)
	}
	k.sys = newSystem(k, k.root)
	k.sys.bindPause, k.sys.againPause = time.Microsecond, time.Microsecond
	k.sys.version = newestKernel      // a test of an older kernel's ways sets its own
	k.sys.udev = k.root + "/run-udev" // no udev, unless a test starts one there
	t.Cleanup(k.sys.resetShared)
	return k
}

// add creates device n and its sysfs directory. k.mu is held or unneeded.
func (k *fakeKernel) add(n int) {
	k.devs[n] = &fakeDev{}
	k.nextSeq(n)
	k.sync(n)
}

// nextSeq gives device n the machine's next disk sequence number.
func (k *fakeKernel) nextSeq(n int) {
	k.seq++
	k.devs[n].diskSeq = k.seq
}

// sync writes device n's sysfs attributes as the kernel shows them, or
// removes its directory when the device is gone. k.mu is held.
//
// As in the kernel, the directory is /sys/devices/virtual/block/loopN,
// and /sys/block/loopN a symbolic link to it; with flatSysfs (a test of
// the fallback) /sys/block/loopN is the directory itself.
func (k *fakeKernel) sync(n int) {
	link := fmt.Sprintf("%s/block/loop%d", k.root, n)
	dir := fmt.Sprintf("%s/devices/virtual/block/loop%d", k.root, n)
	if k.flatSysfs {
		dir = link
	}
	d := k.devs[n]
	// The kernel's attributes of a binding, or of a device, read ENODEV
	// through a descriptor opened before they went; the fake's files,
	// emptied first, read empty, which a reader takes for a teardown.
	if d == nil || !d.bound {
		os.Truncate(dir+"/loop/backing_file", 0)
	}
	if d == nil {
		os.RemoveAll(dir)
		os.Remove(link)
		return
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		k.t.Error(err)
	}
	if !k.flatSysfs {
		if _, err := os.Lstat(link); err != nil {
			if err := os.Symlink(fmt.Sprintf("../devices/virtual/block/loop%d", n), link); err != nil {
				k.t.Error(err)
			}
		}
	}
	bit := func(f uint32) string {
		if d.info.Flags&f != 0 {
			return "1\n"
		}
		return "0\n"
	}
	k.write(dir+"/dev", fmt.Sprintf("7:%d\n", n))
	k.write(dir+"/ro", bit(unix.LO_FLAGS_READ_ONLY))
	k.write(dir+"/size", fmt.Sprintf("%d\n", d.size()/512))
	if err := os.MkdirAll(dir+"/queue", 0o755); err != nil {
		k.t.Error(err)
	}
	k.write(dir+"/queue/logical_block_size", fmt.Sprintf("%d\n", d.logicalBlockSize()))
	if !k.noDiskSeq {
		k.write(dir+"/diskseq", fmt.Sprintf("%d\n", d.diskSeq))
	}
	if !d.bound {
		os.RemoveAll(dir + "/loop")
		return
	}
	os.Mkdir(dir+"/loop", 0o755)
	k.write(dir+"/loop/backing_file", d.backing+"\n")
	k.write(dir+"/loop/offset", fmt.Sprintf("%d\n", d.info.Offset))
	k.write(dir+"/loop/sizelimit", fmt.Sprintf("%d\n", d.info.Sizelimit))
	k.write(dir+"/loop/autoclear", bit(unix.LO_FLAGS_AUTOCLEAR))
	k.write(dir+"/loop/partscan", bit(unix.LO_FLAGS_PARTSCAN))
	k.write(dir+"/loop/dio", bit(unix.LO_FLAGS_DIRECT_IO))
}

func (k *fakeKernel) write(path, v string) {
	if err := os.WriteFile(path, []byte(v), 0o644); err != nil {
		k.t.Error(err)
	}
}

// size is the device's size in bytes, as the kernel computes it.
func (d *fakeDev) size() uint64 {
	if !d.bound || d.fileSize <= int64(d.info.Offset) {
		return 0
	}
	size := uint64(d.fileSize) - d.info.Offset
	if d.info.Sizelimit != 0 && d.info.Sizelimit < size {
		size = d.info.Sizelimit
	}
	return size &^ 511
}

// logicalBlockSize is the device's block size: 512 unless set.
func (d *fakeDev) logicalBlockSize() uint32 {
	if !d.bound || d.blockSize == 0 {
		return 512
	}
	return d.blockSize
}

// bind binds device n to the file open as fd, as LOOP_SET_FD and
// LOOP_CONFIGURE do. k.mu is held.
func (k *fakeKernel) bind(n int, fd uintptr, info unix.LoopInfo64, blockSize uint32) {
	d := k.devs[n]
	d.bound, d.info, d.blockSize = true, info, blockSize
	k.nextSeq(n)
	d.directIO = info.Flags&unix.LO_FLAGS_DIRECT_IO != 0 && !k.noDirectIO
	d.info.Number = uint32(n)
	d.backing, _ = os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd))
	var st unix.Stat_t
	if unix.Fstat(int(fd), &st) == nil {
		d.info.Device, d.info.Inode, d.fileSize = uint64(st.Dev), uint64(st.Ino), st.Size
		if fl, _ := unix.FcntlInt(fd, unix.F_GETFL, 0); fl&unix.O_ACCMODE == unix.O_RDONLY {
			d.info.Flags |= unix.LO_FLAGS_READ_ONLY
		}
	}
}

// addPartition shows partition m of device n in sysfs, as the kernel does
// once it has read a partition table; start and size are in sectors.
func (k *fakeKernel) addPartition(n, m int, start, size uint64) {
	dir := fmt.Sprintf("%s/block/loop%d/loop%dp%d", k.root, n, n, m)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		k.t.Fatal(err)
	}
	k.write(dir+"/start", fmt.Sprintf("%d\n", start))
	k.write(dir+"/size", fmt.Sprintf("%d\n", size))
	k.write(dir+"/dev", fmt.Sprintf("259:%d\n", m))
}

// failAt makes the nth call of step fail with err.
func (k *fakeKernel) failAt(step string, nth int, err error) {
	k.actAt(step, nth, nil, err)
}

// actAt runs act just before the nth call of step, which then fails with
// err, or, for a nil err, goes ahead in the changed kernel.
func (k *fakeKernel) actAt(step string, nth int, act func(k *fakeKernel), err error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.faults[step] = append(k.faults[step], fault{nth, err, act})
}

// enter records a call and returns the fault injected for it, if any:
// faults are set for a step ("open"), counting its calls on any path, or
// for a step on one path ("open /dev/loop1"). k.mu is held.
func (k *fakeKernel) enter(step, path string) error {
	k.log = append(k.log, step+" "+path)
	for _, key := range []string{step, step + " " + path} {
		k.counts[key]++
		for _, f := range k.faults[key] {
			if f.nth == k.counts[key] {
				if f.act != nil {
					f.act(k)
				}
				return f.err
			}
		}
	}
	return nil
}

// calls returns the log lines that start with prefix.
func (k *fakeKernel) calls(prefix string) []string {
	k.mu.Lock()
	defer k.mu.Unlock()
	var out []string
	for _, l := range k.log {
		if strings.HasPrefix(l, prefix) {
			out = append(out, l)
		}
	}
	return out
}

func (k *fakeKernel) bound() []int {
	k.mu.Lock()
	defer k.mu.Unlock()
	var out []int
	for n, d := range k.devs {
		if d.bound {
			out = append(out, n)
		}
	}
	slices.Sort(out)
	return out
}

func (k *fakeKernel) openHandles() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.nopen
}

func (k *fakeKernel) open(path string, mode int) (handle, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if err := k.enter("open", path); err != nil {
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	n := -1
	if path == ControlPath && k.noControl {
		return nil, &os.PathError{Op: "open", Path: path, Err: unix.ENOENT}
	}
	if path != ControlPath {
		num, ok := strings.CutPrefix(path, "/dev/loop")
		i, err := strconv.Atoi(num)
		if !ok || err != nil || k.devs[i] == nil || k.noNode[i] {
			return nil, &os.PathError{Op: "open", Path: path, Err: unix.ENOENT}
		}
		if k.noAccess {
			return nil, &os.PathError{Op: "open", Path: path, Err: unix.EACCES}
		}
		if k.devs[i].rundown {
			return nil, &os.PathError{Op: "open", Path: path, Err: unix.ENXIO}
		}
		n = i
		k.devs[n].opens++
	}
	k.nopen++
	return &fakeHandle{k: k, path: path, n: n, ro: mode&readOnly != 0}, nil
}

type fakeHandle struct {
	k      *fakeKernel
	path   string
	n      int // -1 for the control device
	ro     bool
	closed bool
}

func (h *fakeHandle) readOnly() bool { return h.ro }

var reqNames = map[uint]string{
	reqSetFD: "LOOP_SET_FD", reqClearFD: "LOOP_CLR_FD", reqSetStatus64: "LOOP_SET_STATUS64",
	reqGetStatus64: "LOOP_GET_STATUS64", reqChangeFD: "LOOP_CHANGE_FD", reqSetCapacity: "LOOP_SET_CAPACITY",
	reqSetDirectIO: "LOOP_SET_DIRECT_IO", reqSetBlockSize: "LOOP_SET_BLOCK_SIZE", reqConfigure: "LOOP_CONFIGURE",
	reqCtlAdd: "LOOP_CTL_ADD", reqCtlRemove: "LOOP_CTL_REMOVE", reqCtlGetFree: "LOOP_CTL_GET_FREE",
	unix.BLKSSZGET: "BLKSSZGET", uint(unix.BLKGETSIZE64): "BLKGETSIZE64", unix.BLKRRPART: "BLKRRPART",
	uint(unix.BLKGETDISKSEQ): "BLKGETDISKSEQ", reqBLKPG: "BLKPG",
}

func (h *fakeHandle) rawIoctl(req uint, arg uintptr) (int, error) {
	return h.do(req, arg, nil)
}

func (h *fakeHandle) rawIoctlPtr(req uint, arg unsafe.Pointer) error {
	_, err := h.do(req, 0, arg)
	return err
}

func (h *fakeHandle) do(req uint, arg uintptr, ptr unsafe.Pointer) (int, error) {
	k := h.k
	k.mu.Lock()
	defer k.mu.Unlock()
	if h.closed {
		return -1, os.ErrClosed
	}
	if err := k.enter(reqNames[req], h.path); err != nil {
		return -1, err
	}
	if h.n < 0 {
		return k.control(req, int(arg))
	}
	// What a request changes, sysfs shows; a request that only reads
	// writes nothing (and opens no file: a test may have none to spare).
	switch req {
	case reqGetStatus64, unix.BLKSSZGET, uint(unix.BLKGETSIZE64), uint(unix.BLKGETDISKSEQ):
	default:
		defer k.sync(h.n)
	}
	d := k.devs[h.n]
	if d.rundown && req != reqConfigure && req != reqSetFD {
		return -1, unix.ENXIO
	}
	switch req {
	case reqSetFD, reqConfigure, reqChangeFD, reqClearFD, reqSetStatus64, reqSetCapacity, reqSetDirectIO, reqSetBlockSize:
		if h.ro && k.noAdmin {
			return -1, unix.EPERM
		}
	}
	switch req {
	case reqConfigure:
		cfg := (*unix.LoopConfig)(ptr)
		switch {
		case k.noConfigure:
			return -1, unix.EINVAL
		case cfg.Fd == ^uint32(0):
			return -1, unix.EBADF
		case d.bound:
			return -1, unix.EBUSY
		}
		k.bind(h.n, uintptr(cfg.Fd), cfg.Info, cfg.Size)
		if h.ro { // bound through a read-only descriptor
			d.info.Flags |= unix.LO_FLAGS_READ_ONLY
		}
	case reqSetFD:
		if d.bound {
			return -1, unix.EBUSY
		}
		k.bind(h.n, arg, unix.LoopInfo64{}, 512)
		if h.ro {
			d.info.Flags |= unix.LO_FLAGS_READ_ONLY
		}
	case reqGetStatus64:
		if !d.bound {
			return -1, unix.ENXIO
		}
		info := d.info
		info.Flags &^= unix.LO_FLAGS_DIRECT_IO
		if d.directIO {
			info.Flags |= unix.LO_FLAGS_DIRECT_IO
		}
		*(*unix.LoopInfo64)(ptr) = info
	case reqSetStatus64:
		if !d.bound {
			return -1, unix.ENXIO
		}
		in := (*unix.LoopInfo64)(ptr)
		d.info.Offset, d.info.Sizelimit, d.info.File_name = in.Offset, in.Sizelimit, in.File_name
		// Only autoclear can be cleared; partscan stays once set.
		d.info.Flags = d.info.Flags&^unix.LO_FLAGS_AUTOCLEAR | in.Flags&uint32(legacyFlags)
	case reqClearFD:
		// Linux 6.11 and later: autoclear, and for the only opener the
		// start of the teardown, which ends at the last close.
		if !d.bound {
			return -1, unix.ENXIO
		}
		d.info.Flags |= unix.LO_FLAGS_AUTOCLEAR
		d.rundown = d.opens == 1
	case unix.BLKRRPART:
		if !d.bound || d.info.Flags&unix.LO_FLAGS_PARTSCAN == 0 {
			return -1, unix.EINVAL
		}
	case reqBLKPG:
		return 0, k.blkpg(h.n, (*unix.BlkpgIoctlArg)(ptr))
	case unix.BLKSSZGET:
		*(*int32)(ptr) = int32(d.logicalBlockSize())
	case uint(unix.BLKGETDISKSEQ):
		if k.noDiskSeq {
			return -1, unix.EINVAL
		}
		*(*uint64)(ptr) = d.diskSeq
	case uint(unix.BLKGETSIZE64):
		*(*uint64)(ptr) = d.size()
	case reqSetBlockSize, reqSetDirectIO, reqSetCapacity, reqChangeFD:
		if !d.bound {
			return -1, unix.ENXIO
		}
		if req == reqSetBlockSize {
			d.blockSize = uint32(arg)
		}
		if req == reqSetDirectIO {
			if arg != 0 && k.noDirectIO {
				return -1, unix.EINVAL
			}
			d.directIO = arg != 0
		}
	default:
		return -1, unix.ENOTTY
	}
	return 0, nil
}

// blkpg serves BLKPG_DEL_PARTITION of a partition of device n, which
// needs CAP_SYS_ADMIN whatever the descriptor's mode, as the kernel's
// does. k.mu is held.
func (k *fakeKernel) blkpg(n int, arg *unix.BlkpgIoctlArg) error {
	p := (*unix.BlkpgPartition)(unsafe.Pointer(arg.Data))
	name := fmt.Sprintf("loop%dp%d", n, p.Pno)
	dir := fmt.Sprintf("%s/block/loop%d/%s", k.root, n, name)
	switch _, err := os.Stat(dir); {
	case arg.Op != unix.BLKPG_DEL_PARTITION:
		return unix.EINVAL
	case k.noAdmin:
		return unix.EACCES
	case err != nil:
		return unix.ENXIO
	case k.inUse[name]:
		return unix.EBUSY
	}
	return os.RemoveAll(dir)
}

// control serves the LOOP_CTL_* requests. k.mu is held.
func (k *fakeKernel) control(req uint, n int) (int, error) {
	switch req {
	case reqCtlGetFree:
		for i := 0; ; i++ {
			if d := k.devs[i]; d == nil || !d.bound {
				if d == nil {
					k.add(i)
				}
				return i, nil
			}
		}
	case reqCtlAdd:
		if n == -1 && k.oldAdd {
			for _, d := range k.devs {
				if !d.bound {
					return -1, unix.EEXIST
				}
			}
		}
		if n == -1 {
			for n = 0; k.devs[n] != nil; n++ {
			}
		}
		if k.devs[n] != nil {
			return -1, unix.EEXIST
		}
		k.add(n)
		return n, nil
	case reqCtlRemove:
		d := k.devs[n]
		switch {
		case d == nil:
			return -1, unix.ENODEV
		case d.bound || d.opens > 0:
			return -1, unix.EBUSY
		}
		delete(k.devs, n)
		k.sync(n)
		return 0, nil
	}
	return -1, unix.ENOTTY
}

// flock records the device's lock steps as flock-ex (LOCK_NB), flock-sh
// (LOCK_NB), flock-ex-wait (blocking, which waits for k.devWait) and
// flock-un, and the control device's as ctl-lock (LOCK_NB), ctl-lock-wait
// (blocking, which waits for k.ctlWait) and ctl-unlock. A device's lock
// held by another process is modelled by failing steps: flock-ex alone
// for a shared holder (udev), flock-ex and flock-sh for an exclusive one.
func (h *fakeHandle) flock(how int) error {
	step := map[bool]map[int]string{
		false: {unix.LOCK_EX | unix.LOCK_NB: "flock-ex", unix.LOCK_SH | unix.LOCK_NB: "flock-sh",
			unix.LOCK_EX: "flock-ex-wait", unix.LOCK_UN: "flock-un"},
		true: {unix.LOCK_EX | unix.LOCK_NB: "ctl-lock", unix.LOCK_EX: "ctl-lock-wait", unix.LOCK_UN: "ctl-unlock"},
	}[h.n < 0][how]
	if step == "" {
		h.k.t.Errorf("flock(%#x) on %s", how, h.path)
	}
	h.k.mu.Lock()
	if h.closed {
		h.k.mu.Unlock()
		return os.ErrClosed
	}
	err := h.k.enter(step, h.path)
	wait := map[string]chan struct{}{"ctl-lock-wait": h.k.ctlWait, "flock-ex-wait": h.k.devWait}[step]
	h.k.mu.Unlock()
	if err == nil && wait != nil {
		<-wait
	}
	return err
}

func (h *fakeHandle) rdev() (uint64, error) {
	return unix.Mkdev(7, uint32(h.n)), nil
}

func (h *fakeHandle) Close() error {
	k := h.k
	k.mu.Lock()
	defer k.mu.Unlock()
	if h.closed {
		return os.ErrClosed
	}
	h.closed = true
	k.nopen--
	if h.n >= 0 {
		if d := k.devs[h.n]; d != nil {
			d.opens--
			if d.opens == 0 && d.bound && d.info.Flags&unix.LO_FLAGS_AUTOCLEAR != 0 {
				d.bound, d.rundown, d.info = false, false, unix.LoopInfo64{}
				k.nextSeq(h.n)
				k.sync(h.n)
			}
		}
	}
	k.log = append(k.log, "close "+h.path)
	return nil
}

// deviceHandles counts the open handles of loop devices, leaving out the
// control device.
func (k *fakeKernel) deviceHandles() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	n := 0
	for _, d := range k.devs {
		n += d.opens
	}
	return n
}
