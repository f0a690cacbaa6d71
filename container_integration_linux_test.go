//go:build integration

package loopctl

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/loopctl/loopctl/internal/kerneltest"
	"github.com/loopctl/loopctl/internal/sysfs"
)

// containerEnv tells a child of TestKernelContainer which container it is
// in; containerDirEnv names the parent's directory of images.
const (
	containerEnv    = "LOOPCTL_CONTAINER"
	containerDirEnv = "LOOPCTL_CONTAINER_DIR"
)

// The containers TestKernelContainer starts its children in.
var containers = map[string]*syscall.SysProcAttr{
	// A new mount namespace, as root: `docker run --device
	// /dev/loop-control`, or `unshare -m`.
	"mount": {Unshareflags: syscall.CLONE_NEWNS},
	// Root without CAP_MKNOD, as a runtime that drops it starts a
	// container (Kubernetes' restricted profile drops every capability).
	"nocap": {Unshareflags: syscall.CLONE_NEWNS},
	// Root under device rules (a devices cgroup it joins) that refuse
	// loop devices.
	"cgroup": {Unshareflags: syscall.CLONE_NEWNS},
	// A new user namespace too, root in it mapped to root outside:
	// `unshare -U -r -m`, a rootless container. No device node can be
	// made there.
	"user": {Cloneflags: syscall.CLONE_NEWUSER | syscall.CLONE_NEWNS,
		UidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: 0, Size: 1}},
		GidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: 0, Size: 1}}},
}

// TestKernelContainer runs the test again in child processes inside
// containers whose /dev is a tmpfs holding only loop-control, null and
// zero, as a container runtime gives it: the kernel makes no /dev/loopN
// there. In a mount namespace, Attach without MakeNode fails at once
// with the device's number, and with it binds, writes and reads, with
// partitions. In a user namespace, as root without CAP_MKNOD and under
// device rules that refuse loop devices, MakeNode's EPERM says which, at
// once. A binding made in the container from a bind-mounted directory is
// found from here by FindByBackingFile on this side's path.
func TestKernelContainer(t *testing.T) {
	switch os.Getenv(containerEnv) {
	case "mount":
		containerDev(t, false)
		inMountNS(t)
		return
	case "user":
		containerDev(t, true)
		inUserNS(t)
		return
	case "nocap":
		// Drop CAP_MKNOD from the bounding set and run again: root
		// then starts without it.
		runtime.LockOSThread()
		if err := unix.Prctl(unix.PR_CAPBSET_DROP, unix.CAP_MKNOD, 0, 0, 0); err != nil {
			t.Fatal(err)
		}
		env := slices.DeleteFunc(os.Environ(), func(v string) bool { return strings.HasPrefix(v, containerEnv+"=") })
		t.Fatal(syscall.Exec(os.Args[0], os.Args, append(env, containerEnv+"=nocap-dropped")))
	case "nocap-dropped":
		containerDev(t, true)
		withoutCapMknod(t)
		return
	case "cgroup":
		containerDev(t, false)
		underDeviceRules(t)
		return
	case "bindmount":
		containerDev(t, false)
		bindMountChild(t)
		return
	}
	kerneltest.Require(t)
	for _, kind := range []string{"mount", "nocap", "user"} {
		t.Run(kind, func(t *testing.T) { runContainer(t, kind) })
	}
	t.Run("cgroup", func(t *testing.T) { runContainer(t, "cgroup", containerDirEnv+"="+devicesCgroup(t)) })
	t.Run("bindmount", testBindMounted)
}

// runContainer runs the test again in the container kind, with env
// added, and fails unless it passes there.
func runContainer(t *testing.T, kind string, env ...string) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestKernelContainer$", "-test.count=1", "-test.v")
	cmd.Env = append(append(os.Environ(), containerEnv+"="+kind), env...)
	cmd.SysProcAttr = containers[kind]
	out, err := cmd.CombinedOutput()
	if err != nil || !bytes.Contains(out, []byte("--- PASS: TestKernelContainer")) {
		t.Fatalf("in the container: %v\n%s", err, out)
	}
	t.Logf("in the container:\n%s", out)
}

