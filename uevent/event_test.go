package uevent

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"strings"
	"testing"

	"github.com/loopctl/loopctl"
)

// ueventBytes is a kernel uevent as the kernel writes it.
func ueventBytes(head string, env ...string) []byte {
	return []byte(head + "\x00" + strings.Join(env, "\x00") + "\x00")
}

func TestParseUevent(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		msg  []byte
		want uevent
		ok   bool
	}{
		{ueventBytes("change@/devices/virtual/block/loop8", "ACTION=change", "DEVPATH=/devices/virtual/block/loop8",
			"SUBSYSTEM=block", "MAJOR=7", "MINOR=8", "DEVNAME=loop8", "DEVTYPE=disk", "DISKSEQ=12", "SEQNUM=681"),
			uevent{action: "change", number: 8, diskSeq: 12, seq: 681}, true},
		{ueventBytes("change@/devices/virtual/block/loop0", "SUBSYSTEM=block", "DEVTYPE=disk", "RESIZE=1", "SEQNUM=5"),
			uevent{action: "change", number: 0, seq: 5, resize: true}, true},
		{ueventBytes("change@/devices/virtual/block/loop3", "SUBSYSTEM=block", "DEVTYPE=disk", "DISK_MEDIA_CHANGE=1", "DISKSEQ=10"),
			uevent{action: "change", number: 3, diskSeq: 10, mediaChange: true}, true},
		{ueventBytes("add@/devices/virtual/block/loop8/loop8p1", "SUBSYSTEM=block", "DEVTYPE=partition", "PARTN=1", "DISKSEQ=12", "SEQNUM=683"),
			uevent{action: "add", number: 8, partition: 1, diskSeq: 12, seq: 683}, true},
		{ueventBytes("remove@/devices/virtual/block/loop1048575", "SUBSYSTEM=block", "DEVTYPE=disk"),
			uevent{action: "remove", number: 1048575}, true},
		{ueventBytes("change@/devices/virtual/block/loop2", "SUBSYSTEM=block", "DEVTYPE=disk", "DISKSEQ=31", "SYNTH_UUID=0"),
			uevent{action: "change", number: 2, diskSeq: 31, synthetic: true}, true},
		// Not a loop device, not a block device, not a known action, a
		// malformed name.
		{ueventBytes("change@/devices/virtual/block/zram0", "SUBSYSTEM=block", "DEVTYPE=disk"), uevent{}, false},
		{ueventBytes("add@/devices/virtual/block/loop8/queue", "SUBSYSTEM=block"), uevent{}, false},
		{ueventBytes("add@/devices/virtual/block/loop8", "SUBSYSTEM=bdi"), uevent{}, false},
		{ueventBytes("bind@/devices/virtual/block/loop8", "SUBSYSTEM=block", "DEVTYPE=disk"), uevent{}, false},
		{ueventBytes("add@/devices/virtual/block/loop08", "SUBSYSTEM=block", "DEVTYPE=disk"), uevent{}, false},
		{ueventBytes("add@/devices/virtual/block/loop1048576", "SUBSYSTEM=block", "DEVTYPE=disk"), uevent{}, false},
		{ueventBytes("add@/devices/virtual/block/loop8/loop9p1", "SUBSYSTEM=block", "DEVTYPE=partition", "PARTN=1"), uevent{}, false},
		{ueventBytes("add@/devices/virtual/block/loop8/loop8p1", "SUBSYSTEM=block", "DEVTYPE=partition", "PARTN=2"), uevent{}, false},
		{ueventBytes("add@/devices/virtual/block/loop8/loop8p1", "SUBSYSTEM=block", "DEVTYPE=disk"), uevent{}, false},
		{[]byte("libudev\x00\xfe\xed\xca\xfe"), uevent{}, false},
		{nil, uevent{}, false},
	} {
		got, ok := parseUevent(tt.msg)
		if ok != tt.ok || ok && got != tt.want {
			t.Errorf("parseUevent(%q) = %+v, %v; want %+v, %v", tt.msg, got, ok, tt.want, tt.ok)
		}
	}
}

