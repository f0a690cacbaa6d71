package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl"
)

// The data path: how fast data moves through a loop device bound each way,
// and what it leaves in the page cache, against the backing file itself.

var (
	dataSize   = flag.Int64("datasize", 256<<20, "bytes of the image the data-path table reads and writes")
	dataDir    = flag.String("datadir", "/var/tmp", "a directory on ext4 for the data-path table's ext4 rows")
	dataRounds = flag.Int("datarounds", 3, "measure each data-path row this many times; the median is reported")
)

// randomReads is how many 4 KiB reads one random-read measurement makes.
const randomReads = 4096

// A dataMode is one way of reaching the image's bytes.
type dataMode struct {
	name string
	file bool // the backing file itself, not a loop device
	opts loopctl.Options
}

var dataModes = []dataMode{
	{name: "backing file, read directly", file: true},
	{name: "loop device, buffered"},
	{name: "loop device, direct I/O", opts: loopctl.Options{Flags: loopctl.FlagDirectIO}},
	{name: "loop device, direct I/O, 4096-byte blocks", opts: loopctl.Options{Flags: loopctl.FlagDirectIO, BlockSize: 4096}},
}

// A dataRow is one mode on one file system: the medians of the rounds.
type dataRow struct {
	fs, mode        string
	seqRead         []float64 // MB/s
	seqWrite        []float64 // MB/s
	randRead        []float64 // reads/s
	cached, buffers []float64 // MiB the sequential read added to Cached and Buffers
	skipped         string    // why the mode could not run there
}

// dataPath measures every mode on ext4 (the directory given, if it is on
// ext4) and on a tmpfs of its own.
func (h *harness) dataPath() error {
	dirs := []struct{ fs, dir string }{}
	ext4 := filepath.Join(*dataDir, "loopctl-bench-data")
	if err := os.MkdirAll(ext4, 0o755); err != nil {
		return err
	}
	defer os.RemoveAll(ext4)
	var sfs unix.Statfs_t
	if err := unix.Statfs(ext4, &sfs); err == nil && sfs.Type == unix.EXT4_SUPER_MAGIC {
		dirs = append(dirs, struct{ fs, dir string }{"ext4", ext4})
	} else {
		log.Printf("%s is not on ext4: the data-path table has no ext4 rows", *dataDir)
	}
	tmpfs := filepath.Join(h.dir, "tmpfs")
	if err := os.Mkdir(tmpfs, 0o755); err != nil {
		return err
	}
	if err := unix.Mount("tmpfs", tmpfs, "tmpfs", 0, "size="+strconv.FormatInt(*dataSize+(64<<20), 10)); err != nil {
		return fmt.Errorf("mount tmpfs: %w", err)
	}
	defer unix.Unmount(tmpfs, unix.MNT_DETACH)
	dirs = append(dirs, struct{ fs, dir string }{"tmpfs", tmpfs})

	for _, d := range dirs {
		img := filepath.Join(d.dir, "data.img")
		log.Printf("data path on %s: writing a %d MiB image", d.fs, *dataSize>>20)
		if err := fillImage(img, *dataSize); err != nil {
			return err
		}
		rows := make([]*dataRow, len(dataModes))
		for i, m := range dataModes {
			rows[i] = &dataRow{fs: d.fs, mode: m.name}
		}
		for round := range *dataRounds {
			for i := range dataModes {
				j := (round + i) % len(dataModes)
				if rows[j].skipped != "" {
					continue
				}
				if err := h.dataRound(img, dataModes[j], rows[j]); err != nil {
					if errors.Is(err, loopctl.ErrNoDirectIO) {
						rows[j].skipped = "no direct I/O on this file system here"
						continue
					}
					return fmt.Errorf("data path, %s, %s: %w", d.fs, dataModes[j].name, err)
				}
			}
		}
		h.data = append(h.data, rows...)
		os.Remove(img)
	}
	return nil
}

// dataRound measures mode once on img: a sequential read from a dropped
// cache, with the page cache it adds; 4 KiB reads at random offsets, with
// O_DIRECT on the node (so that each reaches the loop driver), from a
// dropped cache; and a sequential write, synced.
func (h *harness) dataRound(img string, mode dataMode, r *dataRow) error {
	path := img
	if !mode.file {
		d, err := loopctl.Attach(context.Background(), img, mode.opts)
		if err != nil {
			return err
		}
		defer func() {
			d.Detach(context.Background())
			d.Close()
		}()
		path = d.Path()
	}
	size := *dataSize

	// Sequential read, buffered, as a file system on the device reads.
	if err := dropCaches(); err != nil {
		return err
	}
	before, err := meminfo()
	if err != nil {
		return err
	}
	start := time.Now()
	if err := readAll(path, size); err != nil {
		return err
	}
	el := time.Since(start)
	after, err := meminfo()
	if err != nil {
		return err
	}
	r.seqRead = append(r.seqRead, float64(size)/el.Seconds()/1e6)
	r.cached = append(r.cached, float64(after["Cached"]-before["Cached"])/1024)
	r.buffers = append(r.buffers, float64(after["Buffers"]-before["Buffers"])/1024)

	// Random 4 KiB reads.
	if err := dropCaches(); err != nil {
		return err
	}
	el, err = randomRead(path, size)
	if err != nil {
		return err
	}
	r.randRead = append(r.randRead, randomReads/el.Seconds())

	// Sequential write, synced.
	start = time.Now()
	if err := writeAll(path, size); err != nil {
		return err
	}
	r.seqWrite = append(r.seqWrite, float64(size)/time.Since(start).Seconds()/1e6)
	return nil
}