// devicesCgroup makes a cgroup of the (version 1) devices controller for
// the test, mounting the controller's hierarchy where it is not (a VM's
// init mounts none); it skips where there is no such controller (a
// machine with cgroup version 2 alone, whose device rules are BPF
// programs).
func devicesCgroup(t *testing.T) string {
	root := "/sys/fs/cgroup/devices"
	if _, err := os.Stat(root + "/devices.deny"); err != nil {
		if root, err = mountOnTemp(t, "cgroup", 0, "devices"); err != nil {
			t.Skipf("no devices cgroup controller of version 1 here (mount: %v)", err)
		}
	}
	cg := filepath.Join(root, fmt.Sprintf("loopctl-test-%d", os.Getpid()))
	if err := os.Mkdir(cg, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := os.Remove(cg); err != nil {
			t.Errorf("cgroup left behind: %v", err)
		}
	})
	return cg
}

// underDeviceRules runs in a container whose device rules (a devices
// cgroup, which it joins) refuse loop devices: first making their nodes,
// then, with that allowed, opening them.
func underDeviceRules(t *testing.T) {
	cg := os.Getenv(containerDirEnv)
	rule := func(file, rule string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(cg, file), []byte(rule), 0); err != nil {
			t.Fatalf("%s %q: %v", file, rule, err)
		}
	}
	rule("cgroup.procs", strconv.Itoa(os.Getpid()))
	f := kerneltest.TempFile(t, 1<<20)

	rule("devices.deny", "b 7:* m")
	_, err := attachInContainer(t, f.Name(), Options{MakeNode: true}, fs.ErrPermission)
	if !errors.Is(err, unix.EPERM) || !strings.Contains(err.Error(), `a device cgroup (the container's device rules) refuses to make block device 7:`) {
		t.Fatalf("Attach with MakeNode, mknod refused = %v, want EPERM, said to be the device rules'", err)
	}
	t.Logf("mknod refused: %v", err)

	rule("devices.allow", "b 7:* m")
	rule("devices.deny", "b 7:* rw")
	_, err = attachInContainer(t, f.Name(), Options{MakeNode: true}, fs.ErrPermission)
	if !errors.Is(err, unix.EPERM) || !strings.Contains(err.Error(), `made the node, but a device cgroup (the container's device rules) refuses block device 7:`) {
		t.Fatalf("Attach with MakeNode, open refused = %v, want EPERM, said to be the device rules'", err)
	}
	t.Logf("open refused: %v", err)
}

