package loopctl

// List returns the status of every bound loop device, by number. Where
// this process may open the devices (root, or the disk group), it asks
// each bound one on a read-only open; otherwise it reads sysfs alone, which
// needs no privilege, and takes BackingDevice and BackingInode from a stat
// of the path. A device being detached is left out (from sysfs alone, it
// shows until its teardown ends). A process out of descriptors (EMFILE) gets
// an error that says so, never an answer read another way. List holds
// nothing between calls, and at most two descriptors a reading goroutine
// while it runs.
func List() ([]Status, error) { return host.list(nil) }

// FindByBackingFile returns the status of every bound loop device whose
// backing file is the file at path: the same device and inode, whatever
// name it was bound by. It reads what [List] reads.
func FindByBackingFile(path string) ([]Status, error) { return host.findByBackingFile(path) }

// FindByRef returns the status of every bound loop device whose owner
// reference is ref ([Options.Ref]). The reference is only in the device:
// FindByRef needs the right to open the devices, and without it fails with
// an error matching [fs.ErrPermission].
func FindByRef(ref string) ([]Status, error) { return host.findByRef(ref) }
