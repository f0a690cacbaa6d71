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
// # Mounts and image builders
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
// # Untrusted paths
//
// Attach treats the path it is given as hostile. It first opens it with
// O_PATH, which runs no driver's open code and waits for nobody, checks
// what it is, and refuses with fs.ErrInvalid, naming what the path is, a
// directory, a named pipe, a character device, a socket, a regular file
// of procfs, sysfs or another of the kernel's interface file systems (a
// device bound read-write to a sysfs attribute would write to the
// kernel's controls), and a loop device with nothing bound to it. It then
// opens the file it checked through /proc/self/fd, even if the path was
// switched meanwhile. A path with a NUL byte, too long a path and a
// symbolic link loop match fs.ErrInvalid too. Such failures are the
// backing file's: the error says so, and matches no sentinel about loop
// devices (ErrBusy, ErrNotBound).
//
// A service that binds paths its users name, or that lie under directories
// they can write to, sets Options.NoSymlinks and Options.RegularFileOnly:
// the file Attach binds is then the one the path names without a symbolic
// link, and a regular file, checked on the descriptor it binds.
//
// The kernel binds what passes these checks even where the device will be
// of little use, as losetup does: a file, or the part of it past Offset,
// shorter than 512 bytes gives a device of 0 bytes (Status.Size), and one
// that is not a whole number of 512-byte sectors loses its tail. A file
// truncated or deleted after Attach opened it is bound as it is at the
// binding (Status.Deleted).
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
// ENXIO comes from a device between its detach and its last close (Linux
// 6.11 and later) and while LOOP_CTL_REMOVE deletes it; ENODEV and ENOENT
// from one removed; EBUSY and an exclusive flock from one that another
// process holds or bound. A node that is missing while the device exists
// (sysfs lists it: a container whose /dev is not devtmpfs) is no race,
// and fails at once with fs.ErrNotExist. A shared flock is no race
// either: it is udev probing the device after a change (LOCK_SH|LOCK_NB,
// for the milliseconds its probe takes). Attach waits for it, as systemd's
// tools do, while the context allows, and then binds the device it was
// named, as losetup would; a cancelled wait leaves a goroutine behind
// until the probe ends. Every other error (EACCES, EPERM, EINVAL, ENOMEM)
// fails at once. The control device is opened once per process and kept
// open.
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
// # Partitions
//
// A binding the package makes shows the partitions of its own image and
// no other, each added once. Kernels before 7.2 keep partitions added by
// hand (BLKPG: partx --add, addpart) after the detach, for the next
// binding of the device to show over another image: before it binds, the
// package deletes what a device still has, under the device's exclusive
// lock, as systemd does. A partition in use makes the device not free:
// Attach takes another, and Configure and SetFD fail with an error
// matching ErrBusy that names it. Deleting needs CAP_SYS_ADMIN: without
// it the error matches fs.ErrPermission, and nothing is bound.
//
// With FlagPartScan the kernel reads the table once a binding. From 5.15
// until its fix (7.1, and the stable updates that took it),
// LOOP_CONFIGURE marks the disk for a scan and announces the binding
// before its own scan; an open in between, udev's probe, scans first, and
// the kernel's scan then removes and adds every partition again, which
// stops systemd units bound to them. On those kernels the package binds
// without the flag and sets it with LOOP_SET_STATUS64, after an open of
// its own that runs the scan the mark asks for while it finds nothing;
// the second call freezes the device's queue, milliseconds more. When
// Attach or Configure returns, every partition of the table is in sysfs
// with its node. A device shared with Options.Reuse is not scanned again
// under its users, and Rescan of a device whose partition is in use
// names it. KERNELS.md has what each kernel does, RELIABILITY.md the
// races by kernel.
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
// The package github.com/loopctl/loopctl/uevent, which imports this one,
// reports what happens to loop devices (its Monitor reads the kernel's
// uevents, or polls sysfs in a rootless container), and waits until udev
// has processed a device's binding (uevent.WaitUdev), so that a program
// that binds an image and mounts it by label finds the link in place.
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
// The package works alike on the kernels users run, Linux 5.10 and later:
// where a kernel's answer differs (LOOP_CTL_ADD of any number before 5.14,
// detach at the last close from 6.11, direct I/O on tmpfs from 6.6, block
// sizes above the page size from 6.18), it gives the newer behaviour or an
// error that says why. The integration tests run on each in a virtual
// machine (internal/vmrun); KERNELS.md records what each kernel answers,
// as a test measures it there, and RELIABILITY.md ("Kernels") what the
// package does about it.
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
// reused descriptor number: each call holds a reference on the descriptor,
// and Close closes it at once, or when the last call in flight returns.
// Close is idempotent, and a closed Control or Device holds nothing.
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
