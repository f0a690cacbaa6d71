package loopctl

import (
	"context"
	"io/fs"
	"os"
	"strconv"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/call"
)

// The backing file. A caller's path or file may be anything: a named pipe
// whose open waits for a writer, a device whose open has effects of its
// own (a watchdog that starts counting, a tape that rewinds), a socket, a
// file of procfs or sysfs whose "contents" are the kernel's controls. So
// Attach looks at what a path names before it opens it for reading or
// writing, only a regular file with data or a block device gets that far,
// and every refusal names the file, never a loop device, as the cause.

// openBackingFile opens the file at path to back a loop device, read-only
// with FlagReadOnly and read-write otherwise, as o asks (NoSymlinks,
// RegularFileOnly), and returns its descriptor.
//
// It opens the path with O_PATH first, which runs no driver's open and
// waits for no one, and checks what that is (checkKind). Only then does it
// open the file itself, through /proc/self/fd, so that what it opens is
// the inode it checked even if the path is switched meanwhile. That open
// is made with O_NONBLOCK, so that a lease another process holds on the
// file (a file server's) makes it fail at once rather than wait up to the
// kernel's lease-break-time (45 s by default): the break has begun, and
// the open is tried again, with backoff, while ctx allows. O_NONBLOCK is
// then cleared: the loop driver reads and writes through this file for as
// long as it is bound, and a file system told not to wait (FUSE passes the
// flags on to its server) must not answer its reads with EAGAIN.
//
// Without a /proc of this process's own (a container or an initramfs that
// mounts none), the path is opened a second time, and the file opened must
// be the one checked.
func (s *system) openBackingFile(ctx context.Context, path string, o Options) (int, error) {
	if strings.IndexByte(path, 0) >= 0 {
		return -1, fileErr(invalid("the path %q has a NUL byte", path))
	}
	pfd, err := s.openPath(path, unix.O_PATH, o.NoSymlinks)
	if err != nil {
		return -1, fileErr(err)
	}
	defer closeFD(pfd)
	st, err := fstat(uintptr(pfd))
	if err != nil {
		return -1, fileErr(&os.PathError{Op: "stat", Path: path, Err: err})
	}
	if err := checkKind(pfd, &st, path); err != nil {
		return -1, err
	}
	if err := checkRegular(&st, path, o); err != nil {
		return -1, err
	}
	flags := unix.O_RDWR
	if o.Flags&FlagReadOnly != 0 {
		flags = unix.O_RDONLY
	}
	flags |= unix.O_NONBLOCK | unix.O_NOCTTY
	fd, err := s.reopen(ctx, pfd, flags)
	if err == unix.ENOENT {
		fd, err = s.openAgain(path, flags, &st, o.NoSymlinks)
	}
	if err != nil {
		return -1, fileErr(openError(path, err))
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETFL, 0); err != nil {
		closeFD(fd)
		return -1, fileErr(&os.PathError{Op: "fcntl", Path: path, Err: err})
	}
	if err := checkLoopBacking(uintptr(fd), &st, path); err != nil {
		closeFD(fd)
		return -1, err
	}
	return fd, nil
}

// reopen opens the file that the O_PATH descriptor pfd stands for, through
// /proc/self/fd, with flags. While another process holds a lease on the
// file that the open breaks (EWOULDBLOCK, with O_NONBLOCK), it tries
// again with backoff, until the holder lets go, the kernel breaks the
// lease itself, or ctx ends. An error is an errno, or leased's.
func (s *system) reopen(ctx context.Context, pfd, flags int) (int, error) {
	var buf [64]byte
	p := strconv.AppendInt(append(buf[:0], s.procFD...), int64(pfd), 10)
	p = append(p, 0)
	for attempt := 0; ; attempt++ {
		fd, errno := call.OpenAt(unix.AT_FDCWD, &p[0], flags)
		switch errno {
		case 0:
			return fd, nil
		case unix.EWOULDBLOCK:
		default:
			return -1, errno
		}
		if err := backoff(ctx, attempt+1, s.bindPause); err != nil {
			return -1, leased(err)
		}
	}
}

// leased ends an open that waited for another process's lease on the
// file while ctx allowed (ctxErr). It matches ctxErr and EWOULDBLOCK.
func leased(ctxErr error) error {
	return &cause{text: "another process holds a lease on the file, and the context ended before it let go: " + ctxErr.Error(),
		errs: []error{ctxErr, unix.EWOULDBLOCK}}
}

