//go:build linux

// Command vmrun runs loopctl's integration tests on the kernels and the
// architectures users run, each in a qemu virtual machine: Debian's 5.10
// (bullseye), 6.1 (bookworm) and 6.12 (trixie), and the newest kernel Debian
// serves, from trixie-backports, chosen by its version (so that the matrix
// follows new releases without edits), with /tmp on a tmpfs or on ext4; on
// amd64, or as 32-bit programs on it (386), or on arm64, 32-bit ARM
// (armhf, GOARM=7), s390x (big-endian) or ppc64el.
//
//	cd internal/vmrun
//	go run .                                   # every kernel, both /tmp kinds
//	go run . -kernel 6.1 -tmp ext4             # one machine
//	go run . -kernel newest -arch 386          # the tests as 32-bit programs
//	go run . -kernel newest -arch s390x -tmp tmpfs
//	go run . -kernel 6.12 -cmdline bdev_allow_write_mounted=0 -- -test.run TestKernelReadOnlyDescriptor
//	go run . -kernel 5.10 -- -test.run 'TestKernelAttach' -test.v
//	go run . -tmp tmpfs -facts ../../KERNELS.md -- -test.run '^TestKernelFacts$' -test.v
//
// It is a module of its own, so that the library's module, its go
// directive and its go test ./... hold the library alone. It builds the
// library of the source tree it sits in: the nearest directory above the
// working directory whose go.mod is the library's.
//
// With -facts it gathers the lines TestKernelFacts prints on each machine,
// runs that test on this machine too, and writes the table of what each
// kernel answers (KERNELS.md).
//
// Arguments after the flags go to each test binary (default: -test.short
// -test.timeout=10m, so that a test that hangs dumps its goroutines before
// the machine's own timeout stops it silently). The guest's init runs them
// with -test.v, to count what passed, skipped and failed, but prints what
// go test prints without it, unless -test.v is among them.
//
// It needs root (apt, and the loop devices the tests make inside the
// machine are the guest's own), the machine's qemu (qemu-system-x86_64,
// -aarch64, -arm, -s390x or -ppc64: Debian's qemu-system-x86,
// qemu-system-arm, qemu-system-misc and qemu-system-ppc), dpkg-deb, xz,
// mkfs.ext4, util-linux, and Go; nothing but Debian's packages is
// downloaded, by apt, with a sources list of its own. Kernels, package lists
// and packages are kept in -cache between runs.
//
// For each kernel it fetches the newest package of the Debian release that
// ships it, of the machine's flavour (amd64, arm64, armmp, s390x,
// powerpc64le): linux-image-VERSION-FLAVOUR, -unsigned where Debian signs
// that flavour; from Linux 7 on, Debian splits a kernel into
// linux-binary[-unsigned]-VERSION-FLAVOUR, with the kernel in
// usr/lib/modules/VERSION/, linux-modules-VERSION-FLAVOUR and
// linux-base-VERSION-FLAVOUR, with its config. It builds the integration
// test binaries (the library's, and examples/losetup's comparison with
// util-linux, which there also compares -D) and a static init
// (guestinit) for the machine, packs them with the programs
// the tests run (util-linux's, which they compare against, and
// mkfs.ext4), the libraries those load (their ELF DT_NEEDED entries,
// resolved as the loader does) and the kernel's loop module into an
// initramfs, and boots it under qemu's TCG (a KVM guest hung at boot on the
// project's machines). The programs are this machine's for amd64 and 386;
// for another architecture, Debian's packages of them for it, of this
// machine's release (bookworm), so that every guest compares against the
// same util-linux. It streams the guest's console from its init on (all of
// it when the init is never reached), and exits with the highest exit
// status of the test binaries, 0 when every machine passed.
package main

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"debug/elf"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"log"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
)

// releases maps a kernel version to the Debian release that ships it;
// "newest" is the newest version the last of them serves.
var releases = map[string]string{"5.10": "bullseye", "6.1": "bookworm", "6.12": "trixie", newest: "trixie-backports"}

// newest names the newest kernel Debian serves, whatever its version.
const newest = "newest"

// programs are the programs the tests run: util-linux's, and mkfs.ext4
// for a file system to mount on a loop device.
var programs = []string{"losetup", "addpart", "delpart", "flock", "mkfs.ext4"}

