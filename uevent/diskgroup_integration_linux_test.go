//go:build integration

package uevent

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/loopctl/loopctl"
	"github.com/loopctl/loopctl/internal/kerneltest"
)

const diskGroupOpsEnv = "LOOPCTL_DISK_GROUP_OPS"

// The operations of both packages a user in the disk group tries, in the
// order the child makes them, and whether the kernel lets such a user
// (not root, no capabilities; with udev's rules, which give the loop
// devices to the group) make each: the README's table.
var diskGroupOps = []struct {
	name    string
	allowed bool
}{
	{"GetFree", true},
	{"Add", true},
	{"Remove", true},
	{"Attach", true},
	{"Lock", true},
	{"SetCapacity", true},
	{"List", true},
	{"FindByBackingFile", true},
	{"Monitor", true},
	{"WaitUdev", true},
	{"Rescan", false},
	{"Detach", true},
	{"Sweep", true},
}

// TestKernelDiskGroup tries every operation as a user in the disk group
// (not root, no capabilities), with udev running: each the kernel lets
// such a user make works, and each it refuses is an error matching
// fs.ErrPermission that says what is missing. It prints the table the
// README gives.
func TestKernelDiskGroup(t *testing.T) {
	if dir := os.Getenv(diskGroupOpsEnv); dir != "" {
		diskGroupOpsChild(t, dir)
		return
	}
	kerneltest.Udevd(t)
	disk := kerneltest.DiskGroup(t)
	u := kerneltest.NewUnprivileged(t)
	u.File(t, "image", 8<<20)
	u.File(t, "other", 8<<20)
	out, err := u.Run(t, "TestKernelDiskGroup", []uint32{disk}, diskGroupOpsEnv+"="+u.Dir)
	if err != nil {
		t.Fatalf("the disk group's operations: %v\n%s", err, out)
	}
	got := map[string]string{}
	for _, line := range strings.Split(out, "\n") {
		if rest, ok := strings.CutPrefix(line, "op "); ok {
			name, result, _ := strings.Cut(rest, ": ")
			got[name] = result
		}
	}
	table := "| operation | a user in the disk group |\n| --- | --- |\n"
	for _, op := range diskGroupOps {
		result, ok := got[op.name]
		switch {
		case !ok:
			t.Errorf("%s: not tried\n%s", op.name, out)
		case op.allowed && result != "ok":
			t.Errorf("%s: %s, want it to work", op.name, result)
		case !op.allowed && !strings.HasPrefix(result, "refused: "):
			t.Errorf("%s: %s, want it refused with an error matching fs.ErrPermission", op.name, result)
		}
		table += "| " + op.name + " | " + result + " |\n"
	}
	t.Logf("on %s, with udev:\n%s", kerneltest.Release(), table)

	// Outside the group: refused, saying why.
	out, err = u.Run(t, "TestKernelDiskGroup", nil, diskGroupOpsEnv+"="+u.Dir, outsideEnv+"=1")
	if err != nil {
		t.Fatalf("outside the disk group: %v\n%s", err, out)
	}
	for _, op := range []string{"Open", "Attach"} {
		if !strings.Contains(out, "op "+op+": refused: ") || !strings.Contains(out, "neither root nor in group disk") {
			t.Errorf("%s outside the disk group: want it refused, saying why:\n%s", op, out)
		}
	}
}

// outsideEnv has the child try as a user in no group of the devices.
const outsideEnv = "LOOPCTL_OUTSIDE_DISK_GROUP"

// diskGroupOpsChild makes each operation of diskGroupOps on files in dir,
// and prints "op NAME: ok", or "op NAME: refused: ERROR" for an error
// matching fs.ErrPermission, or "op NAME: failed: ERROR".
func diskGroupOpsChild(t *testing.T, dir string) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	image, other := dir+"/image", dir+"/other"
	report := func(name string, err error) {
		switch {
		case err == nil:
			fmt.Printf("op %s: ok\n", name)
		case errors.Is(err, fs.ErrPermission):
			fmt.Printf("op %s: refused: %v\n", name, err)
		default:
			fmt.Printf("op %s: failed: %v\n", name, err)
		}
	}
	if os.Getenv(outsideEnv) != "" {
		c, err := loopctl.Open()
		if err == nil {
			c.Close()
		}
		report("Open", err)
		d, err := loopctl.Attach(ctx, image, loopctl.Options{})
		if err == nil {
			d.Close()
		}
		report("Attach", err)
		return
	}
	c, err := loopctl.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_, err = c.GetFree()
	report("GetFree", err)
	n, err := c.Add(loopctl.AnyNumber)
	report("Add", err)
	if err == nil {
		// A device just made is root's until udev has processed it.
		d, err := loopctl.OpenDevice(n)
		if err == nil {
			d.Close()
			err = c.Remove(n)
		}
		report("Remove", err)
	}
	d, err := loopctl.Attach(ctx, image, loopctl.Options{Ref: "disk-group-test"})
	report("Attach", err)
	if err != nil {
		t.Fatal(err)
	}
	report("Lock", errors.Join(d.Lock(loopctl.LockShared), d.Lock(loopctl.LockNone)))
	report("SetCapacity", d.SetCapacity())
	list, err := loopctl.List()
	if err == nil && !listed(list, d.Number()) {
		err = fmt.Errorf("%s not listed", d.Path())
	}
	report("List", err)
	found, err := loopctl.FindByBackingFile(image)
	if err == nil && !listed(found, d.Number()) {
		err = fmt.Errorf("%s not found", d.Path())
	}
	report("FindByBackingFile", err)
	m, err := Open()
	if err == nil {
		err = m.Close()
	}
	report("Monitor", err)
	report("WaitUdev", WaitUdev(ctx, d))
	p, err := loopctl.Attach(ctx, other, loopctl.Options{Flags: loopctl.FlagPartScan | loopctl.FlagAutoClear})
	if err == nil {
		err = p.Rescan()
		p.Close()
	}
	report("Rescan", err)
	report("Detach", d.Detach(ctx))
	if d, err = loopctl.Attach(ctx, image, loopctl.Options{Ref: "disk-group-test"}); err == nil {
		d.Close()
		var swept []loopctl.Status
		swept, err = loopctl.Sweep(ctx, "disk-group-test")
		if err == nil && len(swept) != 1 {
			err = fmt.Errorf("swept %d bindings, want 1", len(swept))
		}
	}
	report("Sweep", err)
}

// listed tells whether device n is among the statuses.
func listed(list []loopctl.Status, n int) bool {
	for _, s := range list {
		if s.Number == n {
			return true
		}
	}
	return false
}
