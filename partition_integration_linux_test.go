//go:build integration

package loopctl

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io/fs"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unicode/utf16"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/kerneltest"
	"github.com/loopctl/loopctl/internal/sysfs"
)

// A part is a partition of a test image, in 512-byte sectors.
type part struct{ start, sectors uint64 }

// TestKernelPartScan writes a real MBR and a real GPT into images and
// attaches them with FlagPartScan: the kernel must find the partitions,
// where it was built with their parsers (Debian's kernels are; the project
// machines' own kernel is not, and the test says so).
func TestKernelPartScan(t *testing.T) {
	parts := []part{{start: 2048, sectors: 4096}, {start: 8192, sectors: 2048}}
	for _, table := range []struct {
		name, config string
		write        func(f *os.File, size uint64, parts []part) error
	}{
		{"mbr", "CONFIG_MSDOS_PARTITION", writeMBR},
		{"gpt", "CONFIG_EFI_PARTITION", writeGPT},
	} {
		t.Run(table.name, func(t *testing.T) {
			kerneltest.Require(t)
			requireConfig(t, table.config)
			const size = 8 << 20
			f := kerneltest.TempFile(t, size)
			if err := table.write(f, size, parts); err != nil {
				t.Fatal(err)
			}
			d := attachT(t, f.Name(), Options{Flags: FlagPartScan})
			for i, p := range parts {
				name := fmt.Sprintf("loop%dp%d", d.Number(), i+1)
				start := readAttr(t, d.Number(), name+"/start")
				sectors := readAttr(t, d.Number(), name+"/size")
				if start != strconv.FormatUint(p.start, 10) || sectors != strconv.FormatUint(p.sectors, 10) {
					t.Errorf("%s: start %s, size %s sectors; want %d, %d", name, start, sectors, p.start, p.sectors)
				}
				if fi, err := os.Stat("/dev/" + name); err != nil || fi.Mode()&fs.ModeDevice == 0 {
					t.Errorf("/dev/%s: %v", name, err)
				}
			}
			checkPartitions(t, d, parts)

			// A new table, read again.
			parts = []part{{start: 4096, sectors: 8192}}
			if err := table.write(f, size, parts); err != nil {
				t.Fatal(err)
			}
			if err := f.Sync(); err != nil {
				t.Fatal(err)
			}
			if err := d.Rescan(); err != nil {
				t.Fatal(err)
			}
			checkPartitions(t, d, parts)
		})
	}
}

// checkPartitions checks that d.Partitions lists parts.
func checkPartitions(t *testing.T, d *Device, parts []part) {
	t.Helper()
	got, err := d.Partitions()
	if err != nil {
		t.Fatal(err)
	}
	var want []Partition
	for i, p := range parts {
		want = append(want, Partition{Number: i + 1, Path: fmt.Sprintf("%sp%d", d.Path(), i+1),
			Start: p.start * 512, Size: p.sectors * 512})
	}
	if !slices.Equal(got, want) {
		t.Fatalf("Partitions = %+v, want %+v", got, want)
	}
}

