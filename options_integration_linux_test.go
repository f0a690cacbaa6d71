//go:build integration

package loopctl

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/kerneltest"
)

// What image builders and mounts need of a binding: a read-only one held
// through a read-only descriptor, a lock kept for the caller, the image's
// own sector size, a Reuse that compares everything, untrusted paths, and
// images past 2 GiB in 32-bit programs.

// deviceFDFlags returns the open flags of this process's descriptor of the
// device at path that was not open before (fds from openFDs).
func deviceFDFlags(t *testing.T, path string, before map[int]string) int {
	t.Helper()
	for fd, target := range kerneltest.OpenFDs(t) {
		if target != path || before[fd] == path {
			continue
		}
		fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
		if err != nil {
			t.Fatal(err)
		}
		return fl
	}
	t.Fatalf("no new descriptor of %s", path)
	return 0
}

// writeMountedRefused tells whether the kernel refuses to mount a block
// device that has writers: the boot parameter bdev_allow_write_mounted=0
// (Linux 6.8), or a kernel built without CONFIG_BLK_DEV_WRITE_MOUNTED.
func writeMountedRefused(t *testing.T) bool {
	b, _ := os.ReadFile("/proc/cmdline")
	if strings.Contains(string(b), "bdev_allow_write_mounted=0") {
		return true
	}
	if cfg, err := kernelConfig(); err == nil {
		if _, ok := cfg["CONFIG_BLK_DEV_WRITE_MOUNTED"]; !ok && kerneltest.AtLeast(t, 6, 8) {
			return true
		}
	}
	return false
}

// TestKernelReadOnlyDescriptor: Attach with FlagReadOnly binds and holds the
// device through a read-only descriptor, and OpenBinding of the binding
// opens one; a read-only mount of its file system goes through while the
// Device is open. Where the kernel refuses to mount a device with writers
// (a guest booted with bdev_allow_write_mounted=0), the same mount beside a
// read-write descriptor (OpenDevice's, as Attach held before) fails with
// EBUSY.
func TestKernelReadOnlyDescriptor(t *testing.T) {
	kerneltest.Require(t)
	f := kerneltest.TempFile(t, 16<<20)
	kerneltest.MkfsExt4(t, f.Name())
	before := kerneltest.OpenFDs(t)
	d := attachT(t, f.Name(), Options{Flags: FlagReadOnly})
	if fl := deviceFDFlags(t, d.Path(), before); fl&unix.O_ACCMODE != unix.O_RDONLY {
		t.Fatalf("the Device's descriptor has flags %#o, want O_RDONLY", fl)
	}
	s, err := d.Status()
	if err != nil || s.Flags&FlagReadOnly == 0 || readAttr(t, d.Number(), "ro") != "1" {
		t.Fatalf("Status = %+v, %v; want a read-only binding", s, err)
	}
	before = kerneltest.OpenFDs(t)
	b, err := OpenBinding(s)
	if err != nil {
		t.Fatal(err)
	}
	if fl := deviceFDFlags(t, d.Path(), before); fl&unix.O_ACCMODE != unix.O_RDONLY {
		t.Errorf("OpenBinding's descriptor has flags %#o, want O_RDONLY", fl)
	}
	b.Close()

	mount := func() error {
		dir := t.TempDir()
		err := unix.Mount(d.Path(), dir, "ext4", unix.MS_RDONLY, "")
		if err == nil {
			if err := unix.Unmount(dir, 0); err != nil {
				t.Fatal(err)
			}
		}
		return err
	}
	if err := mount(); err != nil {
		t.Fatalf("mount -o ro of %s while the Device is open: %v", d.Path(), err)
	}
	refused := writeMountedRefused(t)
	rw, err := OpenDevice(d.Number())
	if err != nil {
		t.Fatal(err)
	}
	err = mount()
	rw.Close()
	switch {
	case refused && !errors.Is(err, unix.EBUSY):
		t.Fatalf("mount -o ro beside a read-write descriptor, writers refused (%s): %v, want EBUSY", kerneltest.Release(), err)
	case !refused && err != nil:
		t.Fatalf("mount -o ro beside a read-write descriptor: %v", err)
	}
	t.Logf("%s: a mounted device's writers refused: %v; the mount beside a read-write descriptor: %v", kerneltest.Release(), refused, err)
}

