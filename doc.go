// Package loopctl manages Linux loop devices: block devices that present a
// file as a disk.
//
// # Why /dev/loop-control
//
// Linux once made a fixed set of loop devices, /dev/loop0 to loop7. To find
// a free one a program opened each node in turn and asked it for its status,
// and two programs doing so at once could pick the same device. Since
// Linux 3.1 the kernel offers /dev/loop-control ("loop: add management
// interface for on-demand device allocation") with three requests:
// LOOP_CTL_GET_FREE returns a free device, allocating one when none is left;
// LOOP_CTL_ADD and LOOP_CTL_REMOVE create and delete a device by number.
// A program then opens /dev/loopN and binds a backing file to it, today in
// one LOOP_CONFIGURE call.
//
// # The package
//
// Attach is what most programs want: it binds a file to a free device, in
// a way that is safe against other processes doing the same, and returns
// the open Device.
//
//	d, err := loopctl.Attach(ctx, "disk.img", loopctl.Options{Flags: loopctl.FlagReadOnly})
//	if err != nil {
//		return err
//	}
//	defer d.Close()
//	// mount d.Path() ...
//
// Each attempt of Attach is LOOP_CTL_GET_FREE, an open of the device, a
// BSD flock(LOCK_EX) so that udev does not probe a half-set-up device, and
// one LOOP_CONFIGURE, all under flock(LOCK_EX) on /dev/loop-control, the
// lock systemd's tools take for the same steps. When another process got
// to the device first, Attach tries again with a fresh LOOP_CTL_GET_FREE,
// with bounded backoff that honours the context; it never clears a binding
// it did not make, and on failure it leaves nothing behind. Without
// /dev/loop-control it scans sysfs for an unbound device instead.
//
// With FlagAutoClear the kernel detaches the device when its last opener
// closes it. The Device that Attach returns is an opener, so the binding
// lasts until its Close, or until whoever else holds the device (a mount)
// lets go after that.
//
// # Mounts, image builders and untrusted paths
//
// A read-only binding is made and held through a read-only descriptor of
// the device, so that a kernel that refuses to mount a device with writers
// (CONFIG_BLK_DEV_WRITE_MOUNTED=n, or bdev_allow_write_mounted=0 since
// Linux 6.8) mounts it while the Device is open. Without CAP_SYS_ADMIN the
// kernel changes a device only through a descriptor open for writing: the
// methods that change one say so, and OpenDevice opens one.
//
// Options.Lock keeps the device locked, as udev understands the lock,
// from before the binding until Device.Lock changes it: an image builder
// writes its partition table and file systems before udev probes them
// (LockExclusive), or without udev re-reading the table under it
// (LockShared). BlockSizeAuto binds an image with the sector size its GPT
// was made for (a 4Kn image shows no partitions at 512-byte blocks).
//
// A service that binds paths its users name, or that lie under directories
// they can write to, sets Options.NoSymlinks and Options.RegularFileOnly:
// the file Attach binds is then the one the path names without a symbolic
// link, and a regular file, checked on the descriptor it binds.
//
// # Races, detach at last close, and crashes
//
// LOOP_CTL_GET_FREE names the lowest unbound device and reserves nothing,
// so every process that asks at the same moment is told the same number.
// Since Linux 6.11 a device also detaches at its last close rather than in
// LOOP_CLR_FD, and refuses opens with ENXIO meanwhile (see
// Device.ClearFD): a device named free can be bound and let go of by
// another process before it is opened. Attach treats exactly these as a
// lost race and asks again: ENXIO, ENODEV and ENOENT from the open (the
// device is being torn down, or was removed), EBUSY from the open, a flock
// of the device held exclusively elsewhere, and EBUSY from the bind; a
// node missing while the device exists is reported at once, not retried.
// A shared flock is udev probing the device, which Attach waits for.
// Attach's documentation says why each is what it is.
//
// The lock on /dev/loop-control makes the races rare: attachers that take
// it (this package, systemd, losetup run under flock(1)) never chase one
// number at once, and in a process attachers take turns, so that
// goroutines do not all chase it either. It costs some throughput within
// one process and buys fairness between processes; RELIABILITY.md has the
// figures, and the churn, interference and kill tests behind these
// guarantees.
//
// List and FindByBackingFile leave out a device being torn down, and
// OpenDevice of one fails with an error matching ErrNotBound that says so.
//
// A process that dies, even killed inside Attach, loses its descriptors
// and its locks: with FlagAutoClear its devices detach, without it a
// device it had bound stays bound to the file, for FindByBackingFile to
// find. No device is left locked or unusable.
//
// With Options.Reuse many users of one image share one device, as
// container runtimes want for a read-only root image, and a binding that
// overlaps another of the same file with other settings (a corruption in
// waiting) is refused with ErrOverlap. Device.Partitions lists what the
// kernel found in a partition table (FlagPartScan), Device.Rescan has it
// read again.
//
// # In a container
//
// A container's /dev is usually a tmpfs, not devtmpfs: the kernel makes no
// /dev/loopN there, and a container given only /dev/loop-control finds
// that LOOP_CTL_GET_FREE names devices it cannot open. Attach then fails
// at once with a *NodeMissingError, which carries the device's number;
// with Options.MakeNode it makes the node (and, with FlagPartScan, the
// partitions' nodes) from the numbers sysfs gives, which needs CAP_MKNOD
// and device rules allowing block devices 7:* and 259:*. In a user
// namespace no device node can be made, and the error says so. MakeNode
// and Partition.MakeNode make a node by hand.
//
// A backing file's path (Status.BackingFile) is the one the kernel
// resolves in the mount namespace the file was opened in, the binder's:
// a file bound inside a container from a directory bind-mounted at
// /example reads as /example/..., from the host too, and a host's binding
// may name a path a container cannot reach. FindByBackingFile matches by
// device and inode, not by path, so it finds a binding from either side.
// That takes the devices' nodes: where they are missing, List and
// FindByBackingFile read sysfs, which gives no inode, and take the
// backing file's device and inode from a stat of its path in this
// process's mount namespace, so that a binding made in another is missed,
// or, where another file has that path here, taken for that file's.
//
// # Bindings, not numbers
//
// A device number is reused as soon as the device is free, so a number
// alone names no binding: a Status from List, or "loop7" kept in a state
// file across a restart, may name somebody else's image by the time it is
// used. Since Linux 5.15 the kernel gives each binding a disk sequence
// number (Status.DiskSeq, Device.DiskSeq), raised at every bind and
// unbind and never reused while the machine runs: a (number, diskseq) pair
// names one binding. OpenBinding opens a device and then checks that it is
// still the binding a Status described, which it then stays while open
// (another process's detach waits for the last close); without disk
// sequence numbers it compares the backing file, offset and size limit.
// So List, OpenBinding and ClearFD never detach another's binding.
//
// Options.Ref writes an owner reference into the device's lo_file_name,
// as systemd and losetup --loop-ref do; FindByRef finds those bindings,
// and Sweep, for a runtime starting after a crash, detaches every binding
// of its reference through OpenBinding, and no other. Device.Detach
// returns once the kernel has let go of the backing file, waiting, while
// its context allows, for another opener (a mount, udev's probe) to close
// the device; when the context ends first it says what holds the device.
// A detach never breaks another opener's I/O: it waits for its close.
//
// # Watching devices, and waiting for udev
//
// A Monitor (OpenMonitor, Next) reports loop devices added and removed,
// bound and unbound, resized, and their partitions, from the kernel's
// uevents: bound and unbound are checked against the kernel, and each
// binding is told apart by its disk sequence number, so that bindings
// made and gone before Next reads them are still reported, each once and
// in order. Only the kernel's messages are read; events the kernel had to
// drop are reported as EventLost, which tells the caller to List again.
// Where kernel uevents cannot arrive, in a network namespace of another
// user namespace (a rootless container), the Monitor polls sysfs
// (Polling, SetPollInterval).
//
// udev, which every distribution runs, probes each device that changes
// and only then makes /dev/disk/by-label and the other links. A program
// that binds an image and mounts it by label waits for it: WaitUdev
// returns once udev has processed the device's current binding, where
// `udevadm settle` waits for every device of the machine; with no udev
// running it returns at once.
//
// For the lower level, a Control is the open /dev/loop-control (Add,
// Remove, GetFree), and a Device is an open /dev/loopN: SetFD and
// Configure bind a file, ClearFD unbinds it, Status reports the binding,
// and SetStatus, SetCapacity, SetBlockSize, SetDirectIO and ChangeFD
// change a bound device. List and FindByBackingFile report every bound
// device, as `losetup --list` and `losetup -j` do: where the process may
// open the devices, from a read-only open of each and the backing file's
// path in sysfs; otherwise from sysfs alone.
//
// On kernels before 5.8, which lack LOOP_CONFIGURE, Configure (and so
// Attach) falls back to LOOP_SET_FD, LOOP_SET_STATUS64,
// LOOP_SET_BLOCK_SIZE and LOOP_SET_DIRECT_IO, clearing its own binding if
// a later step fails. The kernel's answer decides, once per process.
//
// # Kernels
//
// The integration tests run on the project's own kernel (6.18) and, in
// virtual machines (internal/vmrun), on Debian's 5.10, 6.1 and 6.12 and
// the newest kernel Debian serves (7.3 on 2026-11-28, from
// trixie-backports), with /tmp on tmpfs and on ext4. What they found to
// differ, and what the package does about it:
//
//	                                    5.10     6.1      6.12     6.18     7.3
//	LOOP_CTL_ADD -1, an unbound device  EEXIST   new      new      new      new       Add picks a number itself
//	LOOP_CTL_ADD 1<<20                  taken    EINVAL   EINVAL   EINVAL   EINVAL    refused in Go
//	LOOP_CTL_REMOVE -1                  removes  EINVAL   EINVAL   EINVAL   EINVAL    refused in Go
//	LOOP_CLR_FD by the only opener      detach   detach   at close at close at close  see Device.ClearFD
//	direct I/O on tmpfs                 off      off      on       on       on        ErrNoDirectIO, not a silent success
//	block size above the page size      EINVAL   EINVAL   EINVAL   64 KiB   64 KiB    the error says why
//	LOOP_SET_BLOCK_SIZE, held exclusive changed  EBUSY    EBUSY    EBUSY    EBUSY     the error says why (ErrBusy)
//	LOOP_SET_STATUS64, held exclusive   changed  changed  changed  changed  changed   the error would say why
//	MBR and GPT parsers                 yes      yes      yes      no       yes       (Debian's builds; the project's own)
//
// "taken": 5.10 makes a device whose number overflows into another major's;
// "removes": 5.10 removes whichever unbound device it finds first. "off":
// the kernel binds without direct I/O and reports success; a bind with
// FlagDirectIO then fails instead, with its own binding cleared, and one
// with PreferDirectIO is buffered, as it is on every kernel where the
// offset is not aligned to the file system's blocks. "held
// exclusive": while a file system is mounted on the device, or it is open
// with O_EXCL; upstream refuses LOOP_SET_BLOCK_SIZE then since 6.17, and
// Debian's 6.1 and 6.12 took that change, while LOOP_SET_STATUS64, said
// to follow in 6.19, still changes the device on 7.3.
//
// # Errors
//
// Every failure of an ioctl, and every input refused before one, is an
// *Error naming the operation and the device. The kernel's errno stays
// reachable (errors.Is(err, unix.EBUSY)) and maps onto portable sentinels:
// fs.ErrExist, fs.ErrNotExist, fs.ErrPermission, fs.ErrInvalid, ErrBusy,
// ErrNotBound, errors.ErrUnsupported; calls after Close match fs.ErrClosed,
// and a binding that is no longer the one a Status described matches
// ErrChanged (OpenBinding). An open of a node that fails is an *Error too
// (op "open"), whose errno maps alike.
//
// # Concurrency and descriptors
//
// Control and Device are safe for concurrent use. Every descriptor is
// opened with O_CLOEXEC, and a concurrent Close can never send a call to a
// reused descriptor number: a Device's calls hold a reference on its
// descriptor, and a Control's Close puts an eventfd in its descriptor's
// place, which is closed once the Control is unreachable. Close is
// idempotent.
//
// Besides the descriptors of the Controls and Devices it returns, the
// package holds one of its own: the control device that Attach shares.
// Lookups (List, FindByBackingFile, FindByRef, Options.Reuse, Sweep) hold
// nothing between calls, and during one at most two descriptors a reading
// goroutine: a process's file table grows only by waiting for an RCU grace
// period, and its file limit is the caller's.
//
// On systems other than Linux the package builds, and every call returns
// an error matching errors.ErrUnsupported.
package loopctl
