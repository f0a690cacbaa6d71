//go:build integration

package loopctl

import (
	"fmt"
	"os"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/kerneltest"
	"github.com/loopctl/loopctl/internal/sysfs"
)

// factPrefix starts each line TestKernelFacts prints, which internal/vmrun
// -facts gathers from every machine into KERNELS.md.
const factPrefix = "kernel-fact: "

// The facts KERNELS.md tabulates, in its order: what the kernel answers
// where kernels differ, each asked with raw system calls, on devices of
// the test's own.
var kernelFacts = []struct {
	name  string
	probe func(t *testing.T, c *Control) string
}{
	{"LOOP_CTL_ADD -1, an unbound device", factAddAny},
	{"LOOP_CTL_REMOVE -1", factRemoveAny},
	{"LOOP_CLR_FD by the only opener", factClearAlone},
	{"direct I/O on tmpfs", factDirectIOTmpfs},
	{"block size above the page size", factBigBlocks},
	{"LOOP_SET_BLOCK_SIZE, held exclusive", func(t *testing.T, c *Control) string {
		return factHeldExclusive(t, c, func(h handle) error { _, err := ioctl(h, reqSetBlockSize, 4096); return err })
	}},
	{"LOOP_SET_STATUS64, held exclusive", func(t *testing.T, c *Control) string {
		return factHeldExclusive(t, c, func(h handle) error {
			var info unix.LoopInfo64
			if err := ioctlPtr(h, reqGetStatus64, unsafe.Pointer(&info)); err != nil {
				return err
			}
			info.Sizelimit = 512 << 10
			return ioctlPtr(h, reqSetStatus64, unsafe.Pointer(&info))
		})
	}},
	{"a partition added by hand, after detach", factHandPartition},
	{"an open after LOOP_CONFIGURE scans", factConfigureMarksScan},
	{"MBR partitions found", func(t *testing.T, c *Control) string { return factParser(t, c, writeMBR) }},
	{"GPT partitions found", func(t *testing.T, c *Control) string { return factParser(t, c, writeGPT) }},
	{"LOOP_CTL_ADD 1<<20", factAddHuge}, // last: see factAddHuge
}

// TestKernelFacts prints, as "kernel-fact: NAME: ANSWER" lines, what this
// kernel answers to each call KERNELS.md tabulates, and fails on an answer
// that is none of those the table knows: a kernel that behaves in a new
// way, which the package may not handle.
func TestKernelFacts(t *testing.T) {
	kerneltest.Require(t)
	c := openControl(t)
	known := map[string]bool{"new": true, "taken": true, "removes": true, "detach": true, "at close": true,
		"on": true, "off": true, "64 KiB": true, "changed": true, "yes": true, "no": true, "not asked": true,
		"EEXIST": true, "EINVAL": true, "EBUSY": true, "kept": true, "at open": true}
	fmt.Printf("%s%s: %s\n", factPrefix, "kernel", kerneltest.Release())
	for _, f := range kernelFacts {
		// A subtest each, so that each fact's devices are gone before
		// the next is asked.
		t.Run(f.name, func(t *testing.T) {
			answer := f.probe(t, c)
			fmt.Printf("%s%s: %s\n", factPrefix, f.name, answer)
			if !known[answer] {
				t.Errorf("%s, an answer KERNELS.md does not know", answer)
			}
		})
	}
}

// errnoName names err, an errno, as the kernel's headers do.
func errnoName(t *testing.T, err error) string {
	t.Helper()
	errno, ok := err.(unix.Errno)
	if !ok {
		t.Fatalf("%v: not an errno", err)
	}
	return unix.ErrnoName(errno)
}

// rawAdd makes LOOP_CTL_ADD n (n may be negative) on the control device.
func rawAdd(c *Control, n int) (int, error) {
	return ioctl(c.h, reqCtlAdd, uintptr(n))
}

// factAddAny: LOOP_CTL_ADD -1 while an unbound device exists made a new
// device from 5.14 on; before, it answered EEXIST.
func factAddAny(t *testing.T, c *Control) string {
	newDevice(t, c) // unbound, whatever the others are
	n, err := rawAdd(c, -1)
	if err != nil {
		return errnoName(t, err)
	}
	if err := c.Remove(n); err != nil {
		t.Fatal(err)
	}
	return "new"
}