// openAgain opens path with flags once more, for a process with no /proc
// of its own, and checks that it is the file that st describes: the path
// may have been switched since it was checked.
func (s *system) openAgain(path string, flags int, st *unix.Stat_t, noSymlinks bool) (int, error) {
	fd, err := s.openPath(path, flags, noSymlinks)
	if err != nil {
		return -1, err
	}
	got, err := fstat(uintptr(fd))
	if err != nil || got.Dev != st.Dev || got.Ino != st.Ino || got.Mode&unix.S_IFMT != st.Mode&unix.S_IFMT {
		closeFD(fd)
		return -1, errSwitched
	}
	return fd, nil
}

// openError is the error of the open of backing file path: an
// *os.PathError, with the errnos that a caller can act on explained.
func openError(path string, err error) error {
	if pe, ok := err.(*os.PathError); ok {
		err = pe.Err
	}
	switch err {
	case unix.EROFS:
		err = errReadOnlyFS
	}
	return &os.PathError{Op: "open", Path: path, Err: err}
}

// errReadOnlyFS explains EROFS from a read-write open of the backing file.
var errReadOnlyFS error = explain("the file system is read-only; FlagReadOnly binds the file read-only", unix.EROFS, fs.ErrPermission)

// openPath opens path with flags, and with noSymlinks refuses a path with
// a symbolic link in any component: openat2's RESOLVE_NO_SYMLINKS (Linux
// 5.6), or where openat2 is missing or filtered (ENOSYS, or EPERM from a
// seccomp filter), a walk of the components with O_PATH|O_NOFOLLOW, each
// opened relative to the last. Either way ELOOP, explained, is the
// refusal. An error is an *os.PathError.
func (s *system) openPath(path string, flags int, noSymlinks bool) (int, error) {
	if !noSymlinks {
		return openFD(path, flags)
	}
	flags |= unix.O_CLOEXEC
	if flags&unix.O_PATH == 0 {
		// openat2 refuses O_LARGEFILE (0 on 64-bit, not on 386) beside
		// O_PATH with EINVAL, where openat quietly drops it.
		flags |= unix.O_LARGEFILE
	}
	fd, err := -1, error(unix.ENOSYS)
	if s.has(featOpenat2) {
		how := unix.OpenHow{Flags: uint64(flags), Resolve: unix.RESOLVE_NO_SYMLINKS}
		err = call.Retry(func() (err error) { fd, err = unix.Openat2(unix.AT_FDCWD, path, &how); return err })
		if err == unix.ENOSYS || err == unix.EPERM {
			s.lacks(featOpenat2)
		}
	}
	if err == unix.ENOSYS || err == unix.EPERM {
		fd, err = walkNoSymlinks(path, flags)
	}
	if err == unix.ELOOP {
		err = errSymlink
	}
	if err != nil {
		return -1, &os.PathError{Op: "open", Path: path, Err: err}
	}
	return fd, nil
}

// walkNoSymlinks opens path with flags, a component at a time, each
// relative to the directory before it and with O_NOFOLLOW: ELOOP for a
// symbolic link among them. An error is an errno.
func walkNoSymlinks(path string, flags int) (int, error) {
	var parts []string
	for _, p := range strings.Split(path, "/") {
		if p != "" && p != "." {
			parts = append(parts, p)
		}
	}
	if len(parts) == 0 {
		return -1, unix.ENOENT
	}
	dir := unix.AT_FDCWD
	if strings.HasPrefix(path, "/") {
		fd, errno := call.OpenAt(unix.AT_FDCWD, &[]byte("/\x00")[0], unix.O_PATH|unix.O_DIRECTORY)
		if errno != 0 {
			return -1, errno
		}
		dir = fd
	}
	defer func() {
		if dir != unix.AT_FDCWD {
			closeFD(dir)
		}
	}()
	for i, p := range parts {
		name, err := unix.BytePtrFromString(p)
		if err != nil {
			return -1, err
		}
		last := i == len(parts)-1
		how := unix.O_PATH | unix.O_NOFOLLOW
		if last {
			how = flags | unix.O_NOFOLLOW
		}
		fd, errno := call.OpenAt(dir, name, how)
		if errno != 0 {
			return -1, errno
		}
		// O_PATH|O_NOFOLLOW opens a symbolic link itself, where a plain
		// open with O_NOFOLLOW fails with ELOOP.
		st, err := fstat(uintptr(fd))
		switch {
		case err != nil:
			closeFD(fd)
			return -1, err
		case st.Mode&unix.S_IFMT == unix.S_IFLNK:
			closeFD(fd)
			return -1, unix.ELOOP
		case !last && st.Mode&unix.S_IFMT != unix.S_IFDIR:
			closeFD(fd)
			return -1, unix.ENOTDIR
		case last:
			return fd, nil
		}
		if dir != unix.AT_FDCWD {
			closeFD(dir)
		}
		dir = fd
	}
	panic("unreachable")
}

