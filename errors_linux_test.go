package loopctl

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/kerneltest"
)

// TestFailureModes is the table of how each exported function fails: a
// bad input, a closed object, and the kernel's refusal of the call it
// makes. Each error is an *Error naming the operation (lower-case words)
// and the file it was on (the device, the control device, the backing
// file, or none: a device number out of range has no node), matches the
// errno the kernel gave through errors.Is and errors.As, and maps it onto
// the same sentinel whichever call failed.
func TestFailureModes(t *testing.T) {
	t.Parallel()
	type env struct {
		k    *fakeKernel
		c    *Control
		d    *Device // /dev/loop1, bound to f
		free *Device // /dev/loop2, unbound
		f    *os.File
	}
	// A kernel fault for the step: the call it is the result of fails.
	fault := func(step string, errno syscall.Errno) func(e *env) {
		return func(e *env) { e.k.failAt(step, e.k.counts[step]+1, errno) }
	}
	closedDevice := func(e *env) { e.d.Close() }
	tests := []struct {
		name  string
		setup func(e *env)
		call  func(e *env) error
		op    string
		path  string
		is    []error // errno, sentinel, ...
	}{
		// The control device.
		{"Open refused", fault("open /dev/loop-control", unix.EACCES), func(e *env) error { _, err := e.k.sys.Open(); return err },
			"open", ControlPath, []error{unix.EACCES, fs.ErrPermission}},
		{"Add taken", nil, func(e *env) error { _, err := e.c.Add(1); return err },
			"add", "/dev/loop1", []error{unix.EEXIST, fs.ErrExist}},
		{"Add out of range", nil, func(e *env) error { _, err := e.c.Add(MaxNumber + 1); return err },
			"add", ControlPath, []error{fs.ErrInvalid}},
		{"Remove missing", nil, func(e *env) error { return e.c.Remove(9) },
			"remove", "/dev/loop9", []error{unix.ENODEV, fs.ErrNotExist}},
		{"Remove bound", nil, func(e *env) error { return e.c.Remove(1) },
			"remove", "/dev/loop1", []error{unix.EBUSY, ErrBusy}},
		{"GetFree refused", fault("LOOP_CTL_GET_FREE", unix.ENOSPC), func(e *env) error { _, err := e.c.GetFree(); return err },
			"get free", ControlPath, []error{unix.ENOSPC}},
		{"Control closed", func(e *env) { e.c.Close() }, func(e *env) error { _, err := e.c.GetFree(); return err },
			"get free", ControlPath, []error{fs.ErrClosed}},

		// Opening a device.
		{"OpenDevice missing", nil, func(e *env) error { _, err := e.k.sys.OpenDevice(9); return err },
			"open", "/dev/loop9", []error{unix.ENOENT, fs.ErrNotExist}},
		{"OpenDevice out of range", nil, func(e *env) error { _, err := e.k.sys.OpenDevice(-1); return err },
			"open", "", []error{fs.ErrInvalid}},
		{"OpenDevice being removed", fault("open /dev/loop2", unix.ENXIO), func(e *env) error { _, err := e.k.sys.OpenDevice(2); return err },
			"open", "/dev/loop2", []error{unix.ENXIO, ErrNotBound}},
		{"OpenDevicePath not a loop device", nil, func(e *env) error { _, err := e.k.sys.OpenDevicePath(e.f.Name()); return err },
			"open", filePath, []error{ErrNotLoop}},
		{"OpenBinding changed", nil, func(e *env) error { _, err := e.k.sys.OpenBinding(Status{Number: 1, DiskSeq: 1}); return err },
			"open binding", "/dev/loop1", []error{ErrChanged}},

		// A device's calls.
		{"SetFD bound", nil, func(e *env) error { return e.d.SetFD(e.f) },
			"set fd", "/dev/loop1", []error{unix.EBUSY, ErrBusy}},
		{"SetFD nil", nil, func(e *env) error { return e.free.SetFD(nil) },
			"set fd", "/dev/loop2", []error{fs.ErrInvalid}},
		{"Configure bound", nil, func(e *env) error { return e.d.Configure(e.f, Options{}) },
			"configure", "/dev/loop1", []error{unix.EBUSY, ErrBusy}},
		{"Configure bad block size", nil, func(e *env) error { return e.free.Configure(e.f, Options{BlockSize: 3}) },
			"configure", "/dev/loop2", []error{fs.ErrInvalid}},
		{"ClearFD unbound", nil, func(e *env) error { return e.free.ClearFD() },
			"clear fd", "/dev/loop2", []error{unix.ENXIO, ErrNotBound}},
		{"Status unbound", nil, func(e *env) error { _, err := e.free.Status(); return err },
			"status", "/dev/loop2", []error{unix.ENXIO, ErrNotBound}},
		{"Status closed", closedDevice, func(e *env) error { _, err := e.d.Status(); return err },
			"status", "/dev/loop1", []error{fs.ErrClosed}},
		{"SetStatus refused", fault("LOOP_SET_STATUS64", unix.EPERM), func(e *env) error { return e.d.SetStatus(Status{}) },
			"set status", "/dev/loop1", []error{unix.EPERM, fs.ErrPermission}},
		{"SetCapacity unbound", nil, func(e *env) error { return e.free.SetCapacity() },
			"set capacity", "/dev/loop2", []error{unix.ENXIO, ErrNotBound}},
		{"SetBlockSize bad", nil, func(e *env) error { return e.d.SetBlockSize(100) },
			"set block size", "/dev/loop1", []error{fs.ErrInvalid}},
		{"SetDirectIO refused", fault("LOOP_SET_DIRECT_IO", unix.EINVAL), func(e *env) error { return e.d.SetDirectIO(true) },
			"set direct io", "/dev/loop1", []error{unix.EINVAL, ErrNoDirectIO}},
		{"ChangeFD closed", closedDevice, func(e *env) error { return e.d.ChangeFD(e.f) },
			"change fd", "/dev/loop1", []error{fs.ErrClosed}},
		{"DiskSeq closed", closedDevice, func(e *env) error { _, err := e.d.DiskSeq(); return err },
			"disk seq", "/dev/loop1", []error{fs.ErrClosed}},
		{"Lock closed", closedDevice, func(e *env) error { return e.d.Lock(LockShared) },
			"lock", "/dev/loop1", []error{fs.ErrClosed}},
		{"Rescan without partition scan", nil, func(e *env) error { return e.d.Rescan() },
			"rescan", "/dev/loop1", []error{fs.ErrInvalid}},
		{"Partitions closed", closedDevice, func(e *env) error { _, err := e.d.Partitions(); return err },
			"partitions", "/dev/loop1", []error{fs.ErrClosed}},
		{"Detach unbound", nil, func(e *env) error { return e.free.Detach(context.Background()) },
			"detach", "/dev/loop2", []error{unix.ENXIO, ErrNotBound}},
		{"MakeNode out of range", nil, func(e *env) error { return e.k.sys.MakeNode(-1) },
			"make node", "", []error{fs.ErrInvalid}},

		// Binding a file, and the lookups.
		{"Attach of a missing file", nil, func(e *env) error {
			_, err := e.k.sys.Attach(context.Background(), e.f.Name()+".missing", Options{})
			return err
		}, "attach", e2path, []error{unix.ENOENT, fs.ErrNotExist}},
		{"AttachFile offset too large", nil, func(e *env) error {
			_, err := e.k.sys.AttachFile(context.Background(), e.f, Options{Offset: 1 << 63})
			return err
		}, "attach", filePath, []error{fs.ErrInvalid}},
		{"List refused", fault("LOOP_GET_STATUS64", unix.EIO), func(e *env) error { _, err := e.k.sys.List(); return err },
			"list", "/dev/loop1", []error{unix.EIO}},
		{"FindByBackingFile of a missing file", nil, func(e *env) error {
			_, err := e.k.sys.FindByBackingFile(e.f.Name() + ".missing")
			return err
		}, "find", e2path, []error{unix.ENOENT, fs.ErrNotExist}},
		{"FindByRef empty", nil, func(e *env) error { _, err := e.k.sys.FindByRef(""); return err },
			"find", "", []error{fs.ErrInvalid}},
		{"Sweep of a reference too long", nil, func(e *env) error {
			_, err := e.k.sys.Sweep(context.Background(), string(make([]byte, 64)))
			return err
		},
			"find", "", []error{fs.ErrInvalid}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := &env{k: useFake(t, 3), f: kerneltest.TempFile(t, 1<<20)}
			var err error
			if e.c, err = e.k.sys.Open(); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { e.c.Close() })
			e.d = fakeDevice(t, e.k, 1)
			if err := e.d.Configure(e.f, Options{}); err != nil {
				t.Fatal(err)
			}
			e.free = fakeDevice(t, e.k, 2)
			if tt.setup != nil {
				tt.setup(e)
			}
			err = tt.call(e)
			var le *Error
			if !errors.As(err, &le) {
				t.Fatalf("%v (%T): not an *Error", err, err)
			}
			path := tt.path
			switch path {
			case e2path:
				path = e.f.Name() + ".missing"
			case filePath:
				path = e.f.Name()
			}
			if le.Op != tt.op || le.Path != path {
				t.Errorf("%v: op %q, path %q; want %q, %q", err, le.Op, le.Path, tt.op, path)
			}
			for _, target := range tt.is {
				if !errors.Is(err, target) {
					t.Errorf("%v: does not match %v", err, target)
				}
				if errno, ok := target.(syscall.Errno); ok {
					var got syscall.Errno
					if !errors.As(err, &got) || got != errno {
						t.Errorf("%v: errors.As gives errno %v, want %v", err, got, errno)
					}
				}
			}
		})
	}
}

// In TestFailureModes, e2path stands for the missing file a row names and
// filePath for the backing file; neither can be a real path.
const (
	e2path   = "\x00the missing file"
	filePath = "\x00the backing file"
)
