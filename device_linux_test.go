package loopctl

import (
	"context"
	"errors"
	"io/fs"
	"slices"
	"strings"
	"testing"

	"github.com/loopctl/loopctl/internal/kerneltest"
	"golang.org/x/sys/unix"
)

func TestOpenDeviceMissingNode(t *testing.T) {
	t.Parallel()
	k := useFake(t, 2)
	k.noNode[1] = true
	_, err := k.sys.OpenDevice(1)
	var missing *NodeMissingError
	if !errors.As(err, &missing) || missing.Number != 1 || !errors.Is(err, fs.ErrNotExist) || !errors.Is(err, unix.ENOENT) {
		t.Fatalf("k.sys.OpenDevice(1) = %v, want a *NodeMissingError for loop1 matching fs.ErrNotExist and ENOENT", err)
	}
	if msg := err.Error(); !strings.Contains(msg, "/dev/loop1") || !strings.Contains(msg, "MakeNode") {
		t.Errorf("message %q names neither the node nor the remedy", msg)
	}
	// A device that does not exist has no node to make.
	_, err = k.sys.OpenDevice(5)
	if !errors.Is(err, fs.ErrNotExist) || errors.As(err, &missing) {
		t.Fatalf("k.sys.OpenDevice(5) = %v, want fs.ErrNotExist, no *NodeMissingError", err)
	}
}

// TestConfigureRefusesOptions: what only Attach can honour is refused
// before any ioctl; Configure honours Lock, and lets it go again when the
// bind fails.
func TestConfigureRefusesOptions(t *testing.T) {
	t.Parallel()
	k := useFake(t, 2)
	d := fakeDevice(t, k, 0)
	f := kerneltest.TempFile(t, 1<<20)
	for _, o := range []Options{{Reuse: true}, {MakeNode: true}, {NoSymlinks: true}} {
		before := len(k.calls(""))
		if err := d.Configure(f, o); !errors.Is(err, fs.ErrInvalid) {
			t.Errorf("Configure(%+v) = %v, want fs.ErrInvalid", o, err)
		}
		if log := k.calls("")[before:]; len(log) != 0 {
			t.Errorf("Configure(%+v) made calls %q", o, log)
		}
	}
	if _, err := k.sys.AttachFile(context.Background(), f, Options{NoSymlinks: true}); !errors.Is(err, fs.ErrInvalid) {
		t.Errorf("AttachFile with NoSymlinks = %v, want fs.ErrInvalid", err)
	}
	k.failAt("LOOP_CONFIGURE", 1, unix.EIO)
	if err := d.Configure(f, Options{Lock: LockExclusive}); !errors.Is(err, unix.EIO) {
		t.Fatalf("Configure = %v, want EIO", err)
	}
	if got := k.calls("flock"); !slices.Equal(got, []string{"flock-ex /dev/loop0", "flock-un /dev/loop0"}) {
		t.Fatalf("lock steps %q, want the lock taken and let go", got)
	}
	if err := d.Configure(f, Options{Lock: LockExclusive}); err != nil {
		t.Fatal(err)
	}
	if got := k.calls("flock"); got[len(got)-1] != "flock-ex /dev/loop0" {
		t.Fatalf("lock steps %q, want the lock kept", got)
	}
}

// TestStatusMidTeardown: a teardown that begins between LOOP_GET_STATUS64
// and the sysfs read empties backing_file; Status keeps lo_file_name.
func TestStatusMidTeardown(t *testing.T) {
	t.Parallel()
	k := useFake(t, 1)
	d, f := bindFake(t, k, 0, Options{})
	// Begun as LOOP_GET_STATUS64 answers: sysfs shows it at once.
	k.actAt("BLKSSZGET", k.counts["BLKSSZGET"]+1, func(k *fakeKernel) { k.devs[0].backing = ""; k.sync(0) }, nil)
	s, err := d.Status()
	if want := f.Name()[:unix.LO_NAME_SIZE-1]; err != nil || s.BackingFile != want {
		t.Fatalf("Status = %+v, %v; want lo_file_name %q", s, err, want)
	}
}