// gptDisk returns an image of size bytes partitioned for sectors of ssz
// bytes: a protective MBR, a GPT header at LBA 1 and its 128 entries, one
// partition from the first usable sector to the last, as the kernel's
// efi partition parser wants them (the backup header, which it only
// warns about, is left out).
func gptDisk(ssz, size int) []byte {
	b := make([]byte, size)
	sectors := size / ssz
	last := uint64(sectors - 1)
	// The protective MBR.
	rec := b[446:462]
	rec[4] = 0xEE
	binary.LittleEndian.PutUint32(rec[8:], 1)
	binary.LittleEndian.PutUint32(rec[12:], uint32(min(last, 0xFFFFFFFF)))
	b[510], b[511] = 0x55, 0xAA
	// The entries, at LBA 2.
	const entries, entrySize = 128, 128
	entrySectors := uint64((entries*entrySize + ssz - 1) / ssz)
	first, lastUsable := 2+entrySectors, last-1-entrySectors
	e := b[2*ssz : 2*ssz+entries*entrySize]
	copy(e[0:16], []byte{0xAF, 0x3D, 0xC6, 0x0F, 0x83, 0x84, 0x72, 0x47, 0x8E, 0x79, 0x3D, 0x69, 0xD8, 0x47, 0x7D, 0xE4}) // Linux data
	rand.Read(e[16:32])
	binary.LittleEndian.PutUint64(e[32:], first)
	binary.LittleEndian.PutUint64(e[40:], lastUsable)
	// The header.
	h := b[ssz : ssz+92]
	copy(h, "EFI PART")
	binary.LittleEndian.PutUint32(h[8:], 0x00010000)
	binary.LittleEndian.PutUint32(h[12:], 92)
	binary.LittleEndian.PutUint64(h[24:], 1)
	binary.LittleEndian.PutUint64(h[32:], last)
	binary.LittleEndian.PutUint64(h[40:], first)
	binary.LittleEndian.PutUint64(h[48:], lastUsable)
	rand.Read(h[56:72])
	binary.LittleEndian.PutUint64(h[72:], 2)
	binary.LittleEndian.PutUint32(h[80:], entries)
	binary.LittleEndian.PutUint32(h[84:], entrySize)
	binary.LittleEndian.PutUint32(h[88:], crc32.ChecksumIEEE(e))
	binary.LittleEndian.PutUint32(h[16:], crc32.ChecksumIEEE(h))
	return b
}

// TestKernelBlockSizeAuto binds images partitioned for each sector size
// with BlockSizeAuto: the device gets that block size, and where the kernel
// reads GPT its one partition appears, at the place the image gives. An
// image without a GPT gets the kernel's default, one with headers for two
// sizes is refused naming both, and a block device backing gives its own
// logical block size.
func TestKernelBlockSizeAuto(t *testing.T) {
	kerneltest.Require(t)
	gpt := false
	if cfg, err := kernelConfig(); err == nil {
		gpt = cfg["CONFIG_EFI_PARTITION"] == "y"
	}
	dir := t.TempDir()
	for _, ssz := range []int{512, 1024, 2048, 4096} {
		path := filepath.Join(dir, "gpt"+strconv.Itoa(ssz))
		if err := os.WriteFile(path, gptDisk(ssz, 8<<20), 0o644); err != nil {
			t.Fatal(err)
		}
		d := attachT(t, path, Options{BlockSize: BlockSizeAuto, Flags: FlagPartScan | FlagReadOnly})
		s, err := d.Status()
		if err != nil || s.BlockSize != uint32(ssz) {
			t.Fatalf("%d-byte sectors: Status = %+v, %v; want %d-byte blocks", ssz, s, err, ssz)
		}
		if !gpt {
			continue
		}
		parts, err := d.Partitions()
		if err != nil {
			t.Fatal(err)
		}
		entrySectors := uint64((128*128 + ssz - 1) / ssz)
		if len(parts) != 1 || parts[0].Start != (2+entrySectors)*uint64(ssz) {
			t.Errorf("%d-byte sectors: partitions %+v; want one from byte %d", ssz, parts, (2+entrySectors)*uint64(ssz))
		}
	}
	if !gpt {
		t.Logf("%s reads no GPT: the partitions were not checked", kerneltest.Release())
	}

	none := kerneltest.TempFile(t, 1<<20)
	if s, err := attachT(t, none.Name(), Options{BlockSize: BlockSizeAuto}).Status(); err != nil || s.BlockSize != 512 {
		t.Errorf("no GPT: Status = %+v, %v; want 512-byte blocks", s, err)
	}

	two := filepath.Join(dir, "two")
	img := gptDisk(4096, 8<<20)
	copy(img[512:512+92], gptDisk(512, 8<<20)[512:512+92])
	if err := os.WriteFile(two, img, 0o644); err != nil {
		t.Fatal(err)
	}
	found, _ := FindByBackingFile(two)
	if _, err := Attach(context.Background(), two, Options{BlockSize: BlockSizeAuto}); !errors.Is(err, fs.ErrInvalid) ||
		!strings.Contains(err.Error(), "512- and 4096-byte") {
		t.Fatalf("two GPT headers: %v, want an error naming both sizes", err)
	}
	if after, _ := FindByBackingFile(two); len(after) != len(found) {
		t.Fatalf("two GPT headers: bound %+v", after)
	}

	// A block device: a loop device of 4096-byte blocks.
	under := attachT(t, kerneltest.TempFile(t, 4<<20).Name(), Options{BlockSize: 4096})
	if s, err := attachT(t, under.Path(), Options{BlockSize: BlockSizeAuto}).Status(); err != nil || s.BlockSize != 4096 {
		t.Errorf("over a device of 4096-byte blocks: Status = %+v, %v; want 4096-byte blocks", s, err)
	}
}

