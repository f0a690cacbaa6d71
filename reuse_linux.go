//go:build !loopctl_stub

package loopctl

import (
	"math"
	"unsafe"

	"golang.org/x/sys/unix"
)

// sharedDevice looks, under the attach lock, for a device bound to the file
// open as fd with o's offset, size limit, read-only flag and block size,
// and returns it open, marked shared; nil when there is none. A device
// bound to an overlapping range of the file with other settings is an
// *OverlapError, unless an identical one is found.
//
// Each device's binding is read with LOOP_GET_STATUS64 on a read-only open
// of the device, which gives the backing file's device and inode at once:
// a third of the cost of reading one sysfs attribute, and no path to stat
// (or to find deleted). A device being torn down refuses the open and is
// passed over; one found is opened again, read-write, and its binding
// checked again before it is returned.
func sharedDevice(fd uintptr, o Options) (*Device, error) {
	st, err := fstat(fd)
	if err != nil {
		return nil, inStep("fstat", err)
	}
	want := binding{dev: uint64(st.Dev), ino: uint64(st.Ino), offset: o.Offset, sizeLimit: o.SizeLimit,
		readOnly: o.Flags&FlagReadOnly != 0 || readOnlyFD(fd), blockSize: max(o.BlockSize, 512)}
	nums, err := loopNumbers()
	if err != nil {
		return nil, err
	}
	var overlap *OverlapError
	for _, n := range nums {
		b, s, ok := probeDevice(n, want)
		if !ok {
			continue
		}
		if b == want {
			if d := openShared(n, want); d != nil {
				return d, nil
			}
			continue // torn down, or bound anew, since
		}
		if overlap == nil && b.overlaps(want) {
			overlap = &OverlapError{Device: DevicePath(n), Status: fullStatus(n, s)}
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

// probeDevice reads device n's binding through a read-only open of it. It
// reports false for a device bound to another file than want's, unbound,
// being torn down or removed, or closed to this process.
func probeDevice(n int, want binding) (binding, Status, bool) {
	h, err := sys.open(DevicePath(n), probe)
	if err != nil {
		return binding{}, Status{}, false
	}
	defer h.Close()
	return readBinding(h, want)
}

// fullStatus returns device n's Status, with the full backing path and the
// size, or else s.
func fullStatus(n int, s Status) Status {
	h, err := sys.open(DevicePath(n), probe)
	if err != nil {
		return s
	}
	d := &Device{h: h, number: n, path: DevicePath(n)}
	defer d.Close()
	if full, err := d.Status(); err == nil {
		return full
	}
	return s
}

// readBinding reads the binding of the device open as h, if it is of want's
// file.
func readBinding(h handle, want binding) (binding, Status, bool) {
	var info unix.LoopInfo64
	if ioctlPtr(h, reqGetStatus64, unsafe.Pointer(&info)) != nil || info.Device != want.dev || info.Inode != want.ino {
		return binding{}, Status{}, false
	}
	var blockSize int32
	if ioctlPtr(h, unix.BLKSSZGET, unsafe.Pointer(&blockSize)) != nil {
		return binding{}, Status{}, false
	}
	s := statusFromInfo(&info)
	s.BlockSize = uint32(blockSize)
	return binding{dev: info.Device, ino: info.Inode, offset: info.Offset, sizeLimit: info.Sizelimit,
		readOnly: info.Flags&unix.LO_FLAGS_READ_ONLY != 0, blockSize: s.BlockSize}, s, true
}

// openShared opens device n read-write and returns it if it still has the
// binding want, else nil.
func openShared(n int, want binding) *Device {
	d, err := OpenDevice(n)
	if err != nil {
		return nil
	}
	if b, _, ok := readBinding(d.h, want); !ok || b != want {
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
