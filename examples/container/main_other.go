//go:build !linux

// Command container binds a disk image inside a container whose /dev is a
// tmpfs; loop devices are Linux's, so elsewhere it only says so.
package main

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/loopctl/loopctl"
)

func main() {
	// The library answers errors.ErrUnsupported here; its words say why.
	_, err := loopctl.Open()
	fmt.Fprintf(os.Stderr, "%s: %v\n", filepath.Base(os.Args[0]), err)
	os.Exit(1)
}