// TestKernelLargeFile binds a sparse file of 5 GiB and writes a block 3 GiB
// into it through the device, then reads it back from the file: a 32-bit
// program (GOARCH=386, CI's 386 guest) must open both with O_LARGEFILE.
func TestKernelLargeFile(t *testing.T) {
	kerneltest.Require(t)
	path := filepath.Join(t.TempDir(), "big.img")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(5 << 30); err != nil {
		t.Fatalf("a sparse file of 5 GiB in %s: %v", filepath.Dir(path), err)
	}
	d := attachT(t, path, Options{})
	if s, err := d.Status(); err != nil || s.Size != 5<<30 {
		t.Fatalf("Status = %+v, %v; want 5 GiB", s, err)
	}
	dev, err := os.OpenFile(d.Path(), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	block := make([]byte, 4096)
	rand.Read(block)
	const at = 3 << 30
	if _, err := dev.WriteAt(block, at); err != nil {
		t.Fatal(err)
	}
	if err := dev.Sync(); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(block))
	if _, err := f.ReadAt(got, at); err != nil || string(got) != string(block) {
		t.Fatalf("the file at 3 GiB: %v; the block written through the device not there", err)
	}
}

// TestKernelReuseDirectIO4K: a file on ext4 over a disk of 4096-byte
// sectors (here a loop device of 4096-byte blocks), bound read-only with
// PreferDirectIO and Reuse twice: the second Attach shares the first's
// device, which since Linux 6.11 has the disk's 4096-byte blocks where it
// got direct I/O (Reuse compared 512 before).
func TestKernelReuseDirectIO4K(t *testing.T) {
	kerneltest.Require(t)
	fsImage := kerneltest.TempFile(t, 64<<20)
	kerneltest.MkfsExt4(t, fsImage.Name(), "-b", "4096")
	disk := attachT(t, fsImage.Name(), Options{BlockSize: 4096})
	dir := mountFrom(t, disk.Path(), "ext4", 0)
	img := filepath.Join(dir, "image")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	o := Options{Flags: FlagReadOnly, PreferDirectIO: true, Reuse: true}
	d := attachT(t, img, o)
	s, err := d.Status()
	if err != nil {
		t.Fatal(err)
	}
	if s.Flags&FlagDirectIO != 0 && kerneltest.AtLeast(t, 6, 11) && s.BlockSize != 4096 {
		t.Errorf("direct I/O over a disk of 4096-byte sectors on %s: %d-byte blocks, want 4096", kerneltest.Release(), s.BlockSize)
	}
	d2, err := Attach(context.Background(), img, o)
	if err != nil {
		t.Fatalf("the second Attach with the same Options: %v", err)
	}
	defer d2.Close()
	if !d2.Shared() || d2.Number() != d.Number() {
		t.Fatalf("the second Attach gave %s, shared %v; want %s shared", d2.Path(), d2.Shared(), d.Path())
	}
	t.Logf("%s: %+v", kerneltest.Release(), s)
	// Detached before the file system goes: attachT's cleanups run later.
	d2.Close()
	detach(t, d)
	kerneltest.WaitUnbound(t, d.Number())
}

