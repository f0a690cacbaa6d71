package loopctl

import (
	"errors"
	"fmt"
	"io/fs"
	"strings"
	"syscall"
	"testing"
)

func TestFlagsString(t *testing.T) {
	tests := []struct {
		f    Flags
		want string
	}{
		{0, "0"},
		{FlagReadOnly, "read-only"},
		{FlagReadOnly | FlagAutoClear, "read-only|autoclear"},
		{FlagAutoClear | FlagPartScan, "autoclear|partscan"},
		{FlagReadOnly | FlagAutoClear | FlagPartScan | FlagDirectIO, "read-only|autoclear|partscan|direct-io"},
		{FlagDirectIO | 0x20, "direct-io|0x20"},
		{0x2, "0x2"},
		{0xffffffff, "read-only|autoclear|partscan|direct-io|0xffffffe2"},
	}
	for _, tt := range tests {
		t.Run(tt.want, func(t *testing.T) {
			if got := tt.f.String(); got != tt.want {
				t.Fatalf("Flags(%#x).String() = %q, want %q", uint32(tt.f), got, tt.want)
			}
		})
	}
}

func TestFlagValues(t *testing.T) {
	// The kernel's LO_FLAGS_* values, from include/uapi/linux/loop.h.
	for f, want := range map[Flags]uint32{FlagReadOnly: 1, FlagAutoClear: 4, FlagPartScan: 8, FlagDirectIO: 16} {
		if uint32(f) != want {
			t.Errorf("%v = %d, want %d", f, uint32(f), want)
		}
	}
}

func TestOptionsValidate(t *testing.T) {
	tests := []struct {
		name string
		o    Options
		ok   bool
	}{
		{"zero", Options{}, true},
		{"all flags", Options{Flags: knownFlags}, true},
		{"block 512", Options{BlockSize: 512}, true},
		{"block 4096", Options{BlockSize: 4096}, true},
		{"block 65536", Options{BlockSize: 65536}, true},
		{"block 1<<31", Options{BlockSize: 1 << 31}, true}, // the kernel judges the upper bound
		{"offset and limit", Options{Offset: 1 << 20, SizeLimit: 1 << 30}, true},
		{"unknown flag 0x2", Options{Flags: 0x2}, false},
		{"unknown flag 0x20", Options{Flags: FlagReadOnly | 0x20}, false},
		{"block 3", Options{BlockSize: 3}, false},
		{"block 256", Options{BlockSize: 256}, false},
		{"block 1000", Options{BlockSize: 1000}, false},
		{"block 4097", Options{BlockSize: 4097}, false},
		{"offset too big", Options{Offset: 1 << 63}, false},
		{"size limit too big", Options{SizeLimit: 1<<64 - 1}, false},
	}
	for _, o := range []Options{{Offset: 1 << 63}, {SizeLimit: 1<<64 - 1}} {
		if err := o.validate(); !errors.Is(err, syscall.EOVERFLOW) || !errors.Is(err, fs.ErrInvalid) {
			t.Errorf("validate(%+v) = %v, want EOVERFLOW (the kernel's answer) and fs.ErrInvalid", o, err)
		}
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.o.validate()
			if tt.ok && err != nil {
				t.Fatalf("validate() = %v, want nil", err)
			}
			if !tt.ok && !errors.Is(err, fs.ErrInvalid) {
				t.Fatalf("validate() = %v, want an error matching fs.ErrInvalid", err)
			}
		})
	}
}

func TestErrorIs(t *testing.T) {
	tests := []struct {
		errno syscall.Errno
		is    []error
		isNot []error
	}{
		{syscall.EEXIST, []error{fs.ErrExist}, []error{ErrBusy, fs.ErrNotExist}},
		{syscall.ENODEV, []error{fs.ErrNotExist}, []error{fs.ErrExist, ErrNotBound}},
		{syscall.ENOENT, []error{fs.ErrNotExist}, []error{ErrNotLoop}},
		{syscall.EBUSY, []error{ErrBusy}, []error{fs.ErrInvalid, ErrNotBound}},
		{syscall.ENXIO, []error{ErrNotBound}, []error{ErrBusy, fs.ErrNotExist}},
		{syscall.EPERM, []error{fs.ErrPermission}, []error{fs.ErrInvalid}},
		{syscall.EACCES, []error{fs.ErrPermission}, []error{fs.ErrNotExist}},
		{syscall.EINVAL, []error{fs.ErrInvalid}, []error{errors.ErrUnsupported}},
		{syscall.ENOTTY, []error{errors.ErrUnsupported}, []error{fs.ErrInvalid}},
	}
	for _, tt := range tests {
		t.Run(tt.errno.Error(), func(t *testing.T) {
			// Directly, and behind a step of a multi-step call.
			for _, cause := range []error{tt.errno, inStep("LOOP_SET_FD", tt.errno)} {
				err := error(&Error{Op: "configure", Path: "/dev/loop7", Err: cause})
				if !errors.Is(err, tt.errno) {
					t.Errorf("errors.Is(%v, %v) = false", err, tt.errno)
				}
				for _, target := range tt.is {
					if !errors.Is(err, target) {
						t.Errorf("errors.Is(%v, %v) = false, want true", err, target)
					}
				}
				for _, target := range tt.isNot {
					if errors.Is(err, target) {
						t.Errorf("errors.Is(%v, %v) = true, want false", err, target)
					}
				}
				var errno syscall.Errno
				if !errors.As(err, &errno) || errno != tt.errno {
					t.Errorf("errors.As(%v) = %v, want %v", err, errno, tt.errno)
				}
			}
		})
	}
}

