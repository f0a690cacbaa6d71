//go:build !linux

package loopctl

import (
	"context"
	"errors"
	"os"
)

// Loop devices exist only on Linux. Elsewhere the package builds, and every
// call fails with an error matching errors.ErrUnsupported: no control
// device or loop device opens, so the methods below, which a Device or a
// Control would reach, are reached only by a closed or zero one. CI runs
// its tests as a js/wasm program under Node.

type kernel interface {
	open(path string, mode int) (handle, error)
}

type system struct{ k kernel }

var host = &system{k: unsupportedKernel{}}

type unsupportedKernel struct{}

func (unsupportedKernel) open(path string, _ int) (handle, error) {
	return nil, &os.PathError{Op: "open", Path: path, Err: errors.ErrUnsupported}
}

type (
	deviceState struct{}
	match       struct{}
)

func unsupported(op, path string) error { return newError(op, path, errors.ErrUnsupported) }

func (d *Device) unsupported(op string) error {
	if _, err := d.handle(op); err != nil {
		return err
	}
	return unsupported(op, d.path)
}

func (s *system) attachPath(_ context.Context, path string, _ Options) (*Device, error) {
	return nil, unsupported("attach", path)
}

func (s *system) attachFile(_ context.Context, f *os.File, _ Options) (*Device, error) {
	if f == nil {
		return nil, unsupported("attach", "")
	}
	return nil, unsupported("attach", f.Name())
}

func (s *system) list(*match) ([]Status, error)                { return nil, unsupported("list", "/sys/block") }
func (s *system) findByBackingFile(p string) ([]Status, error) { return nil, unsupported("find", p) }
func (s *system) findByRef(string) ([]Status, error)           { return nil, unsupported("find", "") }
func (s *system) openBinding(st Status) (*Device, error) {
	return nil, unsupported("open binding", DevicePath(st.Number))
}
func (s *system) sweep(context.Context, string) ([]Status, error) {
	return nil, unsupported("sweep", "")
}
func (s *system) makeNode(n int) error                { return unsupported("make node", DevicePath(n)) }
func (s *system) makePartitionNode(p Partition) error { return unsupported("make node", p.Path) }
func (s *system) loopNumber(path string) (int, uint64, error) {
	return -1, 0, unsupported("open", path)
}
func (s *system) openGranted(_ context.Context, n, mode int) (*Device, error) {
	return s.openDeviceMode(n, mode)
}
func (s *system) holdersOf(n, m int) []string        { return nil }
func (s *system) missingNode(n int, err error) error { return err }

func (c *Control) addAny() (int, error) { return -1, unsupported("add", ControlPath) }
func (c *Control) remove(n int) error {
	_, err := c.ioctl("remove", DevicePath(n), reqCtlRemove, uintptr(n))
	return err
}

func (d *Device) readStatus() (Status, error)       { return Status{}, d.unsupported("status") }
func (d *Device) configure(*os.File, Options) error { return d.unsupported("configure") }
func (d *Device) setStatus(Status) error            { return d.unsupported("set status") }
func (d *Device) setBlockSize(uint32) error         { return d.unsupported("set block size") }
func (d *Device) changeFD(*os.File) error           { return d.unsupported("change fd") }
func (d *Device) diskSeq() (uint64, error) {
	_ = d.deviceState // none here: it holds what Linux keeps
	return 0, d.unsupported("disk seq")
}
func (d *Device) setLock(LockMode) error                  { return d.unsupported("lock") }
func (d *Device) detach(context.Context) error            { return d.unsupported("detach") }
func (d *Device) partitions() ([]Partition, error)        { return nil, d.unsupported("partitions") }
func (d *Device) rescan() error                           { return d.unsupported("rescan") }
func (d *Device) setUp(_ handle, bind func() error) error { return bind() }

func checkBackingFile(uintptr, string, Options) error    { return nil }
func explainRefused(_ string, err error, _ string) error { return err }
func explainLimits(err error) error                      { return err }
func ioctl(h handle, req uint, arg uintptr) (int, error) { return h.rawIoctl(req, arg) }
