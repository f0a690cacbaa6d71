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
// A Control is the open /dev/loop-control: Add, Remove and GetFree. A
// Device is an open /dev/loopN: SetFD and Configure bind a file, ClearFD
// unbinds it, Status reports the binding.
//
//	c, err := loopctl.Open()
//	if err != nil {
//		return err
//	}
//	defer c.Close()
//	n, err := c.GetFree()
//	...
//	d, err := loopctl.OpenDevice(n)
//	...
//	err = d.Configure(file, loopctl.Options{Flags: loopctl.FlagReadOnly})
//
// Between GetFree and Configure another process may take the device;
// Configure then fails with an error matching ErrBusy and the caller asks
// GetFree again.
//
// # Errors
//
// Every failure of an ioctl, and every input refused before one, is an
// *Error naming the operation and the device. The kernel's errno stays
// reachable (errors.Is(err, unix.EBUSY)) and maps onto portable sentinels:
// fs.ErrExist, fs.ErrNotExist, fs.ErrPermission, fs.ErrInvalid, ErrBusy,
// ErrNotBound, errors.ErrUnsupported; calls after Close match fs.ErrClosed.
// Opening a node keeps the *os.PathError of the open.
//
// # Concurrency and descriptors
//
// Control and Device are safe for concurrent use. Every descriptor is
// opened with O_CLOEXEC, and every ioctl runs through the file's RawConn,
// so a concurrent Close can never send a call to a reused descriptor
// number. Close is idempotent.
//
// On systems other than Linux the package builds, and every call returns
// an error matching errors.ErrUnsupported.
package loopctl
