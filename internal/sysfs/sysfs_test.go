package sysfs

import (
	"strconv"
	"strings"
	"testing"
)

func TestLoopNumber(t *testing.T) {
	tests := []struct {
		in   string
		want int
		ok   bool
	}{
		{"loop0", 0, true},
		{"loop7", 7, true},
		{"loop1048575", 1048575, true},
		{"loop9999999", 9999999, true},
		{"loop10000000", -1, false},
		{"loop", -1, false},
		{"loop01", -1, false},
		{"loop-1", -1, false},
		{"loop+1", -1, false},
		{"loop0p1", -1, false},
		{"loop-control", -1, false},
		{"sda", -1, false},
		{"Loop1", -1, false},
		{"", -1, false},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			n, ok := LoopNumber(tt.in)
			if n != tt.want || ok != tt.ok {
				t.Fatalf("LoopNumber(%q) = %d, %v; want %d, %v", tt.in, n, ok, tt.want, tt.ok)
			}
		})
	}
}

func TestWholeLoopDisk(t *testing.T) {
	tests := []struct {
		in   string
		want int
		ok   bool
	}{
		{"../../devices/virtual/block/loop0", 0, true},
		{"../../devices/virtual/block/loop12/", 12, true},
		{"/sys/devices/virtual/block/loop3", 3, true},
		{"../../devices/virtual/block/loop0/loop0p1", -1, false},
		{"../../devices/pci0000:00/0000:00:04.0/virtio1/block/vda", -1, false},
		{"../../devices/virtual/block/ram0", -1, false},
		{"../../devices/virtual/misc/loop0", -1, false},
		{"loop0", -1, false},
		{"", -1, false},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			n, ok := WholeLoopDisk(tt.in)
			if n != tt.want || ok != tt.ok {
				t.Fatalf("WholeLoopDisk(%q) = %d, %v; want %d, %v", tt.in, n, ok, tt.want, tt.ok)
			}
		})
	}
}

func TestValues(t *testing.T) {
	if v, err := Uint([]byte("4096\n")); v != 4096 || err != nil {
		t.Errorf("Uint = %d, %v", v, err)
	}
	if v, err := Uint([]byte("18446744073709551615\n")); v != 1<<64-1 || err != nil {
		t.Errorf("Uint(max) = %d, %v", v, err)
	}
	for _, bad := range []string{"", "\n", "-1\n", "12a\n", "18446744073709551616\n", " 1\n"} {
		if _, err := Uint([]byte(bad)); err != ErrSyntax {
			t.Errorf("Uint(%q) = %v, want ErrSyntax", bad, err)
		}
	}
	for in, want := range map[string]bool{"0\n": false, "1\n": true, "1": true} {
		if v, err := Bool([]byte(in)); v != want || err != nil {
			t.Errorf("Bool(%q) = %v, %v", in, v, err)
		}
	}
	for _, bad := range []string{"", "2\n", "yes\n", "01\n"} {
		if _, err := Bool([]byte(bad)); err != ErrSyntax {
			t.Errorf("Bool(%q) = %v, want ErrSyntax", bad, err)
		}
	}
	// Only the one newline sysfs adds is removed: a path may end in spaces.
	if v := Value([]byte("/tmp/a b \n")); v != "/tmp/a b " {
		t.Errorf("Value = %q", v)
	}
	if v := Value([]byte("/tmp/x (deleted)\n")); v != "/tmp/x (deleted)" {
		t.Errorf("Value = %q", v)
	}
}

func TestPaths(t *testing.T) {
	if p := DevBlockPath("/sys", 7, 12); p != "/sys/dev/block/7:12" {
		t.Errorf("DevBlockPath = %q", p)
	}
	if p := LoopDir("/sys", 3); p != "/sys/block/loop3" {
		t.Errorf("LoopDir = %q", p)
	}
}

func FuzzLoopNumber(f *testing.F) {
	for _, s := range []string{"loop0", "loop1048575", "loop01", "loop", "loop0p1", "loop-1"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, ok := LoopNumber(s)
		if !ok {
			if n != -1 {
				t.Fatalf("LoopNumber(%q) = %d, false", s, n)
			}
			return
		}
		// An accepted name is exactly the canonical spelling of its number.
		if want := "loop" + strconv.Itoa(n); s != want || n < 0 {
			t.Fatalf("LoopNumber(%q) = %d, which spells %q", s, n, want)
		}
	})
}