// mayChangeOthers tells whether a call that some kernels answer by
// changing devices not the test's, or breaking one, may be made: on 6.1
// and later, which refuse those calls, or in a machine of the tests' own
// (LOOPCTL_IN_VM) that gathers the facts alone (LOOPCTL_FACTS, set by
// vmrun -facts), where nothing runs after them.
func mayChangeOthers(t *testing.T) bool {
	return kerneltest.AtLeast(t, 6, 1) || os.Getenv("LOOPCTL_IN_VM") == "1" && os.Getenv("LOOPCTL_FACTS") == "1"
}

// factAddHuge: LOOP_CTL_ADD of a number beyond the minor numbers, which
// 5.10 takes, making a broken device whose number overflows into another
// major's (loop1048576 as 7:0): its LOOP_CTL_REMOVE then oopses that
// kernel (a NULL dereference in del_gendisk). So the device stays, in a
// machine of the test's own, and the fact is asked last.
func factAddHuge(t *testing.T, c *Control) string {
	if !mayChangeOthers(t) {
		return "not asked"
	}
	if _, err := rawAdd(c, 1<<20); err != nil {
		return errnoName(t, err)
	}
	if !kerneltest.AtLeast(t, 6, 1) {
		return "taken"
	}
	t.Errorf("LOOP_CTL_ADD 1<<20 made a device on kernel %s, which may not be removed safely", kerneltest.Release())
	return "taken"
}

// factRemoveAny: LOOP_CTL_REMOVE -1, which 5.10 takes, removing whichever
// unbound device it finds first.
func factRemoveAny(t *testing.T, c *Control) string {
	if !mayChangeOthers(t) {
		return "not asked"
	}
	if _, err := ioctl(c.h, reqCtlRemove, ^uintptr(0)); err != nil {
		return errnoName(t, err)
	}
	return "removes"
}

// bindRaw binds a new file of size bytes in dir ("" for the temporary
// directory) to a new device of the test's own with LOOP_CONFIGURE and
// cfg, and returns the device and the kernel's answer; the device is
// unbound, closed and removed at the test's end.
func bindRaw(t *testing.T, c *Control, dir string, size int64, cfg unix.LoopConfig) (*Device, error) {
	t.Helper()
	d := newDevice(t, c)
	var f *os.File
	if dir == "" {
		f = kerneltest.TempFile(t, size)
	} else {
		f = fileIn(t, dir, size)
	}
	cfg.Fd = uint32(mustFd(t, f))
	return d, ioctlPtr(d.h, reqConfigure, unsafe.Pointer(&cfg))
}

