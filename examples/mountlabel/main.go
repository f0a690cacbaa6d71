//go:build linux

// Command mountlabel does what image builders do with a disk image: it
// makes one with a partition table and an ext4 file system labelled in
// its first partition, binds it to a loop device with partition scanning,
// waits until udev has seen the binding (uevent.WaitUdev: no `udevadm
// settle`, which waits for every device of the machine), mounts the
// partition by its label, /dev/disk/by-label/LABEL, writes a file, and
// undoes it all.
//
// It needs root, udev running (the by-label links are udev's work), and
// mkfs.ext4: go run ./examples/mountlabel (sudo on a workstation).
package main

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl"
	"github.com/loopctl/loopctl/uevent"
)

func main() {
	log.SetFlags(0)
	log.SetPrefix("mountlabel: ")
	if err := run(); err != nil {
		if errors.Is(err, fs.ErrPermission) {
			log.Print("loop devices and mounts need root: run it as root (sudo go run ./examples/mountlabel)")
		}
		log.Fatal(err)
	}
}

// The image: 64 MiB, an MBR whose one Linux partition starts at 1 MiB.
const (
	imageSize  = 64 << 20
	partStart  = 1 << 20
	sectorSize = 512
)

func run() error {
	if _, err := os.Stat("/run/udev/control"); err != nil {
		return errors.New("no udev runs here: /dev/disk/by-label links are udev's work (Debian: apt-get install udev)")
	}
	dir, err := os.MkdirTemp("", "loopctl-mountlabel-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	label := "LOOPCTL" + strconv.Itoa(os.Getpid()%100000)
	image := filepath.Join(dir, "disk.img")
	if err := makeImage(image, label); err != nil {
		return err
	}

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	d, err := loopctl.Attach(ctx, image, loopctl.Options{Flags: loopctl.FlagPartScan})
	if err != nil {
		return err
	}
	defer d.Close()
	fmt.Printf("bound %s to %s\n", image, d.Path())
	parts, err := d.Partitions()
	if err != nil {
		return err
	}
	unlock := func() {}
	defer func() { unlock() }()
	if len(parts) == 0 {
		// A kernel built without the MBR parser (CONFIG_MSDOS_PARTITION)
		// reads no table: the partition is added as partx would. udev
		// re-reads a disk's table (BLKRRPART), which would drop it, when
		// a writer closes the disk, unless someone holds a lock on the
		// disk: a shared one, as here, which udev's probes share, until
		// the file system is mounted (a mounted partition stays).
		if unlock, err = lockShared(d.Path()); err != nil {
			return err
		}
		fmt.Println("the kernel read no partition table: adding partition 1 with BLKPG (addpart)")
		size := strconv.Itoa((imageSize - partStart) / sectorSize)
		if out, err := exec.Command("addpart", d.Path(), "1", strconv.Itoa(partStart/sectorSize), size).CombinedOutput(); err != nil {
			return fmt.Errorf("addpart: %v: %s", err, out)
		}
	}

	start := time.Now()
	if err := uevent.WaitUdev(ctx, d); err != nil {
		return err
	}
	link := "/dev/disk/by-label/" + label
	node, err := filepath.EvalSymlinks(link)
	if err != nil {
		return err
	}
	fmt.Printf("udev has seen the binding after %v: %s is %s\n", time.Since(start).Round(time.Millisecond), link, node)

	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		return err
	}
	if err := unix.Mount(link, mnt, "ext4", 0, ""); err != nil {
		return &os.PathError{Op: "mount", Path: link, Err: err}
	}
	unlock() // mounted, the partition stays; Detach would wait for the lock's descriptor
	if err := os.WriteFile(filepath.Join(mnt, "hello"), []byte("written through "+node+"\n"), 0o644); err != nil {
		unix.Unmount(mnt, 0)
		return err
	}
	fmt.Printf("mounted %s on %s, wrote hello\n", link, mnt)
	if err := unix.Unmount(mnt, 0); err != nil {
		return &os.PathError{Op: "unmount", Path: mnt, Err: err}
	}
	// Detach returns once the kernel has let go of the image, which the
	// deferred RemoveAll then deletes.
	if err := d.Detach(ctx); err != nil {
		return err
	}
	fmt.Printf("unmounted, detached %s\n", d.Path())
	return nil
}

// makeImage writes the image: an MBR with one Linux partition from 1 MiB
// to the end, holding an ext4 file system labelled label.
func makeImage(path, label string) error {
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		return err
	}
	if err := os.Truncate(path, imageSize); err != nil {
		return err
	}
	size := strconv.Itoa((imageSize-partStart)/1024) + "k"
	out, err := exec.Command("mkfs.ext4", "-q", "-F", "-L", label, "-E", "offset="+strconv.Itoa(partStart), path, size).CombinedOutput()
	if err != nil {
		return fmt.Errorf("mkfs.ext4: %v: %s", err, out)
	}
	var mbr [sectorSize]byte
	entry := mbr[446:462]
	entry[4] = 0x83 // Linux
	binary.LittleEndian.PutUint32(entry[8:], partStart/sectorSize)
	binary.LittleEndian.PutUint32(entry[12:], (imageSize-partStart)/sectorSize)
	mbr[510], mbr[511] = 0x55, 0xaa
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	if _, err := f.WriteAt(mbr[:], 0); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// lockShared takes a shared lock (flock) of the device at path, on a
// read-only descriptor of its own, and returns what releases it.
func lockShared(path string) (func(), error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	if err := unix.Flock(fd, unix.LOCK_SH); err != nil {
		unix.Close(fd)
		return nil, &os.PathError{Op: "flock", Path: path, Err: err}
	}
	var once sync.Once
	return func() { once.Do(func() { unix.Close(fd) }) }, nil
}
