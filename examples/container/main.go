//go:build linux

// Command container binds a disk image inside a container whose /dev is a
// tmpfs, as container runtimes give it: there the kernel makes no
// /dev/loopN nodes, and a program given only /dev/loop-control
// (`docker run --device /dev/loop-control --cap-add MKNOD
// --device-cgroup-rule 'b 7:* rwm' ...`) finds that LOOP_CTL_GET_FREE names a device it cannot open.
// With Options.MakeNode, Attach makes the device's node (and, with
// FlagPartScan, its partitions'), from the numbers sysfs gives, and goes
// on; without it, the error carries the device's number
// (*loopctl.NodeMissingError), so that the program can make the node
// itself.
//
// To show it on any machine, it starts itself again in a container of its
// own: a new mount namespace whose /dev is a tmpfs holding only
// loop-control, null and zero. It writes an image with a partition table,
// binds it there, writes and reads a block through the partition's node,
// and undoes it all. It needs root: go run ./examples/container (sudo on a
// workstation). Inside a real container, run it with -inside.
package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl"
)

var inside = flag.Bool("inside", false, "run in the container this program is in, rather than start one")

// childEnv marks the process started inside the container this program
// makes; it names the image.
const childEnv = "LOOPCTL_EXAMPLE_CONTAINER_IMAGE"

func main() {
	log.SetFlags(0)
	log.SetPrefix("container: ")
	flag.Parse()
	var err error
	switch image := os.Getenv(childEnv); {
	case image != "":
		err = containerDev()
		if err == nil {
			err = bind(image)
		}
	case *inside:
		err = withImage(bind)
	default:
		err = withImage(startContainer)
	}
	if errors.Is(err, fs.ErrPermission) {
		log.Print("it needs root, and in a container CAP_MKNOD " +
			"and a device rule for block devices 7:* and 259:* (see the README)")
	}
	if err != nil {
		log.Fatal(err)
	}
}

// The image: 8 MiB, an MBR whose one Linux partition of 4 MiB starts at
// 1 MiB.
const (
	imageSize = 8 << 20
	partStart = 1 << 20
	partSize  = 4 << 20
)

// withImage makes the image, and runs f with its path.
func withImage(f func(image string) error) error {
	dir, err := os.MkdirTemp("", "loopctl-container-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	image := filepath.Join(dir, "disk.img")
	mbr := make([]byte, 512)
	e := mbr[446:]
	e[4] = 0x83                                         // Linux
	binary.LittleEndian.PutUint32(e[8:], partStart/512) // first sector
	binary.LittleEndian.PutUint32(e[12:], partSize/512) // sectors
	mbr[510], mbr[511] = 0x55, 0xaa
	if err := os.WriteFile(image, mbr, 0o600); err != nil {
		return err
	}
	if err := os.Truncate(image, imageSize); err != nil {
		return err
	}
	return f(image)
}

// startContainer runs this program again in a new mount namespace, where
// containerDev gives it a container's /dev.
func startContainer(image string) error {
	self, err := os.Executable()
	if err != nil {
		return err
	}
	cmd := exec.Command(self)
	cmd.Env = append(os.Environ(), childEnv+"="+image)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS}
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("the container: %w", err)
	}
	return nil
}

// containerDev puts over /dev a tmpfs holding only loop-control, null and
// zero, as a runtime passed --device /dev/loop-control makes it.
func containerDev() error {
	names := []string{"loop-control", "null", "zero"}
	nodes := make([]unix.Stat_t, len(names))
	for i, name := range names {
		if err := unix.Stat("/dev/"+name, &nodes[i]); err != nil {
			return &fs.PathError{Op: "stat", Path: "/dev/" + name, Err: err}
		}
	}
	if err := unix.Mount("tmpfs", "/dev", "tmpfs", unix.MS_NOSUID, "mode=755"); err != nil {
		return &fs.PathError{Op: "mount tmpfs on", Path: "/dev", Err: err}
	}
	for i, name := range names {
		if err := unix.Mknod("/dev/"+name, nodes[i].Mode, int(nodes[i].Rdev)); err != nil {
			return &fs.PathError{Op: "mknod", Path: "/dev/" + name, Err: err}
		}
	}
	fmt.Println("in a container whose /dev holds only loop-control, null and zero")
	return nil
}

// bind does what a program in the container does: it binds the image
// with partition scanning, making the nodes the container lacks, uses the
// partition, and detaches.
func bind(image string) error {
	ctx := context.Background()
	o := loopctl.Options{Flags: loopctl.FlagPartScan}

	// Without MakeNode, a missing node fails at once, with its number.
	d, err := loopctl.Attach(ctx, image, o)
	var missing *loopctl.NodeMissingError
	switch {
	case errors.As(err, &missing):
		fmt.Printf("without MakeNode: loop%d has no node (%v)\n", missing.Number, errors.Unwrap(missing))
	case err != nil:
		return err
	default:
		fmt.Println("the container has the nodes already: /dev is devtmpfs, or they were passed in")
		d.ClearFD()
		d.Close()
	}

	o.MakeNode = true
	d, err = loopctl.Attach(ctx, image, o)
	if err != nil {
		return err
	}
	defer d.Close()
	defer d.ClearFD()
	parts, err := d.Partitions()
	if err != nil {
		return err
	}
	// Where to write: the partition, through its node, at its start in
	// the image; on a kernel built without MS-DOS partition tables, which
	// finds none, the same place through the device.
	node, at, start := d.Path(), int64(partStart), int64(partStart) // at: in the node; start: in the image
	if len(parts) > 0 {
		node, at, start = parts[0].Path, 0, int64(parts[0].Start)
		fmt.Printf("bound %s with MakeNode; its partition %s starts at %d\n", d.Path(), node, start)
	} else {
		fmt.Printf("bound %s with MakeNode; the kernel found no partition (built without MS-DOS tables)\n", d.Path())
	}

	block := bytes.Repeat([]byte("written through the partition "), 200)[:4096]
	w, err := os.OpenFile(node, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer w.Close()
	if _, err := w.WriteAt(block, at); err != nil {
		return err
	}
	if err := w.Sync(); err != nil {
		return err
	}
	f, err := os.Open(image)
	if err != nil {
		return err
	}
	defer f.Close()
	got := make([]byte, len(block))
	if _, err := f.ReadAt(got, start); err != nil {
		return err
	}
	if !bytes.Equal(got, block) {
		return errors.New("the block written through " + node + " is not in the image")
	}
	fmt.Printf("wrote 4096 bytes through %s; they are in the image at %d\n", node, start)
	return nil
}