// factClearAlone: LOOP_CLR_FD by the device's only opener detached at
// once before 6.11, and at the last close since.
func factClearAlone(t *testing.T, c *Control) string {
	if _, err := os.Stat("/run/udev/control"); err == nil {
		return "not asked" // udev opens the device as it changes: not alone
	}
	d, err := bindRaw(t, c, "", 1<<20, unix.LoopConfig{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ioctl(d.h, reqClearFD, 0); err != nil {
		t.Fatal(err)
	}
	_, err = os.Stat(sysfs.LoopAttr(sysfs.Root, d.Number(), ""))
	d.Close()
	kerneltest.WaitUnbound(t, d.Number())
	if err != nil {
		return "detach"
	}
	return "at close"
}

// factDirectIOTmpfs: LOOP_CONFIGURE with direct I/O of a file on tmpfs,
// which has O_DIRECT from 6.6 on; before, the kernel bound it buffered.
func factDirectIOTmpfs(t *testing.T, c *Control) string {
	d, err := bindRaw(t, c, mountT(t, "tmpfs", 0), 1<<20, unix.LoopConfig{Info: unix.LoopInfo64{Flags: unix.LO_FLAGS_DIRECT_IO}})
	if err != nil {
		return errnoName(t, err)
	}
	var info unix.LoopInfo64
	if err := ioctlPtr(d.h, reqGetStatus64, unsafe.Pointer(&info)); err != nil {
		t.Fatal(err)
	}
	if info.Flags&unix.LO_FLAGS_DIRECT_IO != 0 {
		return "on"
	}
	return "off"
}

// factBigBlocks: a logical block size of 64 KiB, above a 4 KiB page.
func factBigBlocks(t *testing.T, c *Control) string {
	if _, err := bindRaw(t, c, "", 1<<20, unix.LoopConfig{Size: 64 << 10}); err != nil {
		return errnoName(t, err)
	}
	return "64 KiB"
}

// factHeldExclusive: a change of a bound device that another opener
// holds with O_EXCL, as a mounted file system does.
func factHeldExclusive(t *testing.T, c *Control, change func(h handle) error) string {
	d, err := bindRaw(t, c, "", 1<<20, unix.LoopConfig{})
	if err != nil {
		t.Fatal(err)
	}
	excl, err := unix.Open(d.Path(), unix.O_RDONLY|unix.O_EXCL|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(excl)
	if err := change(d.h); err != nil {
		return errnoName(t, err)
	}
	return "changed"
}

// factParser: whether the kernel finds the partitions of a table written
// by write, as partition scanning does where the kernel has its parser.
func factParser(t *testing.T, c *Control, write func(f *os.File, size uint64, parts []part) error) string {
	const size = 8 << 20
	f := kerneltest.TempFile(t, size)
	if err := write(f, size, []part{{start: 2048, sectors: 4096}}); err != nil {
		t.Fatal(err)
	}
	d := newDevice(t, c)
	if err := d.Configure(f, Options{Flags: FlagPartScan}); err != nil {
		t.Fatal(err)
	}
	parts, err := d.Partitions()
	if err != nil {
		t.Fatal(err)
	}
	if len(parts) == 1 {
		return "yes"
	}
	return "no"
}

// rawPartition adds (op BLKPG_ADD_PARTITION) or deletes partition m of
// the device open as h, start and length in bytes, with BLKPG, as
// util-linux's addpart and delpart do.
func rawPartition(h handle, op int32, m int, start, length int64) error {
	p := unix.BlkpgPartition{Start: start, Length: length, Pno: int32(m)}
	arg := unix.BlkpgIoctlArg{Op: op, Datalen: int32(unsafe.Sizeof(p)), Data: (*byte)(unsafe.Pointer(&p))}
	return ioctlPtr(h, reqBLKPG, unsafe.Pointer(&arg))
}

// hasPartition1 tells whether device n shows partition 1 in sysfs.
func hasPartition1(n int) bool {
	_, err := os.Stat(sysfs.LoopDir(sysfs.Root, n) + "/" + sysfs.PartitionName(n, 1))
	return err == nil
}

// factHandPartition: a partition added with BLKPG to a binding without
// LO_FLAGS_PARTSCAN, after the detach: kept, for the next binding to
// show (5.10, 6.12); dropped at the device's next open (6.1); or at
// the detach (7.2, kernel commit c4f4c0fc551c).
func factHandPartition(t *testing.T, c *Control) string {
	if _, err := os.Stat("/run/udev/control"); err == nil {
		return "not asked" // udev opens the device as it changes
	}
	d, err := bindRaw(t, c, "", 8<<20, unix.LoopConfig{})
	if err != nil {
		t.Fatal(err)
	}
	n := d.Number()
	if err := rawPartition(d.h, unix.BLKPG_ADD_PARTITION, 1, 1<<20, 4<<20); err != nil {
		t.Fatal(err)
	}
	if _, err := ioctl(d.h, reqClearFD, 0); err != nil {
		t.Fatal(err)
	}
	d.Close()
	kerneltest.WaitUnbound(t, n)
	if !hasPartition1(n) {
		return "detach"
	}
	d, err = OpenDevice(n)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if !hasPartition1(n) {
		return "at open"
	}
	if err := rawPartition(d.h, unix.BLKPG_DEL_PARTITION, 1, 0, 0); err != nil {
		t.Fatal(err)
	}
	return "kept"
}

// factConfigureMarksScan: whether LOOP_CONFIGURE leaves the disk marked
// for a partition scan, which the next open of the disk runs: it then
// drops a partition added by hand since. Where it does, a binding with
// LO_FLAGS_PARTSCAN announced before the kernel's own scan can be
// scanned first by an open in between, and then again (6.1).
func factConfigureMarksScan(t *testing.T, c *Control) string {
	if _, err := os.Stat("/run/udev/control"); err == nil {
		return "not asked" // udev opens the device as it changes
	}
	d, err := bindRaw(t, c, "", 8<<20, unix.LoopConfig{})
	if err != nil {
		t.Fatal(err)
	}
	if err := rawPartition(d.h, unix.BLKPG_ADD_PARTITION, 1, 1<<20, 4<<20); err != nil {
		t.Fatal(err)
	}
	fd, err := unix.Open(d.Path(), unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	unix.Close(fd)
	if !hasPartition1(d.Number()) {
		return "yes"
	}
	if err := rawPartition(d.h, unix.BLKPG_DEL_PARTITION, 1, 0, 0); err != nil {
		t.Fatal(err)
	}
	return "no"
}