// containerDev puts a tmpfs over /dev holding only loop-control, null and
// zero: made with mknod, as a runtime given --device makes them, or, where
// no node can be made (a user namespace), bind-mounted from the nodes
// outside, as a rootless runtime does.
func containerDev(t *testing.T, bind bool) {
	names := containerNodes
	var fds []int
	for _, name := range names {
		fd, err := unix.Open("/dev/"+name, unix.O_PATH|unix.O_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		fds = append(fds, fd)
	}
	if err := unix.Mount("tmpfs", "/dev", "tmpfs", unix.MS_NOSUID, "mode=755"); err != nil {
		t.Fatalf("mount tmpfs on /dev: %v", err)
	}
	for i, name := range names {
		path := "/dev/" + name
		if bind {
			if err := os.WriteFile(path, nil, 0o666); err != nil {
				t.Fatal(err)
			}
			if err := unix.Mount(fmt.Sprintf("/proc/self/fd/%d", fds[i]), path, "", unix.MS_BIND, ""); err != nil {
				t.Fatalf("bind-mount %s: %v", path, err)
			}
		} else {
			var st unix.Stat_t
			if err := unix.Fstat(fds[i], &st); err != nil {
				t.Fatal(err)
			}
			if err := unix.Mknod(path, st.Mode, int(st.Rdev)); err != nil {
				t.Fatalf("mknod %s: %v", path, err)
			}
		}
		unix.Close(fds[i])
	}
	if ents, err := os.ReadDir("/dev"); err != nil || len(ents) != len(names) {
		t.Fatalf("/dev holds %v (%v), want only %v", ents, err, names)
	}
}

// containerNodes are the nodes a container's /dev holds.
var containerNodes = []string{"loop-control", "null", "zero"}

// bareDev checks that /dev holds only containerNodes, and removes any
// other node once the test is over, so that each test starts without the
// nodes of loop devices, and Attach with MakeNode must make them.
func bareDev(t *testing.T) {
	t.Helper()
	if ents, err := os.ReadDir("/dev"); err != nil || len(ents) != len(containerNodes) {
		t.Fatalf("/dev holds %v (%v), want only %v", ents, err, containerNodes)
	}
	t.Cleanup(func() {
		ents, _ := os.ReadDir("/dev")
		for _, e := range ents {
			if !slices.Contains(containerNodes, e.Name()) {
				os.Remove("/dev/" + e.Name())
			}
		}
	})
}

// attachInContainer attaches path with o, and checks that it fails at
// once (no race lost, no retry) and leaves nothing behind, when want is
// not nil: an error matching want, with no node made.
func attachInContainer(t *testing.T, path string, o Options, want error) (*Device, error) {
	t.Helper()
	bareDev(t)
	races := host.lostRaces.Load() // internal: no API tells a race retried
	d, err := Attach(context.Background(), path, o)
	if want == nil {
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			detach(t, d)
			kerneltest.WaitUnbound(t, d.Number())
			if found, err := FindByBackingFile(path); err != nil || len(found) != 0 {
				t.Errorf("left bound: %+v, %v", found, err)
			}
		})
		return d, nil
	}
	if err == nil {
		d.Close()
		t.Fatalf("Attach(%+v) bound %s in the container", o, d.Path())
	}
	if !errors.Is(err, want) {
		t.Fatalf("Attach(%+v) = %v, want %v", o, err, want)
	}
	if n := host.lostRaces.Load() - races; n != 0 {
		t.Errorf("Attach(%+v) took %d lost races to fail, want it at once", o, n)
	}
	if found, ferr := FindByBackingFile(path); ferr != nil || len(found) != 0 {
		t.Errorf("left bound: %+v, %v", found, ferr)
	}
	if ents, _ := os.ReadDir("/dev"); len(ents) != len(containerNodes) {
		t.Errorf("/dev holds %v after a failed Attach, want only what it held", ents)
	}
	return nil, err
}

// missingNodeOf checks that err names the missing node of a device that
// exists.
func missingNodeOf(t *testing.T, err error) *NodeMissingError {
	t.Helper()
	var missing *NodeMissingError
	if !errors.As(err, &missing) {
		t.Fatalf("%v: no *NodeMissingError", err)
	}
	if missing.Path != DevicePath(missing.Number) || missing.Partition != 0 {
		t.Errorf("%+v: want the node of loop%d", missing, missing.Number)
	}
	if _, err := os.Stat(sysfs.LoopDir(sysfs.Root, missing.Number)); err != nil {
		t.Errorf("loop%d, named missing, is not in sysfs: %v", missing.Number, err)
	}
	return missing
}

// machineDev mounts the machine's devtmpfs, which the container's /dev
// hides, within the container's mount namespace, and returns where: its
// nodes are the ones udev opens and locks.
func machineDev(t *testing.T) string {
	t.Helper()
	dir, err := mountOnTemp(t, "devtmpfs", unix.MS_NOSUID|unix.MS_NOEXEC, "")
	if err != nil {
		t.Fatalf("mount devtmpfs: %v", err)
	}
	return dir
}