func TestErrorMessage(t *testing.T) {
	err := &Error{Op: "remove", Path: "/dev/loop9", Err: syscall.EBUSY}
	want := "loopctl: remove /dev/loop9: " + syscall.EBUSY.Error()
	if err.Error() != want {
		t.Fatalf("Error() = %q, want %q", err.Error(), want)
	}
	if newError("x", "y", nil) != nil {
		t.Fatal("newError with a nil cause is not nil")
	}
	wrapped := fmt.Errorf("outer: %w", newError("add", ControlPath, invalid("device number %d", -2)))
	var e *Error
	if !errors.As(wrapped, &e) || e.Op != "add" || e.Path != ControlPath || !errors.Is(wrapped, fs.ErrInvalid) {
		t.Fatalf("errors.As(%v) = %+v", wrapped, e)
	}
	if !strings.Contains(wrapped.Error(), "device number -2") {
		t.Fatalf("message %q lacks the input", wrapped)
	}
}

func TestDevicePath(t *testing.T) {
	for n, want := range map[int]string{0: "/dev/loop0", 7: "/dev/loop7", MaxNumber: "/dev/loop1048575"} {
		if got := DevicePath(n); got != want {
			t.Errorf("DevicePath(%d) = %q, want %q", n, got, want)
		}
	}
}

func TestStatusDeleted(t *testing.T) {
	if (Status{BackingFile: "/tmp/img"}).Deleted() {
		t.Error("live file reported deleted")
	}
	if !(Status{BackingFile: "/tmp/img (deleted)"}).Deleted() {
		t.Error("deleted file not reported")
	}
}

func TestZeroValuesAreClosed(t *testing.T) {
	var c Control
	if _, err := c.GetFree(); !errors.Is(err, fs.ErrClosed) {
		t.Errorf("zero Control GetFree: %v, want fs.ErrClosed", err)
	}
	var d Device
	if err := d.ClearFD(); !errors.Is(err, fs.ErrClosed) {
		t.Errorf("zero Device ClearFD: %v, want fs.ErrClosed", err)
	}
	if _, err := d.Status(); !errors.Is(err, fs.ErrClosed) {
		t.Errorf("zero Device Status: %v, want fs.ErrClosed", err)
	}
	if c.Close() != nil || d.Close() != nil {
		t.Error("Close of a zero value failed")
	}
}

// FuzzOptionsValidate holds validate to its rule: it accepts exactly the
// options with known flags, a block size of 0, BlockSizeAuto or a power of
// two from 512, and an offset and size limit that fit an int64; it refuses
// the rest with
// an error matching fs.ErrInvalid, and never panics. Flags.String names
// every bit.
func FuzzOptionsValidate(f *testing.F) {
	f.Add(uint64(0), uint64(0), uint32(0), uint32(0))
	f.Add(uint64(1<<20), uint64(1<<30), uint32(4096), uint32(knownFlags))
	f.Add(uint64(1<<63), uint64(0), uint32(1000), uint32(0x20))
	f.Add(uint64(0), uint64(1<<64-1), uint32(1<<31), uint32(0xffffffff))
	f.Add(uint64(4096), uint64(0), BlockSizeAuto, uint32(0))
	f.Fuzz(func(t *testing.T, offset, sizeLimit uint64, blockSize, flags uint32) {
		o := Options{Offset: offset, SizeLimit: sizeLimit, BlockSize: blockSize, Flags: Flags(flags)}
		err := o.validate()
		powerOfTwo := blockSize&(blockSize-1) == 0
		valid := Flags(flags)&^knownFlags == 0 &&
			(blockSize == 0 || blockSize == BlockSizeAuto || blockSize >= 512 && powerOfTwo) &&
			offset <= 1<<63-1 && sizeLimit <= 1<<63-1
		if valid != (err == nil) {
			t.Fatalf("validate(%+v) = %v; valid %v", o, err, valid)
		}
		if err != nil && !errors.Is(err, fs.ErrInvalid) {
			t.Fatalf("validate(%+v) = %v, not matching fs.ErrInvalid", o, err)
		}
		s := Flags(flags).String()
		if (flags == 0) != (s == "0") || flags&^uint32(knownFlags) != 0 && !strings.Contains(s, "0x") {
			t.Fatalf("Flags(%#x).String() = %q", flags, s)
		}
	})
}
