package loopctl

import "context"

// OpenBinding opens device s.Number and checks that it is still the
// binding s describes: the same disk sequence number, or, on kernels
// without, the same backing file, offset and size limit. Otherwise it
// closes the device and fails with an error matching [ErrChanged]. The
// open pins the binding (another process's detach waits for the last
// close), so [List], OpenBinding and [Device.ClearFD] never detach another
// binding than the one listed. A read-only binding is opened read-only.
func OpenBinding(s Status) (*Device, error) { return host.openBinding(s) }

// Sweep detaches every binding whose owner reference ([Options.Ref]) is
// ref: what a runtime does at start, for the devices it bound before a
// crash. It goes through [FindByRef] and [OpenBinding], so it never
// detaches a binding of another reference, or one bound anew since it
// looked. A device that another opener holds stays bound until that
// opener's last close: Sweep waits while ctx allows, and returns the
// bindings it detached, with an error matching [ErrBusy] that names each
// one still held and what holds it.
func Sweep(ctx context.Context, ref string) ([]Status, error) { return host.sweep(ctx, ref) }