func FuzzWholeLoopDisk(f *testing.F) {
	for _, s := range []string{"../../devices/virtual/block/loop0", "../../devices/virtual/block/loop0/loop0p1", "block/loop3/", "/"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, ok := WholeLoopDisk(s)
		if ok && !strings.Contains(s, "block/loop"+strconv.Itoa(n)) {
			t.Fatalf("WholeLoopDisk(%q) = %d", s, n)
		}
	})
}

func FuzzAttributes(f *testing.F) {
	for _, s := range []string{"0\n", "1\n", "4096\n", "/tmp/x (deleted)\n", "", "\n\n"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if v, err := Uint(b); err == nil && strconv.FormatUint(v, 10) != strings.TrimSuffix(string(b), "\n") {
			// ParseUint accepts no sign or spaces, so a value round-trips
			// unless it had leading zeros.
			if !strings.HasPrefix(string(b), "0") {
				t.Fatalf("Uint(%q) = %d", b, v)
			}
		}
		if v, err := Bool(b); err == nil && (v != (Value(b) == "1")) {
			t.Fatalf("Bool(%q) = %v", b, v)
		}
		if v := Value(b); len(v) < len(b)-1 {
			t.Fatalf("Value(%q) = %q dropped more than the newline", b, v)
		}
	})
}

func TestPartitionNumber(t *testing.T) {
	for _, tt := range []struct {
		name string
		n    int
		want int
		ok   bool
	}{
		{"loop3p1", 3, 1, true},
		{"loop3p12", 3, 12, true},
		{"loop12p3", 12, 3, true},
		{"loop3p01", 3, -1, false},
		{"loop3p", 3, -1, false},
		{"loop31p1", 3, -1, false},
		{"loop3", 3, -1, false},
		{"queue", 3, -1, false},
	} {
		if got, ok := PartitionNumber(tt.name, tt.n); got != tt.want || ok != tt.ok {
			t.Errorf("PartitionNumber(%q, %d) = %d, %v; want %d, %v", tt.name, tt.n, got, ok, tt.want, tt.ok)
		}
	}
}

func FuzzPartitionNumber(f *testing.F) {
	for _, s := range []string{"loop3p1", "loop3p01", "loop3p", "loop31p1", "queue"} {
		f.Add(s, 3)
	}
	f.Fuzz(func(t *testing.T, s string, n int) {
		m, ok := PartitionNumber(s, n)
		// An accepted name is exactly the canonical spelling of both
		// numbers.
		if ok && s != "loop"+strconv.Itoa(n)+"p"+strconv.Itoa(m) {
			t.Fatalf("PartitionNumber(%q, %d) = %d", s, n, m)
		}
	})
}

func TestDev(t *testing.T) {
	for _, tt := range []struct {
		in           string
		major, minor uint32
		ok           bool
	}{
		{"7:3\n", 7, 3, true},
		{"259:0\n", 259, 0, true},
		{"7:3", 7, 3, true},
		{"7-3\n", 0, 0, false},
		{"7:\n", 0, 0, false},
		{":3\n", 0, 0, false},
		{"7:-3\n", 0, 0, false},
		{"4294967296:1\n", 0, 0, false},
	} {
		ma, mi, err := Dev([]byte(tt.in))
		if (err == nil) != tt.ok || ma != tt.major || mi != tt.minor {
			t.Errorf("Dev(%q) = %d, %d, %v", tt.in, ma, mi, err)
		}
	}
}

func FuzzDev(f *testing.F) {
	for _, s := range []string{"7:3\n", "259:0", "7-3", ":"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		ma, mi, err := Dev(b)
		if err == nil && Value(b) != strconv.FormatUint(uint64(ma), 10)+":"+strconv.FormatUint(uint64(mi), 10) {
			// Only leading zeros may be lost.
			if !strings.Contains(Value(b), "0") {
				t.Fatalf("Dev(%q) = %d, %d", b, ma, mi)
			}
		}
	})
}
