package loopctl

import (
	"context"
	"os"
)

// Attach binds the file at path to a free loop device as o asks, and
// returns the device, open: the file read-only with [FlagReadOnly] and
// read-write otherwise (one that cannot be opened for writing fails, never
// switching to read-only in silence). The path is treated as hostile:
// anything but a regular file or a block device fails with [fs.ErrInvalid]
// before the file is opened for I/O, and the file's own failures match no
// loop-device sentinel.
//
// Attach is safe beside other processes attaching and detaching: it takes
// systemd's locks, and tries a lost race again while ctx allows, up to 256
// times (then [ErrBusy]). With [Options.Reuse] it may return a device bound
// already ([Device.Shared]), or fail with an [*OverlapError]. On failure it
// leaves nothing behind. The binding outlives the Device unless
// [FlagAutoClear] detaches it at the last close.
func Attach(ctx context.Context, path string, o Options) (*Device, error) {
	return host.attachPath(ctx, path, o)
}

// AttachFile is [Attach] of a file the caller has open; f stays the
// caller's to close. A nil or closed f, and one that cannot back a loop
// device, are refused as invalid before any device is touched. A file open
// read-only is bound read-only.
func AttachFile(ctx context.Context, f *os.File, o Options) (*Device, error) {
	return host.attachFile(ctx, f, o)
}