// errSymlink explains ELOOP from an open that refused symbolic links.
var errSymlink error = explain("the path has a symbolic link in it, which Options.NoSymlinks refuses", unix.ELOOP, nil)

// checkRegular applies Options.RegularFileOnly to the backing file whose
// fstat is st.
func checkRegular(st *unix.Stat_t, name string, o Options) error {
	if o.RegularFileOnly && st.Mode&unix.S_IFMT != unix.S_IFREG {
		return fileErr(invalid("backing file %s is not a regular file, which Options.RegularFileOnly asks for", name))
	}
	return nil
}

// errSwitched reports a path whose file changed between its check and its
// open, where no /proc lets the file checked be opened itself.
var errSwitched error = explain("the path names another file than a moment ago", unix.ESTALE, nil)

// checkBackingFile checks the file open as fd, which a caller handed in
// (AttachFile, Configure, SetFD, ChangeFD), as openBackingFile checks a
// path: a regular file with data or a block device (a regular file only
// with RegularFileOnly), and a loop device only when it is bound. It costs
// an fstat, and an fstatfs for a regular file.
func checkBackingFile(fd uintptr, name string, o Options) error {
	st, err := fstat(fd)
	if err != nil {
		return fileErr(&os.PathError{Op: "stat", Path: name, Err: err})
	}
	if err := checkKind(int(fd), &st, name); err != nil {
		return err
	}
	if err := checkRegular(&st, name, o); err != nil {
		return err
	}
	return checkLoopBacking(fd, &st, name)
}

// checkKind refuses, from its fstat st, what cannot back a loop device:
// anything but a regular file or a block device, and a regular file of a
// file system that is the kernel's interface rather than storage (procfs,
// sysfs and their kin: a device bound read-write to a sysfs attribute
// writes to the kernel's controls). fd is the file's descriptor, O_PATH or
// not, for its fstatfs.
func checkKind(fd int, st *unix.Stat_t, name string) error {
	var kind string
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFBLK:
		return nil
	case unix.S_IFREG:
		var fs unix.Statfs_t
		if err := call.Retry(func() error { return unix.Fstatfs(fd, &fs) }); err != nil {
			return fileErr(&os.PathError{Op: "statfs", Path: name, Err: err})
		}
		fsName, ok := pseudoFS[uint32(fs.Type)]
		if !ok {
			return nil
		}
		return fileErr(invalid("backing file %s is a file of %s, which holds the kernel's interfaces, not data", name, fsName))
	case unix.S_IFDIR:
		kind = "a directory"
	case unix.S_IFIFO:
		kind = "a named pipe (FIFO)"
	case unix.S_IFCHR:
		kind = "a character device"
	case unix.S_IFSOCK:
		kind = "a socket"
	case unix.S_IFLNK:
		kind = "a symbolic link"
	default:
		kind = "a file of type " + strconv.FormatUint(uint64(st.Mode&unix.S_IFMT), 8)
	}
	return fileErr(invalid("backing file %s is %s; a loop device needs a regular file or a block device", name, kind))
}

// pseudoFS names the file systems, by statfs magic, whose regular files
// are the kernel's interfaces: a loop device reading or writing one would
// read state or write controls, not data.
var pseudoFS = map[uint32]string{
	unix.PROC_SUPER_MAGIC:    "procfs",
	unix.SYSFS_MAGIC:         "sysfs",
	unix.DEBUGFS_MAGIC:       "debugfs",
	unix.TRACEFS_MAGIC:       "tracefs",
	unix.SECURITYFS_MAGIC:    "securityfs",
	unix.CGROUP_SUPER_MAGIC:  "cgroupfs",
	unix.CGROUP2_SUPER_MAGIC: "cgroup2fs",
	configfsMagic:            "configfs",
	unix.EFIVARFS_MAGIC:      "efivarfs",
	unix.BPF_FS_MAGIC:        "bpffs",
	unix.PSTOREFS_MAGIC:      "pstore",
	unix.SELINUX_MAGIC:       "selinuxfs",
	unix.SMACK_MAGIC:         "smackfs",
	unix.BINFMTFS_MAGIC:      "binfmt_misc",
	fuseCtlMagic:             "fusectl",
	unix.NSFS_MAGIC:          "nsfs",
	unix.PID_FS_MAGIC:        "pidfs",
	unix.ANON_INODE_FS_MAGIC: "anon_inodefs",
}

