package loopctl

import (
	"math"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// sharedDevice looks, under the attach lock, for a device bound to the file
// open as fd (name, as the caller gave it) as o would bind it, and returns
// it open, marked shared, and locked as o asks; nil when there is none. A
// device bound to an overlapping range of the file otherwise is an
// *OverlapError naming the difference, unless one bound as o would bind it
// is found.
//
// Each device is read as List reads it (readDevices): LOOP_GET_STATUS64 on
// a read-only open gives the backing file's device and inode at once, and
// a device of another file goes no further. A device being torn down
// refuses the open and is passed over; a device that cannot be read
// (EMFILE, say) fails the look, which cannot then tell that no device is
// to be shared. One found is opened again (OpenBinding) and its binding
// checked again before it is returned.
func (s *system) sharedDevice(fd uintptr, name string, o Options) (*Device, error) {
	st, err := fstat(fd)
	if err != nil {
		return nil, inStep("fstat", err)
	}
	want := wantBinding{file: backingFileID{dev: uint64(st.Dev), ino: uint64(st.Ino)}, o: o, name: name}
	found, err := s.readDevices(&match{file: want.file, byFile: true})
	if err != nil {
		return nil, err
	}
	var overlap *OverlapError
	for _, b := range found {
		if !want.overlaps(b) {
			continue
		}
		diff := want.diff(b)
		if diff == "" {
			d, err := s.openShared(b, want)
			if d != nil || err != nil {
				return d, err
			}
			continue // torn down, or bound anew, since
		}
		if overlap == nil {
			overlap = &OverlapError{Device: DevicePath(b.Number), Status: b, Differs: diff}
		}
	}
	if overlap != nil {
		return nil, overlap
	}
	return nil, nil
}

// A wantBinding is the binding Attach with Reuse would make of a file.
type wantBinding struct {
	file backingFileID
	o    Options // BlockSize resolved (not BlockSizeAuto); FlagReadOnly also for a file open read-only
	name string  // the file's name, as the caller gave it
}

// overlaps reports whether a binding of the file with Offset and
// SizeLimit as s's shares a byte with the one wanted. A size limit of 0
// reaches to the end of the file, however far it grows.
func (w wantBinding) overlaps(s Status) bool {
	end := func(offset, sizeLimit uint64) uint64 {
		if sizeLimit == 0 || offset > math.MaxUint64-sizeLimit {
			return math.MaxUint64
		}
		return offset + sizeLimit
	}
	return w.o.Offset < end(s.Offset, s.SizeLimit) && s.Offset < end(w.o.Offset, w.o.SizeLimit)
}

// diff says how the binding s differs from the one wanted, "" where it
// does not: in what the caller asked for, range, flags (direct I/O as the
// kernel gave it), owner reference and block size, but not in what the
// caller left unsaid: direct I/O with PreferDirectIO, the block size with
// BlockSize 0.
func (w wantBinding) diff(s Status) string {
	var d []string
	differ := func(what string, asked, has any) {
		d = append(d, what+" "+fmtAny(has)+", asked "+fmtAny(asked))
	}
	if s.Offset != w.o.Offset || s.SizeLimit != w.o.SizeLimit {
		d = append(d, "another range")
	}
	flag := func(f Flags, name string, asked bool) {
		if has := s.Flags&f != 0; has != asked {
			differ(name, asked, has)
		}
	}
	flag(FlagReadOnly, "read-only", w.o.Flags&FlagReadOnly != 0) // asked, or the file open read-only
	flag(FlagAutoClear, "autoclear", w.o.Flags&FlagAutoClear != 0)
	flag(FlagPartScan, "partscan", w.o.Flags&FlagPartScan != 0)
	if w.o.Flags&FlagDirectIO != 0 || !w.o.PreferDirectIO {
		flag(FlagDirectIO, "direct I/O", w.o.Flags&FlagDirectIO != 0)
	}
	if w.o.BlockSize != 0 && s.BlockSize != w.o.BlockSize {
		differ("block size", w.o.BlockSize, s.BlockSize)
	}
	if ref := w.o.Ref; ref != "" {
		if s.Ref != ref {
			d = append(d, "owner reference "+strconv.Quote(s.Ref)+", asked "+strconv.Quote(ref))
		}
	} else if !namesFile(s, w.name) {
		d = append(d, "owner reference "+strconv.Quote(s.Ref)+", asked none")
	}
	return strings.Join(d, "; ")
}

// namesFile tells whether the lo_file_name of binding s is a file's name,
// as a binder that gave no owner reference writes (loopctl, losetup): the
// start of the backing file's path now, or of name, the caller's. Any
// other is an owner reference: another owner's binding.
func namesFile(s Status, name string) bool {
	prefix := func(p string) string { return p[:min(len(p), unix.LO_NAME_SIZE-1)] }
	return s.Ref == "" || s.Ref == prefix(s.BackingFile) || s.Ref == prefix(name)
}

// fmtAny formats a flag or a number of diff.
func fmtAny(v any) string {
	switch v := v.(type) {
	case bool:
		if v {
			return "on"
		}
		return "off"
	case uint32:
		return strconv.FormatUint(uint64(v), 10)
	}
	return "?"
}

// openShared opens the device of binding s if it still is that binding
// (OpenBinding), bound as want asks, and locks it as want asks without
// waiting; nil, and no error, when it is bound otherwise now. With
// MakeNode it first makes the device's node if it is missing (a
// container's /dev), as Attach would for a device it binds. A lock
// another process holds is an error matching ErrBusy.
func (s *system) openShared(st Status, want wantBinding) (*Device, error) {
	if want.o.MakeNode {
		s.makeNode(st.Number) // if it fails, so does the open
	}
	d, err := s.openBinding(st)
	if err != nil {
		return nil, nil
	}
	if s, err := d.Status(); err != nil || (backingFileID{s.BackingDevice, s.BackingInode}) != want.file || want.diff(s) != "" {
		d.Close()
		return nil, nil
	}
	if want.o.Lock != LockNone {
		if err := d.Lock(want.o.Lock); err != nil {
			d.Close()
			return nil, err
		}
	}
	d.shared = true
	return d, nil
}

// readOnlyFD reports whether fd is open read-only: a device bound to it
// without FlagReadOnly is read-only all the same.
func readOnlyFD(fd uintptr) bool {
	fl, err := unix.FcntlInt(fd, unix.F_GETFL, 0)
	return err == nil && fl&unix.O_ACCMODE == unix.O_RDONLY
}
