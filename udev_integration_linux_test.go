//go:build integration

package loopctl

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/loopctl/loopctl/internal/kerneltest"
	"github.com/loopctl/loopctl/internal/sysfs"
)

const diskGroupChildEnv = "LOOPCTL_DISK_GROUP_CHILD"

// TestKernelDiskGroupAttach: with udev running and no device free, a user
// in the disk group (not root, no capabilities) attaches again and again:
// each device LOOP_CTL_GET_FREE makes is root's, mode 0600, until udev
// applies its rules, and Attach waits for that, where it failed at once
// with EACCES before (0 of 8 attached; util-linux's losetup retries).
func TestKernelDiskGroupAttach(t *testing.T) {
	const attaches = 8
	if img := os.Getenv(diskGroupChildEnv); img != "" {
		diskGroupChild(t, img, attaches)
		return
	}
	kerneltest.Udevd(t)
	disk := kerneltest.DiskGroup(t)
	// Every device there is bound, by the test: LOOP_CTL_GET_FREE must
	// make a new one for each of the child's attaches.
	before, err := sysfs.LoopNumbers(sysfs.Root)
	if err != nil {
		t.Fatal(err)
	}
	existed := map[int]bool{}
	for _, n := range before {
		existed[n] = true
	}
	filler := kerneltest.TempFile(t, 1<<20).Name()
	for {
		d := attachT(t, filler, Options{Flags: FlagAutoClear | FlagReadOnly})
		if !existed[d.Number()] {
			break
		}
	}
	u := kerneltest.NewUnprivileged(t)
	img := u.File(t, "image", 1<<20)
	out, err := u.Run(t, "TestKernelDiskGroupAttach", []uint32{disk}, diskGroupChildEnv+"="+img)
	if err != nil {
		t.Fatalf("the disk group's attaches: %v\n%s", err, out)
	}
	var made []int
	for _, line := range strings.Split(out, "\n") {
		if rest, ok := strings.CutPrefix(line, "attached: "); ok {
			n, err := strconv.Atoi(rest)
			if err != nil {
				t.Fatal(line)
			}
			made = append(made, n)
		}
	}
	if len(made) != attaches {
		t.Fatalf("%d attaches reported, want %d:\n%s", len(made), attaches, out)
	}
	for _, n := range made {
		if existed[n] {
			t.Errorf("loop%d existed before: the child was to attach to devices just made", n)
		}
		kerneltest.WaitUnbound(t, n) // autoclear, at the child's exit
	}
	t.Logf("a member of the disk group attached %d devices just made: %v", attaches, made)
}

// diskGroupChild attaches img again and again, holding each device, and
// prints each one's number; its exit detaches them (autoclear).
func diskGroupChild(t *testing.T, img string, attaches int) {
	for range attaches {
		d, err := Attach(context.Background(), img, Options{Flags: FlagAutoClear})
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		fmt.Printf("attached: %d\n", d.Number())
	}
}
