package loopctl

import (
	"context"
	"os"
)

// The package's functions, on a test's system: each is what the exported
// function of its name does on host.

func (s *system) Open() (*Control, error) { return s.open() }
func (s *system) OpenDevice(n int) (*Device, error) {
	return s.openGranted(context.Background(), n, readWrite)
}
func (s *system) OpenDevicePath(path string) (*Device, error) { return s.openDevicePath(path) }
func (s *system) OpenBinding(st Status) (*Device, error)      { return s.openBinding(st) }
func (s *system) List() ([]Status, error)                     { return s.list(nil) }
func (s *system) FindByRef(ref string) ([]Status, error)      { return s.findByRef(ref) }
func (s *system) MakeNode(n int) error                        { return s.makeNode(n) }

func (s *system) FindByBackingFile(path string) ([]Status, error) {
	return s.findByBackingFile(path)
}

func (s *system) Attach(ctx context.Context, path string, o Options) (*Device, error) {
	return s.attachPath(ctx, path, o)
}

func (s *system) AttachFile(ctx context.Context, f *os.File, o Options) (*Device, error) {
	return s.attachFile(ctx, f, o)
}

func (s *system) Sweep(ctx context.Context, ref string) ([]Status, error) {
	return s.sweep(ctx, ref)
}

// resetShared closes the shared control device, once no attacher holds or
// waits for its lock: a test's system ends with it (host's lasts as long
// as the process).
func (s *system) resetShared() {
	s.turn <- struct{}{}
	defer func() { <-s.turn }()
	s.lockWaiters.Wait()
	s.shared.mu.Lock()
	defer s.shared.mu.Unlock()
	s.shared.c.Close()
	s.shared.c = nil
}
