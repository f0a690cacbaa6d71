// Command demo shows loopctl at work: it makes a temporary disk image,
// attaches it to a free loop device found through /dev/loop-control, prints
// the device as one row of `losetup --list`, writes a block through
// /dev/loopN and reads it back, then detaches and cleans up.
//
// It needs root: go run ./examples/demo (sudo on a workstation).
package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log"
	"os"
	"path/filepath"
	"text/tabwriter"

	"github.com/loopctl/loopctl"
)

func main() {
	log.SetFlags(0)
	log.SetPrefix("demo: ")
	if err := run(); err != nil {
		if errors.Is(err, fs.ErrPermission) {
			log.Print("loop devices need root: run it as root (sudo go run ./examples/demo)")
		}
		log.Fatal(err)
	}
}

func run() error {
	dir, err := os.MkdirTemp("", "loopctl-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	image := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(image, nil, 0o600); err != nil {
		return err
	}
	if err := os.Truncate(image, 8<<20); err != nil {
		return err
	}

	// LOOP_CTL_GET_FREE, open /dev/loopN, one LOOP_CONFIGURE: retried if
	// another process takes the device first.
	d, err := loopctl.Attach(context.Background(), image, loopctl.Options{})
	if err != nil {
		return err
	}
	defer d.Close()
	defer d.ClearFD() // runs before Close; a no-op once detached below

	s, err := d.Status()
	if err != nil {
		return err
	}
	printRow(d, s)

	block := bytes.Repeat([]byte("loopctl!"), 512) // 4 KiB
	const at = 1 << 20
	if err := roundTrip(d.Path(), block, at); err != nil {
		return err
	}
	// What went through the device landed in the image.
	img, err := os.ReadFile(image)
	if err != nil {
		return err
	}
	if !bytes.Equal(img[at:at+len(block)], block) {
		return fmt.Errorf("%s does not hold the block written through %s", image, d.Path())
	}
	fmt.Printf("wrote %d bytes at offset %d through %s, read them back, found them in %s\n",
		len(block), at, d.Path(), filepath.Base(image))

	if err := d.ClearFD(); err != nil {
		return err
	}
	fmt.Printf("detached %s\n", d.Path())
	return nil
}

// roundTrip writes block at off through the device and reads it back.
func roundTrip(dev string, block []byte, off int64) error {
	f, err := os.OpenFile(dev, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := f.WriteAt(block, off); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return err
	}
	got := make([]byte, len(block))
	if _, err := f.ReadAt(got, off); err != nil {
		return err
	}
	if !bytes.Equal(got, block) {
		return fmt.Errorf("%s: read back differs from what was written", dev)
	}
	return nil
}

// printRow prints the device as `losetup --list` does.
func printRow(d *loopctl.Device, s loopctl.Status) {
	bit := func(f loopctl.Flags) int {
		if s.Flags&f != 0 {
			return 1
		}
		return 0
	}
	w := tabwriter.NewWriter(os.Stdout, 0, 0, 1, ' ', 0)
	fmt.Fprintln(w, "NAME\tSIZELIMIT\tOFFSET\tAUTOCLEAR\tRO\tBACK-FILE\tDIO\tLOG-SEC")
	fmt.Fprintf(w, "%s\t%d\t%d\t%d\t%d\t%s\t%d\t%d\n", d.Path(), s.SizeLimit, s.Offset,
		bit(loopctl.FlagAutoClear), bit(loopctl.FlagReadOnly), s.BackingFile, bit(loopctl.FlagDirectIO), s.BlockSize)
	w.Flush()
}
