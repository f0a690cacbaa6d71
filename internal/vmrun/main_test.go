//go:build linux

package main

import (
	"bytes"
	"compress/gzip"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestCompareVersions(t *testing.T) {
	names := []string{
		"linux-image-5.10.0-46-amd64-unsigned",
		"linux-image-5.10.0-9-amd64-unsigned",
		"linux-image-6.12.118+deb13-amd64-unsigned",
		"linux-image-6.12.41+deb13-amd64-unsigned",
		"linux-image-5.10.0-30-amd64-unsigned",
	}
	slices.SortFunc(names, compareVersions)
	want := []string{
		"linux-image-5.10.0-9-amd64-unsigned",
		"linux-image-5.10.0-30-amd64-unsigned",
		"linux-image-5.10.0-46-amd64-unsigned",
		"linux-image-6.12.41+deb13-amd64-unsigned",
		"linux-image-6.12.118+deb13-amd64-unsigned",
	}
	if !slices.Equal(names, want) {
		t.Fatalf("sorted %q, want %q", names, want)
	}
}

// TestFindKernel finds the kernel, config and modules in both of Debian's
// layouts: one package with boot/ (to 6.x), and three unpacked together
// with everything under usr/lib/modules/RELEASE (from 7).
func TestFindKernel(t *testing.T) {
	for _, tt := range []struct {
		name  string
		files []string
		want  kernel // relative to the directory
	}{
		{"6.12", []string{"boot/vmlinuz-6.12.118+deb13-amd64", "boot/config-6.12.118+deb13-amd64",
			"usr/lib/modules/6.12.118+deb13-amd64/kernel/drivers/block/loop.ko.xz"},
			kernel{"6.12.118+deb13-amd64", "boot/vmlinuz-6.12.118+deb13-amd64", "boot/config-6.12.118+deb13-amd64",
				"usr/lib/modules/6.12.118+deb13-amd64"}},
		{"5.10", []string{"boot/vmlinuz-5.10.0-46-amd64", "boot/config-5.10.0-46-amd64",
			"lib/modules/5.10.0-46-amd64/kernel/drivers/block/loop.ko"},
			kernel{"5.10.0-46-amd64", "boot/vmlinuz-5.10.0-46-amd64", "boot/config-5.10.0-46-amd64",
				"lib/modules/5.10.0-46-amd64"}},
		{"7.3", []string{"usr/lib/modules/7.3.4+deb13-amd64/vmlinuz.unsigned", "usr/lib/modules/7.3.4+deb13-amd64/config",
			"usr/lib/modules/7.3.4+deb13-amd64/kernel/drivers/block/loop.ko.xz"},
			kernel{"7.3.4+deb13-amd64", "usr/lib/modules/7.3.4+deb13-amd64/vmlinuz.unsigned",
				"usr/lib/modules/7.3.4+deb13-amd64/config", "usr/lib/modules/7.3.4+deb13-amd64"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			for _, f := range tt.files {
				p := filepath.Join(dir, f)
				if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(p, nil, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			got, err := findKernel(dir)
			if err != nil {
				t.Fatal(err)
			}
			want := kernel{tt.want.release, filepath.Join(dir, tt.want.vmlinuz), filepath.Join(dir, tt.want.config),
				filepath.Join(dir, tt.want.modules)}
			if *got != want {
				t.Fatalf("found %+v, want %+v", *got, want)
			}
		})
	}
}

// TestWriteCPIO reads back the archive writeCPIO makes, as the kernel
// does: newc headers, names and data padded to four bytes, the directories
// before what they hold, and the trailer.
func TestWriteCPIO(t *testing.T) {
	dir := t.TempDir()
	host := filepath.Join(dir, "prog")
	if err := os.WriteFile(host, []byte("#!/bin/true\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "initrd.gz")
	err := writeCPIO(out, map[string]string{"/bin/prog": host, "/lib/x/libc.so.6": host},
		map[string][]byte{"/vmrun.json": []byte(`{"Tmp":"ext4"}`)})
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	gz, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(gz)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	contents := map[string]string{}
	for len(b) > 0 {
		if len(b) < 110 || string(b[:6]) != "070701" {
			t.Fatalf("bad header at %q", b[:min(len(b), 16)])
		}
		field := func(i int) int {
			v, err := strconv.ParseUint(string(b[6+8*i:14+8*i]), 16, 32)
			if err != nil {
				t.Fatal(err)
			}
			return int(v)
		}
		mode, size, namesize := field(1), field(6), field(11)
		name := string(b[110 : 110+namesize-1])
		off := (110 + namesize + 3) &^ 3
		data := b[off : off+size]
		b = b[(off+size+3)&^3:]
		if name == "TRAILER!!!" {
			if len(bytes.TrimRight(b, "\x00")) != 0 {
				t.Fatal("data after the trailer")
			}
			break
		}
		names = append(names, name)
		if mode&0o170000 == 0o100000 {
			contents[name] = string(data)
		}
	}
	want := []string{"bin", "bin/prog", "lib", "lib/x", "lib/x/libc.so.6", "vmrun.json"}
	if !slices.Equal(names, want) {
		t.Fatalf("entries %q, want %q", names, want)
	}
	if contents["bin/prog"] != "#!/bin/true\n" || contents["vmrun.json"] != `{"Tmp":"ext4"}` {
		t.Fatalf("contents %q", contents)
	}
}

// TestModuleOrder puts each module after what its .modinfo says it depends
// on, and leaves out what the kernel does not have as a module.
func TestModuleOrder(t *testing.T) {
	dir := t.TempDir()
	mods := map[string]string{"ext4": "jbd2,mbcache,crc16", "jbd2": "", "mbcache": "", "loop": ""}
	for name, deps := range mods {
		if err := os.WriteFile(filepath.Join(dir, name+".ko"), fakeModule(t, deps), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	got, err := moduleOrder(dir, []string{"loop", "virtio_blk", "ext4"})
	if err != nil {
		t.Fatal(err)
	}
	for i := range got {
		got[i] = filepath.Base(got[i])
	}
	if want := []string{"loop.ko", "jbd2.ko", "mbcache.ko", "ext4.ko"}; !slices.Equal(got, want) {
		t.Fatalf("order %q, want %q", got, want)
	}
}

// fakeModule makes a minimal ELF file with a .modinfo section.
func fakeModule(t *testing.T, depends string) []byte {
	t.Helper()
	modinfo := []byte("license=GPL\x00depends=" + depends + "\x00")
	shstr := []byte("\x00.modinfo\x00.shstrtab\x00")
	var b bytes.Buffer
	le := func(v any) {
		switch v := v.(type) {
		case uint16:
			b.Write([]byte{byte(v), byte(v >> 8)})
		case uint32:
			b.Write([]byte{byte(v), byte(v >> 8), byte(v >> 16), byte(v >> 24)})
		case uint64:
			for i := range 8 {
				b.WriteByte(byte(v >> (8 * i)))
			}
		}
	}
	const ehsize, shentsize = 64, 64
	dataOff := uint64(ehsize)
	strOff := dataOff + uint64(len(modinfo))
	shOff := strOff + uint64(len(shstr))
	b.Write([]byte{0x7f, 'E', 'L', 'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0})
	le(uint16(1))  // ET_REL
	le(uint16(62)) // EM_X86_64
	le(uint32(1))  // version
	le(uint64(0))  // entry
	le(uint64(0))  // phoff
	le(shOff)      // shoff
	le(uint32(0))  // flags
	le(uint16(ehsize))
	le(uint16(0)) // phentsize
	le(uint16(0)) // phnum
	le(uint16(shentsize))
	le(uint16(3)) // shnum
	le(uint16(2)) // shstrndx
	b.Write(modinfo)
	b.Write(shstr)
	section := func(name uint32, typ uint32, off, size uint64) {
		le(name)
		le(typ)
		le(uint64(0)) // flags
		le(uint64(0)) // addr
		le(off)
		le(size)
		le(uint32(0)) // link
		le(uint32(0)) // info
		le(uint64(1)) // addralign
		le(uint64(0)) // entsize
	}
	section(0, 0, 0, 0)
	section(1, 1, dataOff, uint64(len(modinfo))) // .modinfo, PROGBITS
	section(10, 3, strOff, uint64(len(shstr)))   // .shstrtab, STRTAB
	return b.Bytes()
}

// TestBootStatus checks how boot reads a guest's console, with a stand-in
// for qemu that prints one: the tests' status, a guest that died after its
// init started, and a kernel that died before it (errNoInit, which run
// boots once more).
func TestBootStatus(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("PATH", dir+":"+os.Getenv("PATH"))
	for _, tt := range []struct {
		console string
		code    int
		noInit  bool
		fails   bool
	}{
		{"firmware\nvmrun-guest: Linux 6.1\nPASS\nvmrun: exit 3\n", 3, false, false},
		{"\x1b[2Jvmrun-guest: Linux 6.1\nKernel panic\n", 0, false, true},
		{"Booting\nOops: int3\nKernel panic - not syncing\n", 0, true, true},
	} {
		script := "#!/bin/sh\nprintf '%s' '" + strings.ReplaceAll(tt.console, "'", "") + "'\n"
		if err := os.WriteFile(filepath.Join(dir, "qemu-system-x86_64"), []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
		code, err := boot("qemu-system-x86_64", nil, time.Minute, func(string) {})
		if code != tt.code || (err != nil) != tt.fails || errors.Is(err, errNoInit) != tt.noInit {
			t.Errorf("console %q: boot = %d, %v; want %d, failure %t, errNoInit %t", tt.console, code, err, tt.code, tt.fails, tt.noInit)
		}
	}
}

// TestLibraryDir checks that vmrun, a module of its own, finds the library
// it tests above it, and not its own go.mod.
func TestLibraryDir(t *testing.T) {
	for _, c := range []struct{ gomod, want string }{
		{"module github.com/loopctl/loopctl\n\ngo 1.26.0\n", libraryModule},
		{"// a comment\nmodule \"github.com/loopctl/loopctl\" // quoted\n", libraryModule},
		{"module github.com/loopctl/loopctl/internal/vmrun\n", libraryModule + "/internal/vmrun"},
		{"go 1.26.0\n", ""},
	} {
		if got := modulePath([]byte(c.gomod)); got != c.want {
			t.Errorf("modulePath(%q) = %q, want %q", c.gomod, got, c.want)
		}
	}
	dir, err := libraryDir()
	if err != nil {
		t.Fatal(err)
	}
	want, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	if dir != want {
		t.Errorf("libraryDir() = %s, want %s", dir, want)
	}
}