func main() {
	log.SetFlags(0)
	log.SetPrefix("vmrun: ")
	kernels := flag.String("kernel", "5.10,6.1,6.12,"+newest, "kernel versions, comma-separated: "+strings.Join(slices.Sorted(maps.Keys(releases)), ", "))
	tmps := flag.String("tmp", "tmpfs,ext4", "what /tmp is in the guest, comma-separated: tmpfs, ext4")
	arch := flag.String("arch", hostArch, "the machine: "+strings.Join(slices.Sorted(maps.Keys(machines)), ", ")+
		" (386: the tests as 32-bit programs on amd64's kernel, the compat ioctl path; armhf: as GOARM=7 programs)")
	cache := flag.String("cache", cacheDir(), "where kernels and package lists are kept between runs ($LOOPCTL_VM_CACHE)")
	timeout := flag.Duration("timeout", 15*time.Minute, "the longest one machine may run")
	cmdline := flag.String("cmdline", "", "more kernel parameters for the machines, such as bdev_allow_write_mounted=0")
	modules := flag.String("modules", "", "more kernel modules to load in the machines, comma-separated, such as squashfs,vfat (loop and ext4 always are)")
	facts := flag.String("facts", "", "write the table of what TestKernelFacts printed on each machine, and on this one, to this Markdown file (KERNELS.md)")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: vmrun [flags] [test binary arguments]\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	testArgs := flag.Args()
	if len(testArgs) == 0 {
		testArgs = []string{"-test.short", "-test.timeout=10m"}
	}
	if os.Geteuid() != 0 {
		log.Fatal("run as root: apt needs it, and so does the cache in /var/cache")
	}
	m, ok := machines[*arch]
	if !ok {
		log.Fatalf("unknown -arch %q", *arch)
	}
	lib, err := libraryDir()
	if err != nil {
		log.Fatal(err)
	}
	r := &runner{lib: lib, cache: *cache, timeout: *timeout, testArgs: testArgs, arch: *arch, machine: m, cmdline: *cmdline}
	if *facts != "" {
		r.facts = &factTable{answers: map[string]map[string]string{}}
	}
	if *modules != "" {
		r.modules = strings.Split(*modules, ",")
	}
	defer r.cleanup()
	failed := 0
	for _, k := range strings.Split(*kernels, ",") {
		for _, tmp := range strings.Split(*tmps, ",") {
			code, err := r.run(k, tmp)
			switch {
			case err != nil:
				log.Printf("Linux %s, /tmp on %s: %v", k, tmp, err)
				failed = max(failed, 1)
			case code != 0:
				log.Printf("Linux %s, /tmp on %s: the tests failed (exit %d)", k, tmp, code)
				failed = max(failed, code)
			default:
				log.Printf("Linux %s, /tmp on %s: ok", k, tmp)
			}
		}
	}
	if r.facts != nil && failed == 0 {
		if err := r.writeFacts(*facts); err != nil {
			log.Printf("-facts: %v", err)
			failed = 1
		}
	}
	r.cleanup()
	os.Exit(failed)
}

// libraryModule is the library's module path, as its go.mod declares it.
const libraryModule = "github.com/loopctl/loopctl"

// libraryDir returns the nearest directory, from the working directory up,
// whose go.mod declares the library's module.
func libraryDir() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && modulePath(b) == libraryModule {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("no go.mod of module %s in the working directory or above: run vmrun from loopctl's source tree", libraryModule)
		}
		dir = parent
	}
}

// modulePath returns the module path a go.mod declares, or "".
func modulePath(gomod []byte) string {
	for line := range strings.Lines(string(gomod)) {
		if rest, ok := strings.CutPrefix(strings.TrimSpace(line), "module "); ok {
			rest, _, _ = strings.Cut(rest, "//")
			return strings.Trim(strings.TrimSpace(rest), `"`)
		}
	}
	return ""
}

func cacheDir() string {
	if d := os.Getenv("LOOPCTL_VM_CACHE"); d != "" {
		return d
	}
	return "/var/cache/loopctl-vm"
}