// mountOnTemp mounts a file system of type fstype on a new directory of
// its own until the test ends, and returns the directory. The directory is
// removed, never emptied: were the unmount to fail, its contents would be
// the mounted file system's (the machine's device nodes, its cgroups).
func mountOnTemp(t *testing.T, fstype string, flags uintptr, data string) (string, error) {
	t.Helper()
	dir, err := os.MkdirTemp("", fstype+"-")
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(fstype, dir, fstype, flags, data); err != nil {
		os.Remove(dir)
		return "", err
	}
	t.Cleanup(func() {
		unix.Unmount(dir, unix.MNT_DETACH)
		os.Remove(dir)
	})
	return dir, nil
}

// inMountNS runs in a container that may make nodes.
func inMountNS(t *testing.T) {
	t.Run("without MakeNode", func(t *testing.T) {
		f := kerneltest.TempFile(t, 1<<20)
		_, err := attachInContainer(t, f.Name(), Options{}, fs.ErrNotExist)
		missing := missingNodeOf(t, err)
		// What the caller does with the number: make the node, and
		// open the device.
		if err := MakeNode(missing.Number); err != nil {
			t.Fatal(err)
		}
		d, err := OpenDevice(missing.Number)
		if err != nil {
			t.Fatal(err)
		}
		d.Close()
	})
	t.Run("MakeNode", func(t *testing.T) {
		f := kerneltest.TempFile(t, 1<<20)
		d, _ := attachInContainer(t, f.Name(), Options{MakeNode: true}, nil)
		checkNode(t, d.Path(), d.Number(), "dev")
		checkData(t, d.Path(), f, 0)
	})
	t.Run("MakeNode, Reuse", func(t *testing.T) {
		f := kerneltest.TempFile(t, 1<<20)
		o := Options{MakeNode: true, Reuse: true}
		d, _ := attachInContainer(t, f.Name(), o, nil)
		// Another process of the container comes to the same image
		// without the node: it must find the device, make its node, and
		// share it.
		if err := os.Remove(d.Path()); err != nil {
			t.Fatal(err)
		}
		d2, err := Attach(context.Background(), f.Name(), o)
		if err != nil {
			t.Fatal(err)
		}
		defer d2.Close()
		if d2.Number() != d.Number() || !d2.Shared() {
			d2.ClearFD()
			t.Fatalf("Attach with Reuse gave loop%d (shared %v), want loop%d shared", d2.Number(), d2.Shared(), d.Number())
		}
		checkNode(t, d.Path(), d.Number(), "dev")
	})
	t.Run("MakeNode, partitions added", func(t *testing.T) {
		f := kerneltest.TempFile(t, 4<<20)
		d, _ := attachInContainer(t, f.Name(), Options{MakeNode: true}, nil)
		host := fmt.Sprintf("%s/loop%d", machineDev(t), d.Number())
		release := kerneltest.AddPartition(t, d.Path(), host, 1, 2048, 2048) // in sectors: 1 MiB at 1 MiB
		// A partition added by hand outlives the binding: delete it
		// before the device is detached. udev probes a new partition
		// holding a shared lock of its disk, and the kernel refuses to
		// delete an open partition: an exclusive lock waits out the
		// probe and keeps the next one off.
		t.Cleanup(func() {
			release()
			unlock := kerneltest.LockNode(t, host, unix.LOCK_EX)
			defer unlock()
			if out, err := exec.Command("delpart", d.Path(), "1").CombinedOutput(); err != nil {
				t.Errorf("delpart: %v: %s", err, out)
			}
		})
		parts, err := d.Partitions()
		if err != nil || len(parts) != 1 {
			t.Fatalf("partitions %+v, %v; want the one added", parts, err)
		}
		_, err = os.Stat(parts[0].Path)
		if !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("%s before MakeNode: %v; want it missing", parts[0].Path, err)
		}
		if err := parts[0].MakeNode(); err != nil {
			t.Fatal(err)
		}
		checkNode(t, parts[0].Path, d.Number(), fmt.Sprintf("loop%dp1/dev", d.Number()))
		checkData(t, parts[0].Path, f, int64(parts[0].Start))
	})
	t.Run("MakeNode, partitions scanned", func(t *testing.T) {
		requireConfig(t, "CONFIG_MSDOS_PARTITION")
		f := kerneltest.TempFile(t, 8<<20)
		if err := writeMBR(f, 8<<20, []part{{start: 2048, sectors: 4096}, {start: 8192, sectors: 2048}}); err != nil {
			t.Fatal(err)
		}
		d, _ := attachInContainer(t, f.Name(), Options{MakeNode: true, Flags: FlagPartScan}, nil)
		parts, err := d.Partitions()
		if err != nil || len(parts) != 2 {
			t.Fatalf("partitions %+v, %v; want 2", parts, err)
		}
		for i, p := range parts {
			checkNode(t, p.Path, d.Number(), fmt.Sprintf("loop%dp%d/dev", d.Number(), i+1))
			checkData(t, p.Path, f, int64(p.Start))
		}
	})
}

