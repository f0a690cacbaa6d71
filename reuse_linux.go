//go:build !loopctl_stub

package loopctl

import (
	"math"

	"golang.org/x/sys/unix"
)

// sharedDevice looks, under the attach lock, for a device bound to the file
// open as fd with o's offset, size limit, read-only flag and block size,
// and returns it open, marked shared; nil when there is none. A device
// bound to an overlapping range of the file with other settings is an
// *OverlapError, unless an identical one is found.
//
// Each device is read as List reads it (readDevices): LOOP_GET_STATUS64 on
// a read-only open gives the backing file's device and inode at once, and
// a device of another file goes no further. A device being torn down
// refuses the open and is passed over; a device that cannot be read
// (EMFILE, say) fails the look, which cannot then tell that no device is
// to be shared.
// One found is opened again, read-write, and its binding checked again
// before it is returned.
func sharedDevice(fd uintptr, o Options) (*Device, error) {
	st, err := fstat(fd)
	if err != nil {
		return nil, inStep("fstat", err)
	}
	id := backingFileID{dev: uint64(st.Dev), ino: uint64(st.Ino)}
	want := binding{dev: id.dev, ino: id.ino, offset: o.Offset, sizeLimit: o.SizeLimit,
		readOnly: o.Flags&FlagReadOnly != 0 || readOnlyFD(fd), blockSize: max(o.BlockSize, 512)}
	found, err := readDevices(&match{file: id, byFile: true})
	if err != nil {
		return nil, err
	}
	var overlap *OverlapError
	for _, s := range found {
		b := bindingOf(s)
		if b == want {
			if d := openShared(s, want, o.MakeNode); d != nil {
				return d, nil
			}
			continue // torn down, or bound anew, since
		}
		if overlap == nil && b.overlaps(want) {
			overlap = &OverlapError{Device: DevicePath(s.Number), Status: s}
		}
	}
	if overlap != nil {
		return nil, overlap
	}
	return nil, nil
}

// A binding is what Reuse compares of two devices.
type binding struct {
	dev, ino          uint64
	offset, sizeLimit uint64
	readOnly          bool
	blockSize         uint32
}

// bindingOf is the binding a Status describes.
func bindingOf(s Status) binding {
	return binding{dev: s.BackingDevice, ino: s.BackingInode, offset: s.Offset, sizeLimit: s.SizeLimit,
		readOnly: s.Flags&FlagReadOnly != 0, blockSize: s.BlockSize}
}

// overlaps reports whether two bindings of one file share a byte. A size
// limit of 0 reaches to the end of the file, however far it grows.
func (b binding) overlaps(c binding) bool {
	end := func(x binding) uint64 {
		if x.sizeLimit == 0 || x.offset > math.MaxUint64-x.sizeLimit {
			return math.MaxUint64
		}
		return x.offset + x.sizeLimit
	}
	return b.offset < end(c) && c.offset < end(b)
}

// openShared opens the device of binding s read-write and returns it if
// it still is that binding (OpenBinding), with the settings want, else
// nil. With makeNode it first makes the device's node if it is missing
// (a container's /dev), as Attach would for a device it binds.
func openShared(s Status, want binding, makeNode bool) *Device {
	if makeNode {
		MakeNode(s.Number) // if it fails, so does the open
	}
	d, err := OpenBinding(s)
	if err != nil {
		return nil
	}
	if s, err := d.Status(); err != nil || bindingOf(s) != want {
		d.Close()
		return nil
	}
	d.shared = true
	return d
}

// readOnlyFD reports whether fd is open read-only: a device bound to it
// without FlagReadOnly is read-only all the same.
func readOnlyFD(fd uintptr) bool {
	fl, err := unix.FcntlInt(fd, unix.F_GETFL, 0)
	return err == nil && fl&unix.O_ACCMODE == unix.O_RDONLY
}