// A runner runs test machines, building what they need once.
type runner struct {
	lib      string // the library's source tree, whose tests the machines run
	cache    string
	timeout  time.Duration
	testArgs []string
	arch     string   // the -arch
	machine  machine  // what it boots
	cmdline  string   // kernel parameters beyond the console's
	modules  []string // kernel modules beyond those the tests always need

	facts *factTable // gathered for -facts, or nil

	work      string   // this run's scratch directory
	updated   bool     // the package lists are fresh
	arches    []string // Debian architectures the package lists are of
	updateErr error    // what apt-get update said went wrong, if anything
	test      string   // the library's test binary
	losetup   string   // examples/losetup's test binary: the comparison with util-linux
	init      string   // the guest's init
}

// cleanup removes the scratch directory.
func (r *runner) cleanup() {
	if r.work != "" {
		os.RemoveAll(r.work)
	}
}

// run boots kernel version k with /tmp on tmp and returns the test
// binary's exit status.
func (r *runner) run(k, tmp string) (int, error) {
	if tmp != "tmpfs" && tmp != "ext4" {
		return 0, fmt.Errorf("unknown -tmp %q", tmp)
	}
	if err := r.prepare(); err != nil {
		return 0, err
	}
	kern, err := r.kernel(k)
	if err != nil {
		return 0, err
	}
	log.Printf("Linux %s (%s), /tmp on %s, %s tests", k, kern.release, tmp, r.arch)
	initrd := filepath.Join(r.work, "initrd-"+k+"-"+tmp+".gz")
	if err := r.initramfs(initrd, kern, tmp); err != nil {
		return 0, fmt.Errorf("initramfs: %w", err)
	}
	args := append(slices.Clone(r.machine.qemuArgs), "-accel", "tcg", "-smp", "2", "-m", "2048",
		"-kernel", kern.vmlinuz, "-initrd", initrd,
		"-append", strings.TrimSpace("console="+r.machine.console+" panic=-1 loglevel=4 "+r.cmdline),
		"-nographic", "-no-reboot", "-monitor", "none", "-nic", "none")
	if tmp == "ext4" {
		disk := filepath.Join(r.work, "tmp.ext4")
		if err := mkfs(disk); err != nil {
			return 0, err
		}
		defer os.Remove(disk)
		args = append(args, "-drive", "file="+disk+",if=virtio,format=raw")
	}
	code, err := boot(r.machine.qemu, args, r.timeout, r.facts.line)
	if errors.Is(err, errNoInit) {
		// None of the tests ran: the emulated kernel died in its own
		// boot (once, 6.12 under TCG: an int3 oops while it patched its
		// code). A second boot tells such a flake from a kernel that
		// cannot boot here.
		log.Printf("Linux %s, /tmp on %s: %v; booting once more", k, tmp, err)
		code, err = boot(r.machine.qemu, args, r.timeout, r.facts.line)
	}
	return code, err
}

// errNoInit reports a guest whose kernel stopped before it ran the init.
var errNoInit = errors.New("the kernel stopped before it ran the init")

// prepare makes the scratch directory and builds the test binaries and the
// guest's init, once.
func (r *runner) prepare() error {
	if r.work != "" {
		return nil
	}
	work, err := os.MkdirTemp("", "vmrun-")
	if err != nil {
		return err
	}
	r.work = work
	r.test, r.init = filepath.Join(work, "loopctl.test"), filepath.Join(work, "init")
	r.losetup = filepath.Join(work, "losetup.test")
	m := r.machine
	for _, c := range [][]string{
		{r.lib, m.goarch, "go", "test", "-c", "-tags", "integration", "-o", r.test, "."},
		{r.lib, m.goarch, "go", "test", "-c", "-tags", "integration", "-o", r.losetup, "./examples/losetup"},
		{filepath.Join(r.lib, "internal", "vmrun"), m.initArch(), "go", "build", "-o", r.init, "./guestinit"},
	} {
		dir, arch, c := c[0], c[1], c[2:]
		cmd := exec.Command(c[0], c[1:]...)
		cmd.Dir = dir
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+arch)
		if arch == "arm" {
			cmd.Env = append(cmd.Env, "GOARM="+m.goarm)
		}
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("%s: %v\n%s", strings.Join(c, " "), err, out)
		}
	}
	return nil
}