// Magic numbers from linux/magic.h that golang.org/x/sys/unix lacks.
const (
	configfsMagic = 0x62656570
	fuseCtlMagic  = 0x65735543
)

// checkLoopBacking refuses a loop device with nothing bound to it as a
// backing file, which the kernel would refuse with an EINVAL that reads as
// the other device's fault. A bound one is fine: loop devices stack, and
// the kernel refuses a chain that leads back to the device being bound.
// fd is the file open for reading or writing, st its fstat.
func checkLoopBacking(fd uintptr, st *unix.Stat_t, name string) error {
	if st.Mode&unix.S_IFMT != unix.S_IFBLK || unix.Major(uint64(st.Rdev)) != loopMajor {
		return nil
	}
	var info unix.LoopInfo64
	if ioctlPtr(fdHandle(fd), reqGetStatus64, unsafe.Pointer(&info)) == unix.ENXIO {
		return fileErr(invalid("backing file %s is a loop device with no file bound to it", name))
	}
	return nil
}

// loopMajor is the block major number of the loop driver.
const loopMajor = 7

// fileErr marks err as the backing file's (see Error.Is).

// backingBlockSize returns the block size to bind the file open as fd
// with: o.BlockSize, unless it is BlockSizeAuto (see there), whose probe
// honours ctx: a read of a file on a file system that has stopped
// answering (an NFS server gone) is left to end in the background.
func backingBlockSize(ctx context.Context, fd uintptr, o Options) (uint32, error) {
	if o.BlockSize != BlockSizeAuto {
		return o.BlockSize, nil
	}
	st, err := fstat(fd)
	if err != nil {
		return 0, fileErr(&os.PathError{Op: "stat", Path: "the backing file", Err: err})
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFBLK:
		var size int32
		if err := ioctlPtr(fdHandle(fd), unix.BLKSSZGET, unsafe.Pointer(&size)); err != nil {
			return 0, fileErr(inStep("BLKSSZGET of the backing device", err))
		}
		return uint32(size), nil
	case unix.S_IFREG:
		buf := make([]byte, gptProbeSize)
		n, err := preadContext(ctx, fd, buf, int64(o.Offset))
		if err != nil {
			return 0, err
		}
		switch sizes := gptSectorSizes(buf[:n]); len(sizes) {
		case 0:
			return 0, nil // no GPT: the kernel's default
		case 1:
			return sizes[0], nil
		default:
			return 0, fileErr(invalid("the image holds GPT headers for %d- and %d-byte sectors: Options.BlockSize must say which", sizes[0], sizes[len(sizes)-1]))
		}
	}
	return 0, nil
}

// preadContext reads from the file open as fd at off into buf, as long as
// ctx allows: on a context that can end, the read is made on a descriptor
// of its own in a goroutine, which closes it when the read returns.
func preadContext(ctx context.Context, fd uintptr, buf []byte, off int64) (int, error) {
	read := func(fd int) (int, error) {
		var n int
		err := call.Retry(func() (err error) { n, err = unix.Pread(fd, buf, off); return err })
		if err != nil {
			return 0, fileErr(&os.PathError{Op: "read", Path: "the backing file", Err: err})
		}
		return n, nil
	}
	if ctx.Done() == nil {
		return read(int(fd))
	}
	dup, err := unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return 0, fileErr(&os.PathError{Op: "fcntl", Path: "the backing file", Err: err})
	}
	type result struct {
		n   int
		err error
	}
	done := make(chan result, 1)
	go func() {
		defer closeFD(dup)
		n, err := read(dup)
		done <- result{n, err}
	}()
	select {
	case r := <-done:
		return r.n, r.err
	case <-ctx.Done():
		return 0, ctx.Err()
	}
}

// reopenReadOnly returns a read-only descriptor of the file open as fd, and
// a function that releases it: fd itself when it is read-only already,
// otherwise a new open of /proc/self/fd/N.
func (s *system) reopenReadOnly(fd uintptr) (uintptr, func(), error) {
	fl, err := unix.FcntlInt(fd, unix.F_GETFL, 0)
	if err != nil {
		return 0, nil, err
	}
	if fl&unix.O_ACCMODE == unix.O_RDONLY {
		return fd, func() {}, nil
	}
	ro, err := openFD(s.procFD+strconv.Itoa(int(fd)), unix.O_RDONLY)
	if err != nil {
		return 0, nil, err
	}
	return uintptr(ro), func() { closeFD(ro) }, nil
}