// TestKernelPartitionsBLKPG works on any kernel, with or without partition
// table parsers: partitions added with BLKPG (util-linux addpart), their
// nodes made again with MakeNode once removed, as in a container whose /dev
// is not devtmpfs, and Rescan refused without FlagPartScan.
func TestKernelPartitionsBLKPG(t *testing.T) {
	c := openControl(t)
	d := newDevice(t, c)
	if err := d.Configure(kerneltest.TempFile(t, 8<<20), Options{Flags: FlagPartScan}); err != nil {
		t.Fatal(err)
	}
	parts := []part{{start: 2048, sectors: 4096}, {start: 8192, sectors: 2048}}
	for i, p := range parts {
		addPartition(t, d, i+1, int(p.start), int(p.sectors))
	}
	checkPartitions(t, d, parts)
	got, _ := d.Partitions()

	// Nodes gone, made again; what the test removes or makes it removes
	// before its device goes.
	p1, dev := got[0], d.Path()
	t.Cleanup(func() { os.Remove(p1.Path); os.Remove(dev) })
	for _, node := range []struct {
		path, devAttr string
		make          func() error
	}{
		{p1.Path, fmt.Sprintf("loop%d/loop%dp1/dev", d.Number(), d.Number()), p1.MakeNode},
		{dev, fmt.Sprintf("loop%d/dev", d.Number()), func() error { return MakeNode(d.Number()) }},
	} {
		if err := os.Remove(node.path); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(node.path, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := node.make(); !errors.Is(err, fs.ErrExist) {
			t.Fatalf("MakeNode over a regular file = %v, want fs.ErrExist", err)
		}
		os.Remove(node.path)
		for range 2 { // made, then left as it is
			if err := node.make(); err != nil {
				t.Fatal(err)
			}
		}
		var st unix.Stat_t
		if err := unix.Stat(node.path, &st); err != nil {
			t.Fatal(err)
		}
		want := readAttr(t, d.Number(), strings.TrimPrefix(node.devAttr, fmt.Sprintf("loop%d/", d.Number())))
		if got := fmt.Sprintf("%d:%d", unix.Major(uint64(st.Rdev)), unix.Minor(uint64(st.Rdev))); st.Mode&unix.S_IFMT != unix.S_IFBLK ||
			st.Mode&0o777 != 0o660 || got != want {
			t.Fatalf("%s: mode %o, device %s; want a block device %s, 0660", node.path, st.Mode, got, want)
		}
	}
	if od, err := OpenDevice(d.Number()); err != nil {
		t.Fatalf("OpenDevice through the node made: %v", err)
	} else {
		od.Close()
	}
	if err := (Partition{Number: 1, Path: "/dev/sda1"}).MakeNode(); !errors.Is(err, fs.ErrInvalid) {
		t.Fatalf("MakeNode of /dev/sda1 = %v, want it refused", err)
	}

	plain := newDevice(t, c)
	if err := plain.Configure(kerneltest.TempFile(t, 1<<20), Options{}); err != nil {
		t.Fatal(err)
	}
	if err := plain.Rescan(); !errors.Is(err, fs.ErrInvalid) {
		t.Fatalf("Rescan without FlagPartScan = %v, want it refused", err)
	}
}

// writeMBR writes an MS-DOS partition table with Linux partitions.
func writeMBR(f *os.File, _ uint64, parts []part) error {
	mbr := make([]byte, 512)
	for i, p := range parts {
		e := mbr[446+16*i:]
		copy(e[1:4], []byte{0xfe, 0xff, 0xff}) // CHS: use the LBA fields
		e[4] = 0x83                            // Linux
		copy(e[5:8], []byte{0xfe, 0xff, 0xff})
		binary.LittleEndian.PutUint32(e[8:], uint32(p.start))
		binary.LittleEndian.PutUint32(e[12:], uint32(p.sectors))
	}
	mbr[510], mbr[511] = 0x55, 0xaa
	_, err := f.WriteAt(mbr, 0)
	return err
}

// writeGPT writes a GUID partition table, with its protective MBR and its
// backup at the end of the image, of size bytes.
func writeGPT(f *os.File, size uint64, parts []part) error {
	const entries, entrySize = 128, 128
	last := size/512 - 1
	if err := writeMBR(f, size, []part{{start: 1, sectors: last}}); err != nil {
		return err
	}
	mbrType := []byte{0xee} // protective
	if _, err := f.WriteAt(mbrType, 446+4); err != nil {
		return err
	}
	// The Linux file system type, 0FC63DAF-8483-4772-8E79-3D69D8477DE4,
	// in the GUID byte order.
	linux := []byte{0xaf, 0x3d, 0xc6, 0x0f, 0x83, 0x84, 0x72, 0x47, 0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47, 0x7d, 0xe4}
	table := make([]byte, entries*entrySize)
	for i, p := range parts {
		e := table[i*entrySize:]
		copy(e, linux)
		copy(e[16:], fmt.Sprintf("loopctl-part-%03d", i+1)) // a unique GUID of sorts
		binary.LittleEndian.PutUint64(e[32:], p.start)
		binary.LittleEndian.PutUint64(e[40:], p.start+p.sectors-1)
		for j, c := range utf16.Encode([]rune(fmt.Sprintf("part%d", i+1))) {
			binary.LittleEndian.PutUint16(e[56+2*j:], c)
		}
	}
	tableSectors := uint64(len(table) / 512)
	header := func(self, other, tableLBA uint64) []byte {
		h := make([]byte, 512)
		copy(h, "EFI PART")
		binary.LittleEndian.PutUint32(h[8:], 0x00010000)
		binary.LittleEndian.PutUint32(h[12:], 92)
		binary.LittleEndian.PutUint64(h[24:], self)
		binary.LittleEndian.PutUint64(h[32:], other)
		binary.LittleEndian.PutUint64(h[40:], 2+tableSectors)
		binary.LittleEndian.PutUint64(h[48:], last-1-tableSectors)
		copy(h[56:72], "loopctl-test-gpt") // the disk's GUID
		binary.LittleEndian.PutUint64(h[72:], tableLBA)
		binary.LittleEndian.PutUint32(h[80:], entries)
		binary.LittleEndian.PutUint32(h[84:], entrySize)
		binary.LittleEndian.PutUint32(h[88:], crc32.ChecksumIEEE(table))
		binary.LittleEndian.PutUint32(h[16:], crc32.ChecksumIEEE(h[:92]))
		return h
	}
	for _, w := range []struct {
		lba  uint64
		data []byte
	}{
		{1, header(1, last, 2)},
		{2, table},
		{last - tableSectors, table},
		{last, header(last, 1, last-tableSectors)},
	} {
		if _, err := f.WriteAt(w.data, int64(w.lba*512)); err != nil {
			return err
		}
	}
	return nil
}

// TestKernelStalePartitions: a partition added by hand (BLKPG, as partx
// --add and addpart do) to a binding without FlagPartScan outlives the
// binding on kernels before 7.2 (6.1 drops it at the device's next
// open); the next binding the package makes, through Configure or
// through Attach, shows none. Any kernel takes BLKPG, parsers or not.
func TestKernelStalePartitions(t *testing.T) {
	const size = 8 << 20
	// leavePartition binds a plain file to d, adds partition 1 by hand,
	// and detaches, leaving d's device unbound.
	leavePartition := func(t *testing.T, d *Device) {
		t.Helper()
		if err := d.Configure(kerneltest.TempFile(t, size), Options{}); err != nil {
			t.Fatal(err)
		}
		addPartition(t, d, 1, 2048, 8192)()
		if err := d.Detach(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	// noPartitions checks that d, just bound to an image without a
	// partition table, shows no partition.
	noPartitions := func(t *testing.T, d *Device) {
		t.Helper()
		name := fmt.Sprintf("loop%d/loop%dp1", d.Number(), d.Number())
		if _, err := os.Stat("/sys/block/" + name); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("/sys/block/%s: %v, want it gone with the earlier binding", name, err)
		}
		if parts, err := d.Partitions(); err != nil || len(parts) != 0 {
			t.Errorf("Partitions = %+v, %v; want none", parts, err)
		}
	}
	// bindAgain binds another image to device n with Configure: it shows
	// no partition.
	bindAgain := func(t *testing.T, n int) {
		t.Helper()
		d, err := OpenDevice(n)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { detach(t, d) })
		if err := d.Configure(kerneltest.TempFile(t, size), Options{}); err != nil {
			t.Fatal(err)
		}
		noPartitions(t, d)
	}
	t.Run("Configure", func(t *testing.T) {
		d := newDevice(t, openControl(t))
		leavePartition(t, d)
		bindAgain(t, d.Number())
	})
	t.Run("in use", func(t *testing.T) {
		d := newDevice(t, openControl(t))
		n := d.Number()
		leavePartition(t, d)
		var p1 *os.File
		if hasPartition1(n) { // else the kernel dropped it at the detach (7.2)
			var err error
			if p1, err = os.Open(fmt.Sprintf("/dev/loop%dp1", n)); err != nil {
				t.Fatal(err)
			}
			if !hasPartition1(n) { // the kernel dropped it at the open (6.1)
				p1.Close()
				p1 = nil
			}
		}
		if p1 != nil {
			d, err := OpenDevice(n)
			if err != nil {
				p1.Close()
				t.Fatal(err)
			}
			err = d.Configure(kerneltest.TempFile(t, size), Options{})
			p1.Close()
			if !errors.Is(err, ErrBusy) || !strings.Contains(err.Error(), fmt.Sprintf("partition /dev/loop%dp1 is in use", n)) {
				t.Errorf("Configure over a partition in use = %v, want ErrBusy naming it", err)
			}
			if _, serr := d.Status(); !errors.Is(serr, ErrNotBound) {
				t.Errorf("bound all the same: %v", serr)
			}
			d.Close()
		}
		// Let go of: deleted before the next binding.
		bindAgain(t, n)
	})
	t.Run("Attach", func(t *testing.T) {
		first := attachT(t, kerneltest.TempFile(t, size).Name(), Options{})
		n := first.Number()
		dropLeft(t, n)
		addPartition(t, first, 1, 2048, 8192)()
		if err := first.Detach(context.Background()); err != nil {
			t.Fatal(err)
		}
		d := attachT(t, kerneltest.TempFile(t, size).Name(), Options{})
		if d.Number() != n {
			// Another process bound loop n meanwhile, or freed a lower one.
			t.Skipf("Attach chose loop%d, not loop%d, which keeps the partition", d.Number(), n)
		}
		noPartitions(t, d)
	})
}

// dropLeft deletes, at the test's end, the partitions that device n,
// which the test did not make, still has once unbound: those the test
// added by hand, should it fail before a binding deletes them.
func dropLeft(t *testing.T, n int) {
	t.Cleanup(func() {
		d, err := OpenDevice(n)
		if err != nil {
			return
		}
		defer d.Close()
		if parts, _ := sysfs.Partitions(sysfs.LoopDir(sysfs.Root, n), n); len(parts) > 0 {
			if err := host.dropPartitions(d.h, n, parts); err != nil {
				t.Errorf("deleting the partitions the test left on loop%d: %v", n, err)
			}
		}
	})
}

// TestKernelPartScanOnce binds and detaches an image with one MBR
// partition, with FlagPartScan, for some seconds, while a reader opens
// the device at each of its change uevents, as udev's probe does, and
// another opens it as often as it can: each binding must add the
// partition once and remove it once (one add and one remove uevent).
// LOOP_CONFIGURE with LO_FLAGS_PARTSCAN alone lets such an open scan the
// table before the kernel's own scan, which then removes and adds the
// partition again (systemd#41425): one binding in ten on Debian's 6.1.
// LOOPCTL_PARTSCAN_COMPARE=1 also runs the binding in one call, as on a
// kernel without the race, and logs what it counted.
func TestKernelPartScanOnce(t *testing.T) {
	kerneltest.Require(t)
	requireConfig(t, "CONFIG_MSDOS_PARTITION")
	run := func(t *testing.T, s *system) (cycles, adds, removes int) {
		c := openControlOn(t, s)
		d := newDevice(t, c)
		n := d.Number()
		d.Close()
		img := kerneltest.TempFile(t, 8<<20)
		if err := writeMBR(img, 8<<20, []part{{start: 2048, sectors: 4096}}); err != nil {
			t.Fatal(err)
		}
		events := kerneltest.ListenUevents(t)
		disk, partition := fmt.Sprintf("loop%d", n), fmt.Sprintf("loop%dp1", n)
		var added, removed atomic.Int64
		var stop atomic.Bool
		var readers sync.WaitGroup
		readers.Add(2)
		go func() { // udev's probe: an open at each change of the disk
			defer readers.Done()
			for !stop.Load() {
				ev, ok, err := events.Next(100 * time.Millisecond)
				if err != nil {
					t.Error(err)
					return
				}
				switch {
				case !ok:
				case ev.Vars["DEVNAME"] == partition && ev.Action == "add":
					added.Add(1)
				case ev.Vars["DEVNAME"] == partition && ev.Action == "remove":
					removed.Add(1)
				case ev.Vars["DEVNAME"] == disk && ev.Action == "change":
					if fd, err := unix.Open("/dev/"+disk, unix.O_RDONLY|unix.O_CLOEXEC, 0); err == nil {
						unix.Close(fd)
					}
				}
			}
		}()
		go func() { // any other program that opens the disk
			defer readers.Done()
			for !stop.Load() {
				if fd, err := unix.Open("/dev/"+disk, unix.O_RDONLY|unix.O_CLOEXEC, 0); err == nil {
					unix.Close(fd)
				}
			}
		}()
		defer func() { stop.Store(true); readers.Wait() }()
		for end := time.Now().Add(3 * time.Second); time.Now().Before(end); cycles++ {
			d, err := s.OpenDevice(n)
			if err != nil {
				t.Fatal(err)
			}
			if err := d.Configure(img, Options{Flags: FlagPartScan}); err != nil {
				d.Close()
				t.Fatal(err)
			}
			// What Attach and Configure promise: the partition is there,
			// and its node opens.
			if _, err := os.Stat("/sys/block/" + disk + "/" + partition); err != nil {
				t.Errorf("binding %d: %v", cycles+1, err)
			} else if fd, err := unix.Open("/dev/"+partition, unix.O_RDONLY|unix.O_CLOEXEC, 0); err != nil {
				t.Errorf("binding %d: %v", cycles+1, err)
			} else {
				unix.Close(fd)
			}
			if err := d.ClearFD(); err != nil {
				t.Fatal(err)
			}
			d.Close()
			kerneltest.WaitUnbound(t, n)
		}
		// The last removal's event may still be on its way.
		for end := time.Now().Add(10 * time.Second); removed.Load() < int64(cycles) && time.Now().Before(end); {
			time.Sleep(10 * time.Millisecond)
		}
		return cycles, int(added.Load()), int(removed.Load())
	}
	cycles, adds, removes := run(t, host)
	t.Logf("Linux %s: %d bindings with FlagPartScan: %d add and %d remove uevents of the partition", kerneltest.Release(), cycles, adds, removes)
	if adds != cycles || removes != cycles {
		t.Errorf("%d bindings added the partition %d times and removed it %d times; want once each", cycles, adds, removes)
	}
	if os.Getenv("LOOPCTL_PARTSCAN_COMPARE") == "1" {
		t.Run("one call", func(t *testing.T) {
			s := newSystem(osKernel{}, sysfs.Root)
			s.version = newestKernel // binds in one LOOP_CONFIGURE
			cycles, adds, removes := run(t, s)
			t.Logf("Linux %s, LOOP_CONFIGURE alone: %d bindings: %d add and %d remove uevents", kerneltest.Release(), cycles, adds, removes)
		})
	}
}

// TestKernelPartitionInUse: a partition held open keeps the kernel from
// reading the table again, and from deleting the partition before a new
// binding: Rescan names it, and a device that keeps it from an earlier
// binding is not free (Attach takes another; Configure says why). A
// shared device (Options.Reuse) is not scanned again under the users of
// its partitions. Partitions added by hand serve on any kernel.
func TestKernelPartitionInUse(t *testing.T) {
	const size = 8 << 20
	c := openControl(t)
	d := newDevice(t, c)
	img := kerneltest.TempFile(t, size)
	if err := d.Configure(img, Options{Flags: FlagPartScan}); err != nil {
		t.Fatal(err)
	}
	// The partition stays while the test holds its lock: udev's
	// BLKRRPART of the device after a change would drop it.
	addPartition(t, d, 1, 2048, 4096)
	p1 := fmt.Sprintf("%sp1", d.Path())
	held, err := os.Open(p1)
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()

	err = d.Rescan()
	if !errors.Is(err, ErrBusy) || !strings.Contains(err.Error(), "partition "+p1+" is in use") {
		t.Fatalf("Rescan with %s open = %v, want ErrBusy naming it", p1, err)
	}

	// Shared: Attach with Reuse returns the device, partitions and all.
	shared, err := Attach(context.Background(), img.Name(), Options{Flags: FlagPartScan, Reuse: true})
	if err != nil {
		t.Fatal(err)
	}
	if !shared.Shared() || shared.Number() != d.Number() {
		t.Errorf("Attach with Reuse: loop%d, shared %t; want loop%d shared", shared.Number(), shared.Shared(), d.Number())
	}
	shared.Close()
	if _, err := held.ReadAt(make([]byte, 512), 0); err != nil {
		t.Errorf("%s after the device was shared: %v", p1, err)
	}
	checkPartitions(t, d, []part{{start: 2048, sectors: 4096}})
}