// A kernel is an unpacked Debian kernel package.
type kernel struct {
	release string // uname -r
	vmlinuz string
	config  string // boot/config-RELEASE: how it was built, for the tests
	modules string // its lib/modules/RELEASE directory
}

// kernel returns Debian's newest kernel of version k, fetching and unpacking
// it unless the cache has it. A kernel the mirror does not serve (a mirror
// can lag its package lists, or hold a part of an architecture's pool) is
// passed over for the next older one, at most maxTries of them.
func (r *runner) kernel(k string) (*kernel, error) {
	suite, ok := releases[k]
	if !ok {
		return nil, fmt.Errorf("no Debian release known for Linux %s", k)
	}
	candidates, err := r.kernelPackages(suite, k)
	if err != nil {
		return nil, err
	}
	var errs []error
	for _, pkgs := range candidates[:min(len(candidates), maxTries)] {
		dir := filepath.Join(r.cache, "kernels", pkgs[0])
		if isDir(dir) {
			return findKernel(dir)
		}
		var qualified []string
		for _, p := range pkgs {
			qualified = append(qualified, p+":"+r.machine.debian)
		}
		err := r.unpack(qualified, dir)
		if err == nil {
			return findKernel(dir)
		}
		log.Printf("%s: %v", pkgs[0], firstLine(err))
		errs = append(errs, err)
	}
	return nil, fmt.Errorf("no kernel of Linux %s for %s could be fetched: %w", k, r.machine.debian, errors.Join(errs...))
}

// maxTries is how many kernels, newest first, kernel tries to fetch.
const maxTries = 8

// firstLine is the first line of err's text, for a log.
func firstLine(err error) string {
	s, _, _ := strings.Cut(err.Error(), "\n")
	return s
}

// findKernel finds the kernel, its config and its modules where its
// packages were unpacked, dir: boot/vmlinuz-RELEASE, boot/config-RELEASE
// and lib/modules/RELEASE until Linux 6, usr/lib/modules/RELEASE with
// vmlinuz.unsigned and config in it from 7 on.
func findKernel(dir string) (*kernel, error) {
	kern := &kernel{}
	if vmlinuz, _ := filepath.Glob(filepath.Join(dir, "boot", "vmlinuz-*")); len(vmlinuz) == 1 {
		kern.vmlinuz = vmlinuz[0]
		kern.release = strings.TrimPrefix(filepath.Base(vmlinuz[0]), "vmlinuz-")
		kern.config = filepath.Join(dir, "boot", "config-"+kern.release)
	} else if vmlinuz, _ := filepath.Glob(filepath.Join(dir, "usr", "lib", "modules", "*", "vmlinuz*")); len(vmlinuz) == 1 {
		kern.vmlinuz = vmlinuz[0]
		kern.release = filepath.Base(filepath.Dir(vmlinuz[0]))
		kern.config = filepath.Join(filepath.Dir(vmlinuz[0]), "config")
	} else {
		return nil, fmt.Errorf("%s: no one kernel in boot/ or usr/lib/modules/", dir)
	}
	for _, m := range []string{"lib/modules", "usr/lib/modules"} {
		if d := filepath.Join(dir, m, kern.release); isDir(d) && hasModules(d) {
			kern.modules = d
		}
	}
	if kern.modules == "" {
		return nil, fmt.Errorf("%s: no modules for %s", dir, kern.release)
	}
	if _, err := os.Stat(kern.config); err != nil {
		return nil, fmt.Errorf("%s: no config for %s: %w", dir, kern.release, err)
	}
	return kern, nil
}

// hasModules tells whether the modules directory d holds any (kernel/).
func hasModules(d string) bool { return isDir(filepath.Join(d, "kernel")) }

func isDir(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.IsDir()
}