// fillImage writes size bytes that are not zero (a file system may store
// zeros as holes, which cost nothing to read) to a new file at path.
func fillImage(path string, size int64) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return writeBytes(f, size, 7)
}

// readAll reads size bytes of path in 1 MiB reads.
func readAll(path string, size int64) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	n, err := io.CopyBuffer(io.Discard, io.LimitReader(onlyReader{f}, size), make([]byte, 1<<20))
	if err == nil && n != size {
		err = fmt.Errorf("read %d bytes of %d", n, size)
	}
	return err
}

// onlyReader hides os.File's WriterTo, so that io.CopyBuffer reads with
// the buffer given.
type onlyReader struct{ io.Reader }

// writeAll writes size bytes to path in 1 MiB writes and syncs them.
func writeAll(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	return writeBytes(f, size, 13)
}

// writeBytes writes size bytes of a pattern made with step, none zero, to
// f in 1 MiB writes, and syncs them.
func writeBytes(f *os.File, size int64, step int) error {
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i*step) | 1
	}
	for off := int64(0); off < size; off += int64(len(buf)) {
		if _, err := f.Write(buf[:min(int64(len(buf)), size-off)]); err != nil {
			return err
		}
	}
	return f.Sync()
}

// randomRead reads randomReads 4 KiB blocks at random aligned offsets of
// path's first size bytes, with O_DIRECT where the file takes it.
func randomRead(path string, size int64) (time.Duration, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err == unix.EINVAL { // a file system without O_DIRECT
		fd, err = unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	}
	if err != nil {
		return 0, &os.PathError{Op: "open", Path: path, Err: err}
	}
	defer unix.Close(fd)
	raw := make([]byte, 2*4096)
	buf := raw[4096-int(uintptr(unsafe.Pointer(&raw[0]))%4096):][:4096] // aligned, as O_DIRECT wants
	rng := rand.New(rand.NewPCG(1, 2))
	blocks := size / 4096
	start := time.Now()
	for range randomReads {
		if _, err := unix.Pread(fd, buf, rng.Int64N(blocks)*4096); err != nil {
			return 0, &os.PathError{Op: "pread", Path: path, Err: err}
		}
	}
	return time.Since(start), nil
}

// dropCaches writes out dirty pages and drops the clean ones.
func dropCaches() error {
	unix.Sync()
	return os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0)
}

// meminfo reads /proc/meminfo, in KiB by name.
func meminfo() (map[string]int64, error) {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	m := map[string]int64{}
	s := bufio.NewScanner(f)
	for s.Scan() {
		name, rest, ok := strings.Cut(s.Text(), ":")
		if !ok {
			continue
		}
		fields := strings.Fields(rest)
		if len(fields) > 0 {
			v, _ := strconv.ParseInt(fields[0], 10, 64)
			m[name] = v
		}
	}
	return m, s.Err()
}

// medianOf is the median of v, 0 for none.
func medianOf(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

// printData writes the data-path table.
func (h *harness) printData(w io.Writer) {
	if len(h.data) == 0 {
		return
	}
	fmt.Fprintf(w, "### The data path: %d MiB through a loop device, and the page cache it leaves\n\n", *dataSize>>20)
	fmt.Fprintf(w, "An image of %d MiB (not sparse) on ext4 (%s) and on a tmpfs of the harness's own, reached four ways: the file itself, and a loop device bound buffered, with direct I/O (FlagDirectIO), and with direct I/O at 4096-byte blocks. Sequential read: the caches dropped, the whole image read through the node in 1 MiB reads, buffered, as a file system reads its device (with the default readahead: which is why a device with direct I/O, which reads the file in larger pieces, can beat the file read buffered); Cached (files' pages, the backing file's among them) and Buffers (block devices' pages, the loop device's) in /proc/meminfo are read before and after. Random reads: %d reads of 4 KiB at random aligned offsets with O_DIRECT on the node, so that each reaches the loop driver, from dropped caches. Sequential write: the whole image in 1 MiB writes, then fsync. The median of %d rounds, the modes taken in turn.\n\n",
		*dataSize>>20, *dataDir, randomReads, *dataRounds)
	fmt.Fprintln(w, "| file system | how | sequential read | sequential write | 4 KiB random reads | page cache after the read: Cached | Buffers |")
	fmt.Fprintln(w, "| --- | --- | ---: | ---: | ---: | ---: | ---: |")
	for _, r := range h.data {
		if r.skipped != "" {
			fmt.Fprintf(w, "| %s | %s | %s | | | | |\n", r.fs, r.mode, r.skipped)
			continue
		}
		fmt.Fprintf(w, "| %s | %s | %.0f MB/s | %.0f MB/s | %.0f /s | %+.0f MiB | %+.0f MiB |\n", r.fs, r.mode,
			medianOf(r.seqRead), medianOf(r.seqWrite), medianOf(r.randRead), medianOf(r.cached), medianOf(r.buffers))
	}
	fmt.Fprintln(w)
}
