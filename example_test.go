package loopctl_test

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log"
	"os"

	"github.com/loopctl/loopctl"
)

// Attach a disk image read-only, use the device, and let the kernel detach
// it when the last user closes it.
func Example() {
	d, err := loopctl.Attach(context.Background(), "/var/lib/images/rootfs.img", loopctl.Options{
		Flags: loopctl.FlagReadOnly | loopctl.FlagAutoClear,
	})
	if err != nil {
		log.Fatal(err)
	}
	defer d.Close() // the last close detaches: FlagAutoClear

	fmt.Println("mount", d.Path(), "read-only")
}

// Attach a partition inside an image: 1 MiB in, 64 MiB long, with 4 KiB
// logical blocks.
func ExampleAttach() {
	d, err := loopctl.Attach(context.Background(), "/tmp/disk.img", loopctl.Options{
		Offset:    1 << 20,
		SizeLimit: 64 << 20,
		BlockSize: 4096,
	})
	if err != nil {
		log.Fatal(err)
	}
	defer d.Close()
	defer d.ClearFD() // detach before closing

	s, err := d.Status()
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("%s: %s at offset %d\n", d.Path(), s.BackingFile, s.Offset)
}

// Start many containers from one read-only image with one loop device
// between them: Reuse returns the device already bound to the image, and a
// container does not detach a device it shares.
func ExampleOptions_reuse() {
	d, err := loopctl.Attach(context.Background(), "/var/lib/images/rootfs.img", loopctl.Options{
		Flags: loopctl.FlagReadOnly | loopctl.FlagAutoClear,
		Reuse: true,
	})
	var overlap *loopctl.OverlapError
	if errors.As(err, &overlap) {
		log.Fatalf("%s holds part of the image with other settings", overlap.Device)
	}
	if err != nil {
		log.Fatal(err)
	}
	defer d.Close() // autoclear: the last user's close detaches
	fmt.Println("mount", d.Path(), "shared:", d.Shared())
}

// Bind by hand, with the control device: the steps Attach takes, less the
// lock on /dev/loop-control that keeps other careful attachers away.
// Another process may take the device between GetFree and Configure (ErrBusy
// from Configure), or bind it and let go of it before OpenDevice (an error
// matching ErrNotBound: since Linux 6.11 a device being detached refuses
// opens); either way, ask for another.
func ExampleControl_GetFree() {
	c, err := loopctl.Open()
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	f, err := os.OpenFile("/tmp/disk.img", os.O_RDWR, 0)
	if err != nil {
		log.Fatal(err)
	}
	defer f.Close()

	for range 10 {
		n, err := c.GetFree()
		if err != nil {
			log.Fatal(err)
		}
		d, err := loopctl.OpenDevice(n)
		if errors.Is(err, loopctl.ErrNotBound) {
			continue // being torn down by another process
		}
		if err != nil {
			log.Fatal(err)
		}
		err = d.Configure(f, loopctl.Options{})
		if errors.Is(err, loopctl.ErrBusy) {
			d.Close()
			continue // someone else bound it first
		}
		if err != nil {
			log.Fatal(err)
		}
		fmt.Println("bound", d.Path())
		d.ClearFD()
		d.Close()
		return
	}
}

// Create and remove a device of one's own.
func ExampleControl_Add() {
	c, err := loopctl.Open()
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	n, err := c.Add(loopctl.AnyNumber)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("created", loopctl.DevicePath(n))
	if err := c.Remove(n); err != nil {
		log.Fatal(err)
	}
}

// List every bound loop device, as `losetup --list` does. List reads sysfs
// and needs no privilege.
func ExampleList() {
	devs, err := loopctl.List()
	if err != nil {
		log.Fatal(err)
	}
	for _, s := range devs {
		deleted := ""
		if s.Deleted() {
			deleted = " (its file is gone)"
		}
		fmt.Printf("%s: %s [%v]%s\n", loopctl.DevicePath(s.Number), s.BackingFile, s.Flags, deleted)
	}
}

// Find the devices a file is attached to, as `losetup -j` does: by device
// and inode, so another name for the same file finds them too.
func ExampleFindByBackingFile() {
	devs, err := loopctl.FindByBackingFile("/tmp/disk.img")
	if err != nil {
		log.Fatal(err)
	}
	for _, s := range devs {
		fmt.Println(loopctl.DevicePath(s.Number))
	}
}

// Detach what an earlier run of a program, killed before it could clean up,
// left bound to its image: without FlagAutoClear a binding outlives its
// process. ClearFD starts the detach; it ends when the last opener closes
// the device, here the Close below, unless something else (a mount) still
// holds it.
func ExampleDevice_ClearFD() {
	devs, err := loopctl.FindByBackingFile("/var/lib/myapp/disk.img")
	if err != nil {
		log.Fatal(err)
	}
	for _, s := range devs {
		d, err := loopctl.OpenDevice(s.Number)
		if errors.Is(err, loopctl.ErrNotBound) {
			continue // being detached already
		}
		if err != nil {
			log.Fatal(err)
		}
		if err := d.ClearFD(); err != nil && !errors.Is(err, loopctl.ErrNotBound) {
			log.Fatal(err)
		}
		d.Close()
		fmt.Println("detached", d.Path())
	}
}

// Attach a disk image with partition scanning and use its partitions:
// /dev/loopNp1, /dev/loopNp2, ... In a container whose /dev is not devtmpfs
// the nodes may be missing; MakeNode creates them, when asked to.
func ExampleDevice_Partitions() {
	d, err := loopctl.Attach(context.Background(), "/var/lib/images/disk.img", loopctl.Options{
		Flags: loopctl.FlagPartScan | loopctl.FlagAutoClear,
	})
	if err != nil {
		log.Fatal(err)
	}
	defer d.Close()

	parts, err := d.Partitions()
	if err != nil {
		log.Fatal(err)
	}
	for _, p := range parts {
		if err := p.MakeNode(); err != nil {
			log.Fatal(err)
		}
		fmt.Printf("%s: %d bytes at %d\n", p.Path, p.Size, p.Start)
	}
}

// After writing a new partition table to a device bound with FlagPartScan,
// have the kernel read it.
func ExampleDevice_Rescan() {
	d, err := loopctl.OpenDevicePath("/dev/loop3")
	if err != nil {
		log.Fatal(err)
	}
	defer d.Close()
	// ... write the new table through d.Path() ...
	if err := d.Rescan(); err != nil {
		log.Fatal(err)
	}
}

// Grow a device after its backing file grew.
func ExampleDevice_SetCapacity() {
	d, err := loopctl.OpenDevicePath("/dev/loop3")
	if err != nil {
		log.Fatal(err)
	}
	defer d.Close()
	if err := os.Truncate("/tmp/disk.img", 128<<20); err != nil {
		log.Fatal(err)
	}
	if err := d.SetCapacity(); err != nil {
		log.Fatal(err)
	}
}

// Errors say which operation failed on which device, and match both the
// kernel's errno and portable sentinels.
func ExampleError() {
	d, err := loopctl.OpenDevice(7)
	if err != nil {
		log.Fatal(err)
	}
	defer d.Close()
	_, err = d.Status()
	var e *loopctl.Error
	switch {
	case errors.Is(err, loopctl.ErrNotBound):
		fmt.Println(d.Path(), "is free")
	case errors.Is(err, fs.ErrPermission):
		fmt.Println("run as root")
	case errors.As(err, &e):
		fmt.Println(e.Op, "failed on", e.Path, ":", e.Err)
	}
}
