package loopctl

// MakeNode creates /dev/loopN, the node of loop device n, where it is
// missing (a container whose /dev is not devtmpfs), with the device
// number sysfs gives and mode 0660. A node of that device already there is
// left as it is; anything else at the path is an error matching
// [fs.ErrExist]. It needs CAP_MKNOD, and the container's device rules must
// allow the device. Nothing in this package makes a node unasked: see
// [Options.MakeNode].
func MakeNode(n int) error { return host.makeNode(n) }

// MakeNode creates the partition's node, p.Path, where it is missing, as
// [MakeNode] does for a device.
func (p Partition) MakeNode() error { return host.makePartitionNode(p) }
