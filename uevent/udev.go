package uevent

import (
	"context"

	"github.com/loopctl/loopctl"
)

// WaitUdev returns once udev has processed d's current binding, and each
// of its partitions: its event for the binding's disk sequence number has
// left udev, or udev's database shows the binding's by-diskseq link (where
// an entry cannot tell, udev is made to process the device again). The
// /dev/disk/by-* links and partition nodes are then in place. Before
// Linux 5.15 it waits for an entry of each and no event queued. With no
// udev running it returns at once. It listens to udev's messages (root's
// only) while ctx allows; when ctx ends first it fails with an error
// matching ctx's that names what udev has not processed. A closed d fails
// with an error matching [fs.ErrClosed].
func WaitUdev(ctx context.Context, d *loopctl.Device) error { return waitUdev(ctx, d) }