// apt runs apt-get or apt-cache, in directory wd unless it is empty, with a
// configuration of its own under the cache: the Debian releases of the
// kernels, and nothing of the system's.
func (r *runner) apt(wd, tool string, args ...string) ([]byte, error) {
	dir := filepath.Join(r.cache, "apt")
	for _, d := range []string{"lists/partial", "cache/archives/partial"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			return nil, err
		}
	}
	list := filepath.Join(dir, "sources.list")
	var b strings.Builder
	opt := "[signed-by=/usr/share/keyrings/debian-archive-keyring.gpg arch=" + strings.Join(r.arches, ",") + "]"
	for _, suite := range slices.Sorted(maps.Values(releases)) {
		fmt.Fprintf(&b, "deb %s http://deb.debian.org/debian %s main\n", opt, suite)
		if !strings.HasSuffix(suite, "-backports") {
			fmt.Fprintf(&b, "deb %s http://deb.debian.org/debian-security %s-security main\n", opt, suite)
		}
	}
	if err := os.WriteFile(list, []byte(b.String()), 0o644); err != nil {
		return nil, err
	}
	opts := []string{
		"-o", "Dir::Etc::SourceList=" + list, "-o", "Dir::Etc::SourceParts=/dev/null",
		"-o", "Dir::State::Lists=" + filepath.Join(dir, "lists"), "-o", "Dir::Cache=" + filepath.Join(dir, "cache"),
		"-o", "Dir::State::status=/dev/null", "-o", "APT::Sandbox::User=root", "-q",
		"-o", "APT::Architecture=" + hostArch,
	}
	for _, a := range r.arches {
		opts = append(opts, "-o", "APT::Architectures::="+a)
	}
	cmd := exec.Command(tool, append(opts, args...)...)
	cmd.Dir = wd
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("%s %s: %v\n%s", tool, strings.Join(args, " "), err, stderr.Bytes())
	}
	return out, nil
}

// lists makes sure the package lists are of the Debian releases of the
// kernels and of the machine's architecture, refreshing them once a run
// (at most once a day). They stay of the architectures they were of, so
// that runs of different machines do not fetch them anew in turn.
func (r *runner) lists() {
	if r.updated {
		return
	}
	r.updated = true
	stamp := filepath.Join(r.cache, "apt", "updated")
	suites := strings.Join(slices.Sorted(maps.Values(releases)), " ")
	had, fresh := stampOf(stamp, suites)
	r.arches = had
	for _, a := range []string{hostArch, r.machine.debian} {
		if !slices.Contains(r.arches, a) {
			r.arches, fresh = append(r.arches, a), false
		}
	}
	slices.Sort(r.arches)
	if fresh {
		return
	}
	log.Print("apt-get update (Debian ", suites, "; ", strings.Join(r.arches, ", "), ")")
	// A release gone from the mirror (an old one moves to archive.debian.org
	// in time) fails its own kernels, below, not the others.
	if _, err := r.apt("", "apt-get", "update"); err != nil {
		r.updateErr = err
		log.Print(err)
	} else if err := os.WriteFile(stamp, []byte(suites+"\n"+strings.Join(r.arches, " ")), 0o644); err != nil {
		r.updateErr = err
	}
}

// kernelPackages returns the packages of each kernel of version k of the
// machine's flavour (of any version, for "newest", which is in suite),
// newest first, each kernel's own package first.
func (r *runner) kernelPackages(suite, k string) ([][]string, error) {
	r.lists()
	pattern := kernelPattern(k, r.machine.flavour)
	out, err := r.apt("", "apt-cache", "search", "--names-only", pattern)
	if err != nil {
		return nil, err
	}
	var names []string
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if name, _, ok := strings.Cut(line, " "); ok {
			names = append(names, name)
		}
	}
	pkgs := kernelCandidates(names)
	if len(pkgs) == 0 {
		if r.updateErr != nil {
			return nil, fmt.Errorf("no package matches %s in Debian %s; apt-get update failed: %w", pattern, suite, r.updateErr)
		}
		return nil, fmt.Errorf("no package matches %s in Debian %s", pattern, suite)
	}
	return pkgs, nil
}

// stampOf reads the stamp file at path: the architectures the package
// lists are of, and whether it is less than a day old and of suites.
func stampOf(path, suites string) (arches []string, fresh bool) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, false
	}
	fi, err := os.Stat(path)
	of, archLine, _ := strings.Cut(string(b), "\n")
	return strings.Fields(archLine), err == nil && time.Since(fi.ModTime()) < 24*time.Hour && of == suites
}

