package uevent

import (
	"context"

	"github.com/loopctl/loopctl"
)

// WaitUdev returns once udev has processed the device's current binding:
// its event for the binding's disk sequence number has left udev, or
// udev's database entry shows the binding's (the disk/by-diskseq/N link
// udev's rules make), for the device and for each of its partitions. The
// /dev/disk/by-* links and partition nodes are then in place. Where an
// entry cannot tell (no such link: a partition outside any partition
// table has none), WaitUdev has udev process the device again, as
// `udevadm trigger` does, and waits for that. With no udev running (no
// /run/udev/control, as in most containers) it returns at once: nothing
// will make the links.
//
// Before Linux 5.15, which numbers no binding, it returns once udev has an
// entry for the device and each partition and no event queued: what
// `udevadm settle` waits for, but for the device alone.
//
// It listens to udev's messages (only those of root, uid 0, which udev
// runs as) while ctx allows; when ctx ends first it fails with an error
// matching ctx's that names what udev has not processed.
//
// d must be open: the binding waited for is the one it holds. A closed
// Device fails with an error matching fs.ErrClosed.
func WaitUdev(ctx context.Context, d *loopctl.Device) error { return waitUdev(ctx, d) }