// TestKernelNoSymlinks: Attach with NoSymlinks refuses a path with a
// symbolic link in its last component or a middle one, and one a caller
// checked that was then swapped for a link, before any device is touched;
// a path without one binds. RegularFileOnly refuses a block device.
func TestKernelNoSymlinks(t *testing.T) {
	kerneltest.Require(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "image")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	sub := filepath.Join(dir, "sub")
	if err := os.Mkdir(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(sub, "image"), make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, l := range [][2]string{{img, "last"}, {sub, "middle"}} {
		if err := os.Symlink(l[0], filepath.Join(dir, l[1])); err != nil {
			t.Fatal(err)
		}
	}
	swapped := filepath.Join(dir, "swapped")
	if err := os.WriteFile(swapped, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	if st, err := os.Lstat(swapped); err != nil || !st.Mode().IsRegular() { // the caller's check
		t.Fatal(st, err)
	}
	if err := os.Remove(swapped); err != nil || os.Symlink(img, swapped) != nil {
		t.Fatal(err)
	}
	o := Options{NoSymlinks: true, Flags: FlagReadOnly}
	for _, path := range []string{filepath.Join(dir, "last"), filepath.Join(dir, "middle", "image"), swapped} {
		before, _ := FindByBackingFile(img)
		d, err := Attach(context.Background(), path, o)
		if err == nil {
			d.Close()
		}
		if !errors.Is(err, unix.ELOOP) || !strings.Contains(err.Error(), "NoSymlinks") {
			t.Errorf("Attach(%s) with NoSymlinks = %v, want ELOOP naming NoSymlinks", path, err)
		}
		if after, _ := FindByBackingFile(img); len(after) != len(before) {
			t.Errorf("Attach(%s) with NoSymlinks bound %+v", path, after)
		}
	}
	d := attachT(t, filepath.Join(sub, "image"), o)
	under := attachT(t, img, Options{Flags: FlagReadOnly})
	if _, err := Attach(context.Background(), under.Path(), Options{RegularFileOnly: true, Flags: FlagReadOnly}); !errors.Is(err, fs.ErrInvalid) ||
		!strings.Contains(err.Error(), "RegularFileOnly") {
		t.Errorf("Attach of %s with RegularFileOnly = %v, want it refused", under.Path(), err)
	}
	attachT(t, under.Path(), Options{Flags: FlagReadOnly}) // a block device binds without RegularFileOnly
	detach(t, d)
}

// TestKernelPreferDirectIO: PreferDirectIO binds with direct I/O where
// the backing file system takes O_DIRECT and the offset is aligned, and
// buffered elsewhere (tmpfs before Linux 6.6, an offset of 256 bytes on a
// disk's file system),
// without an error, through LOOP_CONFIGURE and through the calls before
// it; Status and sysfs say which it got. With FlagDirectIO, which demands
// it, a file system without O_DIRECT is still an error.
func TestKernelPreferDirectIO(t *testing.T) {
	kerneltest.Require(t)
	dirs := map[string]string{"/tmp": t.TempDir(), "tmpfs": mountT(t, "tmpfs", 0)}
	for _, legacy := range []bool{false, true} {
		for fsName, dir := range dirs {
			for _, offset := range []uint64{0, 256} {
				name := fmt.Sprintf("%s,offset=%d,legacy=%v", fsName, offset, legacy)
				t.Run(name, func(t *testing.T) {
					sy := host
					if legacy {
						sy = useForced(t, map[uint]error{reqConfigure: unix.ENOTTY}).sys
					}
					f := fileIn(t, dir, 2<<20)
					o := Options{Offset: offset, BlockSize: 4096, PreferDirectIO: true}
					d := attachOn(t, sy, f.Name(), o)
					s, err := d.Status()
					if err != nil {
						t.Fatal(err)
					}
					got := s.Flags&FlagDirectIO != 0
					want := offset == 0 && directIOOK(t, dir)
					// An offset of 256 bytes is not aligned to a disk's
					// blocks; tmpfs has no disk, and there some kernels
					// give direct I/O at any offset (6.12), others not
					// (6.18).
					var sfs unix.Statfs_t
					if err := unix.Statfs(dir, &sfs); err != nil {
						t.Fatal(err)
					}
					if offset != 0 && sfs.Type == unix.TMPFS_MAGIC {
						want = got
					}
					if got != want {
						t.Fatalf("kernel %s, %s: direct I/O %v, want %v (Status %+v)", kerneltest.Release(), name, got, want, s)
					}
					if dio := readAttr(t, d.Number(), "loop/dio"); dio != map[bool]string{false: "0", true: "1"}[got] {
						t.Fatalf("sysfs loop/dio %s, Status says %v", dio, got)
					}
					// The device works either way: a block written through
					// it is in the file.
					block := bytes.Repeat([]byte{0xa5}, 4096)
					if err := writeDevice(d, block, 4096); err != nil {
						t.Fatal(err)
					}
					back := make([]byte, 4096)
					if _, err := f.ReadAt(back, int64(offset)+4096); err != nil || !bytes.Equal(back, block) {
						t.Fatalf("the block written through the device is not in the file: %v", err)
					}
					t.Logf("kernel %s, %s: direct I/O %v", kerneltest.Release(), name, got)

					if !want && offset == 0 {
						// Another file: this one is bound, buffered.
						g := fileIn(t, dir, 2<<20)
						o.Flags |= FlagDirectIO
						_, err := sy.Attach(context.Background(), g.Name(), o)
						wantNoDirectIO(t, err, g.Name())
					}
				})
			}
		}
	}
}