// compareVersions orders package names by their numbers: 5.10.0-9 before
// 5.10.0-46.
func compareVersions(a, b string) int {
	num := regexp.MustCompile(`[0-9]+|[^0-9]+`)
	as, bs := num.FindAllString(a, -1), num.FindAllString(b, -1)
	for i := 0; i < len(as) && i < len(bs); i++ {
		x, errx := strconv.Atoi(as[i])
		y, erry := strconv.Atoi(bs[i])
		if errx == nil && erry == nil {
			if x != y {
				return x - y
			}
			continue
		}
		if c := strings.Compare(as[i], bs[i]); c != 0 {
			return c
		}
	}
	return len(as) - len(bs)
}

// unpack downloads packages pkgs and unpacks them into dir, leaving
// nothing there when it fails. Each is named as apt-get download takes it:
// NAME:ARCH, or NAME:ARCH/RELEASE.
func (r *runner) unpack(pkgs []string, dir string) error {
	debs := filepath.Join(r.cache, "debs")
	if err := os.MkdirAll(debs, 0o755); err != nil {
		return err
	}
	log.Printf("apt-get download %s", strings.Join(pkgs, " "))
	if _, err := r.apt(debs, "apt-get", append([]string{"download"}, pkgs...)...); err != nil {
		return err
	}
	tmp := dir + ".partial"
	os.RemoveAll(tmp)
	if err := os.MkdirAll(filepath.Dir(tmp), 0o755); err != nil {
		return err
	}
	for _, pkg := range pkgs {
		name, arch, _ := strings.Cut(pkg, ":")
		arch, _, _ = strings.Cut(arch, "/")
		deb, _ := filepath.Glob(filepath.Join(debs, name+"_*_"+arch+".deb"))
		if len(deb) == 0 {
			deb, _ = filepath.Glob(filepath.Join(debs, name+"_*_all.deb")) // of every architecture
		}
		if len(deb) == 0 {
			os.RemoveAll(tmp)
			return fmt.Errorf("apt-get download %s left no package", pkg)
		}
		if out, err := exec.Command("dpkg-deb", "-x", deb[len(deb)-1], tmp).CombinedOutput(); err != nil {
			os.RemoveAll(tmp)
			return fmt.Errorf("dpkg-deb -x: %v\n%s", err, out)
		}
		os.Remove(deb[len(deb)-1]) // what is unpacked is kept; the package is not needed again
	}
	return os.Rename(tmp, dir)
}

// initramfs writes the guest's initramfs to path: the init and its
// configuration, the test binaries, the util-linux programs and their
// libraries, and the kernel modules the tests need.
func (r *runner) initramfs(path string, kern *kernel, tmp string) error {
	files := map[string]string{ // in the guest: on the host
		"/init": r.init, "/loopctl.test": r.test, "/losetup.test": r.losetup,
		"/boot/config-" + kern.release: kern.config,
	}
	root, err := r.toolRoot()
	if err != nil {
		return fmt.Errorf("the programs for %s: %w", r.machine.debian, err)
	}
	if err := addLocale(files, root); err != nil {
		return err
	}
	for _, p := range programs {
		bin, err := findProgram(root, p)
		if err != nil {
			return err
		}
		files["/bin/"+p] = bin
		if p == "losetup" {
			files["/usr/sbin/losetup"] = bin // where examples/losetup's tests look for it
		}
		libs, err := sharedLibraries(root, bin)
		if err != nil {
			return err
		}
		maps.Copy(files, libs)
	}
	want := append([]string{"loop", "crc32c_generic", "ext4"}, r.modules...) // ext4: for the tests' mounts too
	if tmp == "ext4" {
		// The disk: on PCI (x86, ARM's virt, pseries) or on s390x's
		// channel subsystem.
		want = append(want, "virtio_pci", "virtio_ccw", "virtio_blk")
	}
	mods, err := moduleOrder(kern.modules, want)
	if err != nil {
		return err
	}
	var modPaths []string
	decompressed := filepath.Join(r.work, "modules-"+kern.release)
	for _, m := range mods {
		host, err := plainModule(m, decompressed)
		if err != nil {
			return err
		}
		guest := "/modules/" + filepath.Base(host)
		files[guest] = host
		modPaths = append(modPaths, guest)
	}
	env := []string{"PATH=/bin:/usr/bin:/sbin:/usr/sbin", "HOME=/tmp", "TMPDIR=/tmp",
		"LOOPCTL_REQUIRE_INTEGRATION=1", "LOOPCTL_IN_VM=1"}
	if r.facts != nil {
		env = append(env, "LOOPCTL_FACTS=1") // TestKernelFacts may ask what breaks the machine
	}
	cfg, err := json.Marshal(map[string]any{
		"Modules": modPaths,
		"Tmp":     tmp,
		"Tests": [][]string{
			append([]string{"/loopctl.test"}, r.testArgs...),
			append([]string{"/losetup.test"}, r.testArgs...),
		},
		"Env": env,
	})
	if err != nil {
		return err
	}
	return writeCPIO(path, files, map[string][]byte{"/vmrun.json": cfg})
}

