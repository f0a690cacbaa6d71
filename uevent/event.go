package uevent

import (
	"bytes"
	"encoding/binary"
	"strconv"

	"github.com/loopctl/loopctl"
	"github.com/loopctl/loopctl/internal/sysfs"
)

// An EventKind says what happened to a loop device.
type EventKind int

// The kinds of Event. Bound and unbound are what the device is after the
// event, read from the kernel, not guessed from the event's words.
const (
	EventAdded            EventKind = iota + 1 // the device was created (LOOP_CTL_ADD, LOOP_CTL_GET_FREE)
	EventRemoved                               // the device was deleted (LOOP_CTL_REMOVE)
	EventBound                                 // a file was bound to it
	EventUnbound                               // its binding went
	EventResized                               // its size changed (LOOP_SET_CAPACITY, SetStatus)
	EventPartitionAdded                        // a partition of it appeared
	EventPartitionRemoved                      // a partition of it went
	EventLost                                  // events were lost: rescan with loopctl.List
)

var eventKindNames = [...]string{
	EventAdded: "added", EventRemoved: "removed", EventBound: "bound", EventUnbound: "unbound",
	EventResized: "resized", EventPartitionAdded: "partition added", EventPartitionRemoved: "partition removed",
	EventLost: "lost",
}

// String names the kind, such as "bound".
func (k EventKind) String() string {
	if k > 0 && int(k) < len(eventKindNames) {
		return eventKindNames[k]
	}
	return "EventKind(" + strconv.Itoa(int(k)) + ")"
}

// An Event is a change of a loop device that a Monitor saw.
type Event struct {
	Kind      EventKind
	Number    int    // the device's number N of /dev/loopN; -1 for EventLost
	Partition int    // M of /dev/loopNpM; 0 for the whole device
	DiskSeq   uint64 // the binding's (or device's) disk sequence number; 0 before Linux 5.15
	Seq       uint64 // the kernel's uevent sequence number (SEQNUM); 0 when polling
}

// A uevent is what a kernel uevent says of a loop device, parsed.
type uevent struct {
	action      string // add, remove, change
	number      int    // N of loopN
	partition   int    // M of loopNpM, 0 for the disk
	diskSeq     uint64
	seq         uint64
	resize      bool // RESIZE=1
	mediaChange bool // DISK_MEDIA_CHANGE=1
	synthetic   bool // SYNTH_UUID: written to the device's uevent file, by udev or udevadm trigger
}

// loopDevpath is where loop devices are in the kernel's device tree.
const loopDevpath = "/devices/virtual/block/loop"

// parseUevent parses a kernel uevent, "ACTION@DEVPATH" and then
// "KEY=VALUE" strings, each ended by a NUL, and reports whether it is one
// of a loop device or of one of its partitions. It reads the device and
// partition numbers from DEVPATH, and checks them against SUBSYSTEM,
// DEVTYPE and PARTN.
func parseUevent(b []byte) (uevent, bool) {
	var e uevent
	head, rest, _ := bytes.Cut(b, []byte{0})
	action, devpath, ok := bytes.Cut(head, []byte{'@'})
	if !ok {
		return e, false
	}
	e.action = string(action)
	switch e.action {
	case "add", "remove", "change":
	default:
		return e, false
	}
	name, ok := bytes.CutPrefix(devpath, []byte(loopDevpath))
	if !ok {
		return e, false
	}
	disk, part, hasPart := bytes.Cut(name, []byte("/loop"))
	n, ok := eventNumber(disk)
	if !ok {
		return e, false
	}
	e.number = n
	if hasPart {
		// loopNpM: the disk's name again, then "p" and M.
		m, ok := bytes.CutPrefix(part, append(append([]byte(nil), disk...), 'p'))
		if !ok {
			return e, false
		}
		if e.partition, ok = eventNumber(m); !ok || e.partition == 0 {
			return e, false
		}
	}
	var subsystem, devtype, partn []byte
	for len(rest) > 0 {
		var kv []byte
		kv, rest, _ = bytes.Cut(rest, []byte{0})
		k, v, _ := bytes.Cut(kv, []byte{'='})
		switch string(k) {
		case "SUBSYSTEM":
			subsystem = v
		case "DEVTYPE":
			devtype = v
		case "PARTN":
			partn = v
		case "SEQNUM":
			e.seq, _ = strconv.ParseUint(string(v), 10, 64)
		case "DISKSEQ":
			e.diskSeq, _ = strconv.ParseUint(string(v), 10, 64)
		case "RESIZE":
			e.resize = string(v) == "1"
		case "DISK_MEDIA_CHANGE":
			e.mediaChange = string(v) == "1"
		case "SYNTH_UUID":
			e.synthetic = true
		}
	}
	if string(subsystem) != "block" {
		return e, false
	}
	switch {
	case e.partition == 0 && string(devtype) != "disk":
		return e, false
	case e.partition != 0 && (string(devtype) != "partition" || partn != nil && string(partn) != strconv.Itoa(e.partition)):
		return e, false
	}
	return e, true
}

// eventNumber parses a device or partition number as the kernel writes
// it (sysfs.Number), up to loopctl.MaxNumber.
func eventNumber(b []byte) (int, bool) {
	n, ok := sysfs.Number(string(b))
	return n, ok && n <= loopctl.MaxNumber
}

// parseUdevMessage reads a message udev sent to its group: the
// "libudev" header, then the event's properties, NUL-separated, at the
// offset the header gives. It returns DEVPATH and DISKSEQ.
func parseUdevMessage(b []byte) (devpath string, diskSeq uint64, ok bool) {
	const headerSize = 40
	if len(b) < headerSize || !bytes.HasPrefix(b, []byte("libudev\x00")) ||
		binary.BigEndian.Uint32(b[8:12]) != 0xfeedcafe {
		return "", 0, false
	}
	off, length := binary.NativeEndian.Uint32(b[16:20]), binary.NativeEndian.Uint32(b[20:24])
	if uint64(off)+uint64(length) > uint64(len(b)) || off < headerSize {
		return "", 0, false
	}
	for _, kv := range bytes.Split(b[off:off+length], []byte{0}) {
		k, v, _ := bytes.Cut(kv, []byte{'='})
		switch string(k) {
		case "DEVPATH":
			devpath = string(v)
		case "DISKSEQ":
			diskSeq, _ = strconv.ParseUint(string(v), 10, 64)
		}
	}
	return devpath, diskSeq, devpath != ""
}
