// Package loopctl manages Linux loop devices: block devices that present a
// file as a disk.
//
// A [Control] is the open /dev/loop-control, which creates, deletes and
// names free devices ([Control.Add], [Control.Remove], [Control.GetFree]).
// A [Device] is an open /dev/loopN: [Device.Configure] and [Device.SetFD]
// bind a file to it, [Device.ClearFD] unbinds it, [Device.Status] reports
// the binding. [List], [FindByBackingFile] and [FindByRef] report bound
// devices, as losetup --list does, and hold nothing between calls.
//
// # Attach
//
// [Attach] is what most programs want: it binds a file to a free device,
// safely against other processes doing the same, and returns the open
// Device.
//
//	d, err := loopctl.Attach(ctx, "disk.img", loopctl.Options{Flags: loopctl.FlagReadOnly})
//	if err != nil {
//		return err
//	}
//	defer d.Close()
//	// mount d.Path() ...
//
// Attach returns the caller's binding or an error: it retries only races
// lost to other attachers (within ctx), never clears or changes a binding
// it did not make, and leaves nothing behind when it fails. It takes the
// locks systemd's tools and udev understand. The path it is given is
// treated as hostile: what cannot be bound is refused before any device is
// touched, and the error names the file, not a loop device. A number alone
// names no binding once the device is free again: [OpenBinding] and
// [Status.DiskSeq] name one.
//
// # Errors
//
// Every failure of a call, and every input refused before one, is an
// [*Error] naming the operation, the device and, where it is the cause,
// the backing file. The kernel's errno stays reachable
// (errors.Is(err, unix.EBUSY)) and maps onto these sentinels:
//
//	fs.ErrNotExist           no such device or node; see also *NodeMissingError
//	fs.ErrExist              the device number is taken (Control.Add)
//	fs.ErrPermission         the caller lacks the capability or the node's group
//	fs.ErrInvalid            bad input, or a file that cannot be bound
//	fs.ErrClosed             the Control or Device was closed
//	ErrBusy                  the device or one of its partitions is in use
//	ErrNotBound              the device has no file bound
//	ErrChanged               the binding is no longer the one a Status described
//	ErrOverlap               an overlapping binding of the file; see *OverlapError
//	ErrNotLoop               the path is not a loop device
//	ErrNoDirectIO            the backing file does not allow direct I/O
//	errors.ErrUnsupported    the kernel or system lacks the call
//
// # Concurrency and descriptors
//
// Control and Device are safe for concurrent use. Every descriptor is
// opened with O_CLOEXEC; a concurrent Close never sends a call to a reused
// descriptor number, and Close is idempotent. Besides the descriptors of
// the Controls and Devices it returns, the package holds one of its own:
// the control device that Attach shares. Lookups open, read and close.
//
// # Kernels
//
// The package works alike on Linux 5.10 and later: where a kernel's answer
// differs, it gives the newer behaviour or an error that says why, and
// learns each answer once per process. On other systems it builds, and
// every call returns an error matching errors.ErrUnsupported.
//
// RELIABILITY.md in the source tree has the reasoning behind these
// contracts (each race, each kernel difference, the hostile paths, the
// lock protocol, containers) and the figures of the tests that hold them;
// KERNELS.md has what each kernel answers.
package loopctl