// FuzzParseUevent: any bytes; what parses is a loop device's event whose
// numbers are in range and agree with its DEVPATH.
func FuzzParseUevent(f *testing.F) {
	f.Add(ueventBytes("change@/devices/virtual/block/loop8", "SUBSYSTEM=block", "DEVTYPE=disk", "DISKSEQ=12", "SEQNUM=681"))
	f.Add(ueventBytes("add@/devices/virtual/block/loop8/loop8p1", "SUBSYSTEM=block", "DEVTYPE=partition", "PARTN=1"))
	f.Add([]byte("remove@/devices/virtual/block/loop0\x00SUBSYSTEM=block\x00DEVTYPE=disk"))
	f.Fuzz(func(t *testing.T, b []byte) {
		e, ok := parseUevent(b)
		if !ok {
			return
		}
		if e.number < 0 || e.number > loopctl.MaxNumber || e.partition < 0 || e.partition > loopctl.MaxNumber {
			t.Fatalf("numbers out of range: %+v", e)
		}
		devpath := fmt.Sprintf("%s%d", loopDevpath, e.number)
		if e.partition != 0 {
			devpath += fmt.Sprintf("/loop%dp%d", e.number, e.partition)
		}
		if !strings.HasPrefix(string(b), e.action+"@"+devpath+"\x00") && string(b) != e.action+"@"+devpath {
			t.Fatalf("%+v from %q", e, b)
		}
	})
}

// udevMessage is a message as udev sends it to its group.
func udevMessage(props ...string) []byte {
	body := []byte(strings.Join(props, "\x00") + "\x00")
	h := make([]byte, 40)
	copy(h, "libudev\x00")
	binary.BigEndian.PutUint32(h[8:], 0xfeedcafe)
	binary.NativeEndian.PutUint32(h[12:], 40)
	binary.NativeEndian.PutUint32(h[16:], 40)
	binary.NativeEndian.PutUint32(h[20:], uint32(len(body)))
	return append(h, body...)
}

func TestParseUdevMessage(t *testing.T) {
	t.Parallel()
	msg := udevMessage("ACTION=change", "DEVPATH=/devices/virtual/block/loop3", "SUBSYSTEM=block", "DISKSEQ=77",
		"ID_FS_LABEL=ROOT")
	if devpath, seq, ok := parseUdevMessage(msg); !ok || devpath != "/devices/virtual/block/loop3" || seq != 77 {
		t.Fatalf("parseUdevMessage = %q, %d, %v", devpath, seq, ok)
	}
	// The kernel's own format, a bad magic, properties past the end.
	bad := udevMessage("DEVPATH=/x")
	binary.BigEndian.PutUint32(bad[8:], 0xfeedcafd)
	short := udevMessage("DEVPATH=/x")
	binary.NativeEndian.PutUint32(short[20:], 1000)
	for _, b := range [][]byte{ueventBytes("change@/devices/virtual/block/loop3", "SUBSYSTEM=block"), bad, short, nil} {
		if _, _, ok := parseUdevMessage(b); ok {
			t.Fatalf("parseUdevMessage(%q) accepted", b)
		}
	}
}

// FuzzParseUdevMessage: any bytes, no panic, no read past the message.
func FuzzParseUdevMessage(f *testing.F) {
	f.Add(udevMessage("DEVPATH=/devices/virtual/block/loop3", "DISKSEQ=77"))
	f.Add([]byte("libudev\x00"))
	f.Fuzz(func(t *testing.T, b []byte) {
		devpath, _, ok := parseUdevMessage(b)
		if ok && (devpath == "" || !bytes.Contains(b, []byte("DEVPATH="+devpath))) {
			t.Fatalf("%q from %q", devpath, b)
		}
	})
}