// localeDir is the C.UTF-8 locale's data, which util-linux's losetup needs
// to print in that locale as it does here.
const localeDir = "/usr/lib/locale/C.utf8"

// addLocale adds the C.UTF-8 locale's files under root, if it has them:
// its own for each architecture, since the files are in the machine's byte
// order.
func addLocale(files map[string]string, root string) error {
	err := filepath.WalkDir(filepath.Join(root, localeDir), func(path string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			files[filepath.Join("/", strings.TrimPrefix(path, root))] = path
		}
		return err
	})
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	return err
}

// moduleOrder returns the files of the named modules of the kernel whose
// modules are in dir, with what each depends on before it. A module the
// kernel has built in, or does not have, is left out: a kernel missing a
// module the tests need fails them with a clear error.
func moduleOrder(dir string, names []string) ([]string, error) {
	index := map[string]string{} // module name: file
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		base := d.Name()
		for _, ext := range []string{".ko", ".ko.xz", ".ko.zst"} {
			if name, ok := strings.CutSuffix(base, ext); ok {
				index[strings.ReplaceAll(name, "-", "_")] = p
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	var order []string
	seen := map[string]bool{}
	var visit func(name string) error
	visit = func(name string) error {
		name = strings.ReplaceAll(name, "-", "_")
		if seen[name] {
			return nil
		}
		seen[name] = true
		file, ok := index[name]
		if !ok {
			return nil // built in, or absent
		}
		deps, err := moduleDepends(file)
		if err != nil {
			return err
		}
		for _, d := range deps {
			if err := visit(d); err != nil {
				return err
			}
		}
		order = append(order, file)
		return nil
	}
	for _, n := range names {
		if err := visit(n); err != nil {
			return nil, err
		}
	}
	return order, nil
}

// moduleDepends reads the depends= entry of a module's .modinfo section.
func moduleDepends(file string) ([]string, error) {
	data, err := moduleBytes(file)
	if err != nil {
		return nil, err
	}
	f, err := elf.NewFile(bytes.NewReader(data))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, nil
	}
	info, err := sec.Data()
	if err != nil {
		return nil, err
	}
	for _, kv := range bytes.Split(info, []byte{0}) {
		if v, ok := bytes.CutPrefix(kv, []byte("depends=")); ok && len(v) > 0 {
			return strings.Split(string(v), ","), nil
		}
	}
	return nil, nil
}

// moduleBytes returns a module's ELF image, decompressed.
func moduleBytes(file string) ([]byte, error) {
	switch {
	case strings.HasSuffix(file, ".xz"):
		return exec.Command("xz", "-dc", file).Output()
	case strings.HasSuffix(file, ".zst"):
		return exec.Command("zstd", "-dcq", file).Output()
	}
	return os.ReadFile(file)
}

// plainModule returns the path of an uncompressed copy of the module file,
// made in dir if need be: finit_module takes compressed modules only on
// kernels built to.
func plainModule(file, dir string) (string, error) {
	if strings.HasSuffix(file, ".ko") {
		return file, nil
	}
	data, err := moduleBytes(file)
	if err != nil {
		return "", fmt.Errorf("decompress %s: %w", file, err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	name := filepath.Base(file)
	name = name[:strings.Index(name, ".ko")+3]
	out := filepath.Join(dir, name)
	return out, os.WriteFile(out, data, 0o644)
}

// writeCPIO writes a gzipped newc archive: files (guest path: host path)
// and data (guest path: contents), with the directories they need.
func writeCPIO(path string, files map[string]string, data map[string][]byte) error {
	out, err := os.Create(path)
	if err != nil {
		return err
	}
	defer out.Close()
	gz := gzip.NewWriter(out)
	w := &cpioWriter{w: gz, dirs: map[string]bool{"/": true}}
	for _, guest := range slices.Sorted(maps.Keys(files)) {
		b, err := os.ReadFile(files[guest])
		if err != nil {
			return err
		}
		fi, err := os.Stat(files[guest])
		if err != nil {
			return err
		}
		w.file(guest, uint32(fi.Mode().Perm()), b)
	}
	for _, guest := range slices.Sorted(maps.Keys(data)) {
		w.file(guest, 0o644, data[guest])
	}
	w.entry("TRAILER!!!", 0, nil)
	if w.err != nil {
		return w.err
	}
	if err := gz.Close(); err != nil {
		return err
	}
	return out.Close()
}

// A cpioWriter writes the "newc" format the kernel unpacks an initramfs
// from.
type cpioWriter struct {
	w    io.Writer
	ino  int
	dirs map[string]bool
	err  error
}

func (c *cpioWriter) file(path string, perm uint32, b []byte) {
	c.dir(filepath.Dir(path))
	c.entry(strings.TrimPrefix(path, "/"), 0o100000|perm, b)
}

func (c *cpioWriter) dir(path string) {
	if c.dirs[path] {
		return
	}
	c.dir(filepath.Dir(path))
	c.dirs[path] = true
	c.entry(strings.TrimPrefix(path, "/"), 0o040755, nil)
}

func (c *cpioWriter) entry(name string, mode uint32, b []byte) {
	if c.err != nil {
		return
	}
	c.ino++
	hdr := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		c.ino, mode, 0, 0, 1, 0, len(b), 0, 0, 0, 0, len(name)+1, 0)
	c.write([]byte(hdr + name + "\x00"))
	c.pad(len(hdr) + len(name) + 1)
	c.write(b)
	c.pad(len(b))
}

func (c *cpioWriter) write(b []byte) {
	if c.err == nil {
		_, c.err = c.w.Write(b)
	}
}

func (c *cpioWriter) pad(n int) {
	if r := n % 4; r != 0 {
		c.write(make([]byte, 4-r))
	}
}

// mkfs makes a 2 GiB ext4 file system in the file at path, with the
// defaults of Debian's mke2fs.
func mkfs(path string) error {
	os.Remove(path)
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		return err
	}
	if err := os.Truncate(path, 2<<30); err != nil {
		return err
	}
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", path).CombinedOutput(); err != nil {
		return fmt.Errorf("mkfs.ext4: %v\n%s", err, out)
	}
	return nil
}