func TestSetStatusFake(t *testing.T) {
	t.Parallel()
	k := useFake(t, 1)
	d, _ := bindFake(t, k, 0, Options{Flags: FlagPartScan})
	before := len(k.calls("LOOP_SET_STATUS64"))
	for _, s := range []Status{
		{Flags: FlagPartScan | FlagReadOnly},
		{Flags: FlagPartScan | FlagDirectIO},
		{Flags: 0},
		{Flags: FlagPartScan | 0x80},
		{Flags: FlagPartScan, Offset: 1 << 63},
	} {
		if err := d.SetStatus(s); !errors.Is(err, fs.ErrInvalid) {
			t.Errorf("SetStatus(%+v) = %v, want fs.ErrInvalid", s, err)
		}
	}
	if n := len(k.calls("LOOP_SET_STATUS64")); n != before {
		t.Fatal("a refused SetStatus reached the kernel")
	}
	// What SetStatus cannot change is refused where set otherwise than the
	// device has it, never dropped.
	cur, err := d.Status()
	if err != nil {
		t.Fatal(err)
	}
	for name, change := range map[string]func(s *Status){
		"Number":       func(s *Status) { s.Number = 3 },
		"BackingInode": func(s *Status) { s.BackingInode++ },
		"BlockSize":    func(s *Status) { s.BlockSize = 4096 },
		"DiskSeq":      func(s *Status) { s.DiskSeq++ },
	} {
		s := cur
		change(&s)
		err := d.SetStatus(s)
		want := fs.ErrInvalid
		if name == "DiskSeq" {
			want = ErrChanged
		}
		if !errors.Is(err, want) {
			t.Errorf("SetStatus with another %s = %v, want %v", name, err, want)
		}
	}
	if n := len(k.calls("LOOP_SET_STATUS64")); n != before {
		t.Fatal("a refused SetStatus reached the kernel")
	}
	k.failAt("LOOP_SET_STATUS64", 1, unix.EAGAIN)
	if err := d.SetStatus(Status{Offset: 1024, SizeLimit: 2048, Flags: FlagPartScan | FlagAutoClear}); err != nil {
		t.Fatal(err)
	}
	// Read, changed, passed back: the owner reference changes too.
	cur, err = d.Status()
	if err != nil {
		t.Fatal(err)
	}
	cur.Ref = "new-owner"
	if err := d.SetStatus(cur); err != nil {
		t.Fatal(err)
	}
	if s, err := d.Status(); err != nil || s.Ref != "new-owner" || s.Offset != 1024 {
		t.Fatalf("Status after a new reference = %+v, %v", s, err)
	}
	s, err := d.Status()
	if err != nil || s.Offset != 1024 || s.SizeLimit != 2048 || s.Flags != FlagPartScan|FlagAutoClear {
		t.Fatalf("Status = %+v, %v", s, err)
	}
	if name := unix.ByteSliceToString(k.devs[0].info.File_name[:]); name == "" {
		t.Fatal("SetStatus erased lo_file_name")
	}
}

func TestDeviceSettersFake(t *testing.T) {
	t.Parallel()
	k := useFake(t, 1)
	d, f := bindFake(t, k, 0, Options{})
	before := len(k.calls("LOOP_"))
	for _, size := range []uint32{0, 1, 511, 768, 4095} {
		if err := d.SetBlockSize(size); !errors.Is(err, fs.ErrInvalid) {
			t.Errorf("SetBlockSize(%d) = %v", size, err)
		}
	}
	if err := d.ChangeFD(f); !errors.Is(err, fs.ErrInvalid) { // read-write device
		t.Errorf("ChangeFD on a read-write device = %v", err)
	}
	if got := k.calls("LOOP_")[before:]; !slices.Equal(got, []string{"LOOP_GET_STATUS64 /dev/loop0"}) {
		t.Fatalf("refused calls reached the kernel: %q", got)
	}
	k.failAt("LOOP_SET_BLOCK_SIZE", 1, unix.EAGAIN)
	if err := d.SetBlockSize(4096); err != nil || k.devs[0].blockSize != 4096 {
		t.Fatalf("SetBlockSize(4096) = %v, size %d", err, k.devs[0].blockSize)
	}
	for _, on := range []bool{true, false} {
		if err := d.SetDirectIO(on); err != nil || k.devs[0].directIO != on {
			t.Fatalf("SetDirectIO(%v) = %v", on, err)
		}
	}
	if err := d.SetCapacity(); err != nil {
		t.Fatal(err)
	}
	d.ClearFD()
	for name, err := range map[string]error{
		"SetCapacity": d.SetCapacity(), "SetDirectIO": d.SetDirectIO(true),
		"SetBlockSize": d.SetBlockSize(512), "SetStatus": d.SetStatus(Status{}), "ChangeFD": d.ChangeFD(f),
	} {
		if !errors.Is(err, ErrNotBound) {
			t.Errorf("%s on an unbound device = %v, want ErrNotBound", name, err)
		}
	}
	d.Close()
	for name, err := range map[string]error{
		"SetCapacity": d.SetCapacity(), "SetDirectIO": d.SetDirectIO(true),
		"SetBlockSize": d.SetBlockSize(512), "SetStatus": d.SetStatus(Status{}), "ChangeFD": d.ChangeFD(f),
	} {
		if !errors.Is(err, fs.ErrClosed) {
			t.Errorf("%s after Close = %v, want fs.ErrClosed", name, err)
		}
	}
}
