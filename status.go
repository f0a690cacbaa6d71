package loopctl

import "strings"

// Status describes a bound loop device.
type Status struct {
	Number                      int
	BackingFile                 string // full path, from sysfs, as seen in the binder's mount namespace (RELIABILITY.md, "In a container"); where sysfs is missing, lo_file_name: the path's first 63 bytes, or the binder's Ref
	BackingDevice, BackingInode uint64 // st_dev and st_ino of the backing file
	Offset, SizeLimit           uint64
	Flags                       Flags
	BlockSize                   uint32 // logical block size in bytes: losetup's LOG-SEC
	Size                        uint64 // in bytes: the file's size less Offset, at most SizeLimit, in whole 512-byte sectors

	// DiskSeq is the device's disk sequence number, which the kernel
	// raises at every bind and unbind of a loop device (and at
	// LOOP_CHANGE_FD), unique while the machine runs: with Number it
	// names this one binding, where a number alone is reused as soon as
	// the device is free (see OpenBinding). 0 on kernels before 5.15,
	// which have none.
	DiskSeq uint64

	// Ref is the device's lo_file_name, verbatim: the owner reference
	// the binder gave (Options.Ref, losetup --loop-ref), or, for a
	// device bound without one, the first 63 bytes of the backing
	// file's path, which loopctl and losetup write there. Empty where
	// it was read from sysfs, which does not show it (List and
	// FindByBackingFile without the right to open the devices).
	Ref string
}

// A Partition is a partition of a loop device: one the kernel found in the
// device's partition table ([FlagPartScan]), or was given with BLKPG.
type Partition struct {
	Number      int    // M of /dev/loopNpM
	Path        string // /dev/loopNpM
	Start, Size uint64 // in bytes, Start from the start of the device
}

// deletedSuffix is what the kernel appends to the path of an unlinked file.
const deletedSuffix = " (deleted)"

// Deleted reports whether the backing file has been unlinked since it was
// bound; BackingFile then ends in " (deleted)", as the kernel shows it.
func (s Status) Deleted() bool { return strings.HasSuffix(s.BackingFile, deletedSuffix) }
