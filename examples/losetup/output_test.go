//go:build linux

package main

import (
	"bytes"
	"testing"

	"github.com/loopctl/loopctl"
)

// TestTable checks the three table formats on rows made up here, in the
// forms util-linux 2.38 prints (the integration tests compare them with
// the real losetup on real devices).
func TestTable(t *testing.T) {
	rows := []row{
		{path: "/dev/loop1", bound: true, s: loopctl.Status{SizeLimit: 8192, Offset: 4096, Flags: loopctl.FlagReadOnly,
			BackingFile: "/tmp/a b/é\t\\x.img", BlockSize: 4096, BackingInode: 12}},
		{path: "/dev/loop10", bound: true, s: loopctl.Status{Flags: loopctl.FlagAutoClear | loopctl.FlagDirectIO,
			BackingFile: "/c.img", BlockSize: 512}},
		{path: "/dev/loop2"},
	}
	cols := []int{colName, colSizeLimit, colRO, colBackFile, colBackIno, colLogSec}
	for _, tt := range []struct {
		name string
		c    config
		utf8 bool
		rows []row
		want string
	}{
		{"aligned, C locale", config{columns: cols}, false, rows, "" +
			"NAME        SIZELIMIT RO BACK-FILE                      BACK-INO LOG-SEC\n" +
			"/dev/loop1       8192  1 /tmp/a b/\\xc3\\xa9\\x09\\x5cx.img       12    4096\n" +
			"/dev/loop10         0  0 /c.img                                      512\n" +
			"/dev/loop2             0                                             512\n"},
		{"aligned, UTF-8, no headings", config{columns: cols, noHead: true}, true, rows, "" +
			"/dev/loop1       8192  1 /tmp/a b/é\\x09\\x5cx.img       12    4096\n" +
			"/dev/loop10         0  0 /c.img                               512\n" +
			"/dev/loop2             0                                      512\n"},
		{"last column left-aligned", config{columns: []int{colLogSec, colName}}, false, rows[1:], "" +
			"LOG-SEC NAME\n" +
			"    512 /dev/loop10\n" +
			"    512 /dev/loop2\n"},
		{"raw", config{columns: cols, raw: true}, true, rows, "" +
			"NAME SIZELIMIT RO BACK-FILE BACK-INO LOG-SEC\n" +
			"/dev/loop1 8192 1 /tmp/a\\x20b/\\xc3\\xa9\\x09\\x5cx.img 12 4096\n" +
			"/dev/loop10 0 0 /c.img  512\n" +
			"/dev/loop2  0   512\n"},
		{"json", config{columns: []int{colName, colRO, colBackFile, colBackIno}, json: true}, true, rows[:2], "" +
			"{\n   \"loopdevices\": [\n" +
			"      {\n" +
			"         \"name\": \"/dev/loop1\",\n" +
			"         \"ro\": true,\n" +
			"         \"back-file\": \"/tmp/a b/é\\t\\\\x.img\",\n" +
			"         \"back-ino\": 12\n" +
			"      },{\n" +
			"         \"name\": \"/dev/loop10\",\n" +
			"         \"ro\": false,\n" +
			"         \"back-file\": \"/c.img\",\n" +
			"         \"back-ino\": null\n" +
			"      }\n" +
			"   ]\n}\n"},
		{"empty: nothing", config{columns: cols}, false, nil, ""},
		{"empty raw: nothing", config{columns: cols, raw: true}, false, nil, ""},
		{"empty json: the list", config{columns: cols, json: true}, false, nil, "{\n   \"loopdevices\": [\n\n   ]\n}\n"},
	} {
		var b bytes.Buffer
		o := &out{w: &b, prog: "losetup", utf8: tt.utf8}
		o.table(&tt.c, tt.rows)
		if b.String() != tt.want {
			t.Errorf("%s:\ngot:\n%s\nwant:\n%s", tt.name, b.String(), tt.want)
		}
	}
}

// TestOneLine checks losetup's classic format.
func TestOneLine(t *testing.T) {
	for _, tt := range []struct {
		r    row
		want string
	}{
		{row{path: "/dev/loop0", bound: true, s: loopctl.Status{BackingDevice: 0x801, BackingInode: 12, BackingFile: "/a.img"}},
			"/dev/loop0: [2049]:12 (/a.img)\n"},
		{row{path: "/dev/loop3", bound: true, s: loopctl.Status{BackingDevice: 0x1f, BackingInode: 7, BackingFile: "/b", Offset: 512, SizeLimit: 4096}},
			"/dev/loop3: [0031]:7 (/b), offset 512, sizelimit 4096\n"},
	} {
		var b bytes.Buffer
		(&out{w: &b}).oneLine(tt.r)
		if b.String() != tt.want {
			t.Errorf("oneLine = %q, want %q", b.String(), tt.want)
		}
	}
}