// inUserNS runs in a container where no node can be made.
func inUserNS(t *testing.T) {
	f := kerneltest.TempFile(t, 1<<20)
	_, err := attachInContainer(t, f.Name(), Options{}, fs.ErrNotExist)
	missingNodeOf(t, err)
	_, err = attachInContainer(t, f.Name(), Options{MakeNode: true}, fs.ErrPermission)
	if !errors.Is(err, unix.EPERM) || !strings.Contains(err.Error(), "user namespace") {
		t.Fatalf("Attach with MakeNode = %v, want EPERM, said to be the user namespace's", err)
	}
	t.Logf("Attach with MakeNode: %v", err)
}

// withoutCapMknod runs in a container whose root lacks CAP_MKNOD.
func withoutCapMknod(t *testing.T) {
	f := kerneltest.TempFile(t, 1<<20)
	_, err := attachInContainer(t, f.Name(), Options{MakeNode: true}, fs.ErrPermission)
	if !errors.Is(err, unix.EPERM) || !strings.Contains(err.Error(), "lacks CAP_MKNOD") {
		t.Fatalf("Attach with MakeNode = %v, want EPERM, said to be for want of CAP_MKNOD", err)
	}
	t.Logf("Attach with MakeNode: %v", err)
}

// checkNode checks that path is the block device node that attribute attr
// of loop device n's sysfs directory gives, with mode 0660.
func checkNode(t *testing.T, path string, n int, attr string) {
	t.Helper()
	want := readAttr(t, n, attr)
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	got := fmt.Sprintf("%d:%d", unix.Major(uint64(st.Rdev)), unix.Minor(uint64(st.Rdev)))
	if st.Mode&unix.S_IFMT != unix.S_IFBLK || got != want || st.Mode&0o777 != 0o660 {
		t.Fatalf("%s: mode %#o, device %s; want a block device %s, mode 0660", path, st.Mode, got, want)
	}
}

// checkData writes a block through the node at path and reads it back,
// through the node and from f at off, where it must have landed.
func checkData(t *testing.T, path string, f *os.File, off int64) {
	t.Helper()
	block := bytes.Repeat([]byte(filepath.Base(path)+" "), 4096)[:4096]
	node, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer node.Close()
	if _, err := node.WriteAt(block, 4096); err != nil {
		t.Fatal(err)
	}
	if err := node.Sync(); err != nil {
		t.Fatal(err)
	}
	for _, r := range []struct {
		what string
		f    *os.File
		off  int64
	}{{path, node, 4096}, {f.Name(), f, off + 4096}} {
		got := make([]byte, len(block))
		if _, err := r.f.ReadAt(got, r.off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, block) {
			t.Fatalf("%s at %d: %q..., want the block written through %s", r.what, r.off, got[:16], path)
		}
	}
}