// boot runs the qemu program with args, copies the guest's console to
// standard output, handing each line from the init on to onLine, and
// returns the exit status the guest's init reports.
func boot(qemu string, args []string, timeout time.Duration, onLine func(string)) (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, qemu, args...)
	cmd.Stdin = nil
	out, err := cmd.StdoutPipe()
	if err != nil {
		return 0, err
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return 0, err
	}
	code := -1
	var early []string // the firmware's and kernel's lines before the init
	inited := false
	sc := bufio.NewScanner(out)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := strings.TrimRight(sc.Text(), "\r")
		if i := strings.Index(line, "vmrun-guest: "); i >= 0 && !inited {
			inited, line = true, line[i:] // after the firmware's escape sequences
		}
		if !inited {
			early = append(early, line)
			continue
		}
		fmt.Println(line)
		onLine(line)
		if s, ok := strings.CutPrefix(line, "vmrun: exit "); ok {
			code, _ = strconv.Atoi(s)
		}
	}
	werr := cmd.Wait()
	if !inited {
		fmt.Println(strings.Join(early, "\n"))
	}
	switch {
	case ctx.Err() != nil:
		return 0, fmt.Errorf("the machine ran longer than %v", timeout)
	case !inited:
		return 0, fmt.Errorf("%w (qemu: %v)", errNoInit, werr)
	case code < 0:
		return 0, fmt.Errorf("the guest ended without reporting the tests' status (qemu: %v)", werr)
	case werr != nil:
		return 0, fmt.Errorf("qemu: %w", werr)
	}
	return code, nil
}