// bindMountPoint is where the container sees the host's directory: in a
// tmpfs of its own over /tmp, which every machine (a VM's initramfs too)
// has.
const bindMountPoint = "/tmp/example"

// testBindMounted binds, in a container, an image of a directory
// bind-mounted into it, and finds the binding from here.
func testBindMounted(t *testing.T) {
	dir := t.TempDir()
	f := fileIn(t, dir, 1<<20)
	c := startPipedIn(t, containers["mount"], "TestKernelContainer", containerEnv+"=bindmount", containerDirEnv+"="+dir)
	fmt.Fprintln(c.stdin, filepath.Base(f.Name()))
	n := -1
	for n < 0 && c.out.Scan() {
		fmt.Sscanf(c.out.Text(), "bound %d", &n)
	}
	if n < 0 {
		c.stdin.Close()
		t.Fatalf("the container bound nothing: %v", c.cmd.Wait())
	}
	found, err := FindByBackingFile(f.Name())
	if err != nil {
		t.Fatal(err)
	}
	if len(found) != 1 || found[0].Number != n {
		t.Fatalf("FindByBackingFile(%s) = %+v, want loop%d, bound in the container", f.Name(), found, n)
	}
	// The path is the one the binder saw, in its mount namespace.
	want := bindMountPoint + "/" + filepath.Base(f.Name())
	if found[0].BackingFile != want {
		t.Errorf("BackingFile %q, want the container's %q", found[0].BackingFile, want)
	}
	// So do List, and Status of the device opened here.
	list, err := List()
	if i := slices.IndexFunc(list, func(s Status) bool { return s.Number == n }); err != nil || i < 0 || list[i] != found[0] {
		t.Errorf("List = %+v, %v; want loop%d as FindByBackingFile gave it", list, err, n)
	}
	d, err := OpenDevice(n)
	if err != nil {
		t.Fatal(err)
	}
	s, err := d.Status()
	d.Close()
	if err != nil || s != found[0] {
		t.Errorf("Status from here = %+v, %v; want %+v", s, err, found[0])
	}
	c.stdin.Close() // the child detaches
	if err := c.cmd.Wait(); err != nil {
		t.Fatalf("the container: %v", err)
	}
	kerneltest.WaitUnbound(t, n)
}

// bindMountChild is testBindMounted's container: it bind-mounts the
// parent's directory at bindMountPoint, binds the image the parent names
// there, says which device, and detaches once the parent closes its input.
func bindMountChild(t *testing.T) {
	// The directory is under /tmp, which the tmpfs hides: hold it first.
	dir, err := unix.Open(os.Getenv(containerDirEnv), unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(dir)
	if err := unix.Mount("tmpfs", "/tmp", "tmpfs", 0, "mode=1777"); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(bindMountPoint, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(fmt.Sprintf("/proc/self/fd/%d", dir), bindMountPoint, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	var name string
	if _, err := fmt.Scanln(&name); err != nil {
		t.Fatal(err)
	}
	path := bindMountPoint + "/" + name
	d, err := Attach(context.Background(), path, Options{MakeNode: true})
	if err != nil {
		t.Fatal(err)
	}
	defer detach(t, d)
	if found, err := FindByBackingFile(path); err != nil || len(found) != 1 || found[0].BackingFile != path {
		t.Errorf("in the container, FindByBackingFile(%s) = %+v, %v", path, found, err)
	}
	if s, err := d.Status(); err != nil || s.BackingFile != path {
		t.Errorf("in the container, Status = %+v, %v; want the backing file %s", s, err, path)
	}
	fmt.Printf("bound %d\n", d.Number())
	var b [1]byte
	os.Stdin.Read(b[:]) // until the parent is done
}
