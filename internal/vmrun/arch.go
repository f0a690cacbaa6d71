//go:build linux

package main

import (
	"debug/elf"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
)

// A machine is what vmrun boots for one -arch: the test binaries' GOARCH,
// Debian's architecture and kernel flavour, and how qemu runs it.
type machine struct {
	goarch, goarm string // the test binaries'
	// debian is Debian's name of the kernel's architecture, which the
	// init and the programs the tests run are built for.
	debian   string
	flavour  string   // the kernel packages' flavour: linux-image-VERSION-FLAVOUR
	qemu     string   // the qemu program
	qemuArgs []string // its machine and processor
	console  string   // the console that machine has, for console=
}

// machines are the -arch values. 386 runs the tests as 32-bit programs on
// amd64's kernel (the compat ioctl path); armhf runs them as GOARM=7
// programs, as Raspberry Pi image builders do.
var machines = map[string]machine{
	"amd64": {goarch: "amd64", debian: "amd64", flavour: "amd64",
		qemu: "qemu-system-x86_64", qemuArgs: []string{"-cpu", "max"}, console: "ttyS0"},
	"386": {goarch: "386", debian: "amd64", flavour: "amd64",
		qemu: "qemu-system-x86_64", qemuArgs: []string{"-cpu", "max"}, console: "ttyS0"},
	"arm64": {goarch: "arm64", debian: "arm64", flavour: "arm64",
		qemu: "qemu-system-aarch64", qemuArgs: []string{"-M", "virt", "-cpu", "max"}, console: "ttyAMA0"},
	"armhf": {goarch: "arm", goarm: "7", debian: "armhf", flavour: "armmp",
		qemu: "qemu-system-arm", qemuArgs: []string{"-M", "virt", "-cpu", "cortex-a15"}, console: "ttyAMA0"},
	"s390x": {goarch: "s390x", debian: "s390x", flavour: "s390x",
		qemu: "qemu-system-s390x", qemuArgs: []string{"-M", "s390-ccw-virtio", "-cpu", "max"}, console: "ttysclp0"},
	"ppc64el": {goarch: "ppc64le", debian: "ppc64el", flavour: "powerpc64le",
		qemu: "qemu-system-ppc64", qemuArgs: []string{"-M", "pseries", "-cpu", "power9"}, console: "hvc0"},
}

// foreign tells whether the machine's programs are of another architecture
// than this machine's (hostArch): they come from Debian's packages.
func (m machine) foreign() bool { return m.debian != hostArch }

// hostArch is Debian's name of this machine's architecture.
const hostArch = "amd64"

// initArch is the GOARCH of the guest's init: that of the machine whose
// tests are of the kernel's own architecture (amd64's for 386).
func (m machine) initArch() string { return machines[m.debian].goarch }

// toolsRelease is the Debian release whose packages give a foreign
// machine its programs: this machine's, so that every guest compares the
// library with the util-linux the host's tests compare it with.
const toolsRelease = "bookworm"

// toolPackages are the packages of the programs: losetup is in mount,
// addpart, delpart and flock in util-linux, mkfs.ext4 in e2fsprogs; the C
// locale, which losetup prints in, is in libc-bin.
var toolPackages = []string{"mount", "util-linux", "e2fsprogs", "libc-bin"}

// kernelPattern matches the names of the packages that hold kernel version
// k (any version for "newest") of flavour: linux-image-5.10.0-46-FLAVOUR
// and linux-image-6.12.118+deb13-FLAVOUR, each also -unsigned where Debian
// signs that flavour; from Linux 7 linux-binary-7.3.4+deb13-FLAVOUR, or
// linux-binary-unsigned-..., with the modules and config in packages
// beside it.
func kernelPattern(k, flavour string) string {
	version := regexp.QuoteMeta(k) + `\.[0-9.]+`
	if k == newest {
		version = `[0-9]+\.[0-9.]+`
	}
	f := regexp.QuoteMeta(flavour)
	return "^(linux-image-" + version + `(-[0-9]+|\+deb[0-9.]+)-` + f + `(-unsigned)?|linux-binary(-unsigned)?-` + version + `\+deb[0-9.]+-` + f + ")$"
}

// kernelCandidates returns the packages of each kernel among names, which
// kernelPattern matched, newest first, the kernel's own package first. Of
// one version it takes the unsigned kernel where there is one, and never
// the metapackage that Linux 7's linux-image-VERSION-FLAVOUR is.
func kernelCandidates(names []string) [][]string {
	version := func(name string) string {
		for _, p := range []string{"linux-image-", "linux-binary-unsigned-", "linux-binary-"} {
			if v, ok := strings.CutPrefix(name, p); ok {
				return strings.TrimSuffix(v, "-unsigned")
			}
		}
		return name
	}
	rank := func(name string) int {
		switch {
		case strings.HasPrefix(name, "linux-binary-unsigned-"):
			return 4
		case strings.HasPrefix(name, "linux-binary-"):
			return 3
		case strings.HasSuffix(name, "-unsigned"):
			return 2
		}
		return 1
	}
	best := map[string]string{} // version: its package of the highest rank
	for _, n := range names {
		if b, ok := best[version(n)]; !ok || rank(n) > rank(b) {
			best[version(n)] = n
		}
	}
	var out [][]string
	for _, v := range slices.SortedFunc(maps.Keys(best), func(a, b string) int { return compareVersions(b, a) }) {
		if n := best[v]; strings.HasPrefix(n, "linux-binary-") {
			out = append(out, []string{n, "linux-modules-" + v, "linux-base-" + v})
		} else {
			out = append(out, []string{n})
		}
	}
	return out
}

// toolRoot returns the directory the machine's programs and their
// libraries are found under: this machine's root, or for a foreign
// machine Debian's packages of them for its architecture, with the
// libraries they need, fetched and unpacked into the cache once.
func (r *runner) toolRoot() (string, error) {
	if !r.machine.foreign() {
		return "/", nil
	}
	dir := filepath.Join(r.cache, "tools", toolsRelease+"-"+r.machine.debian)
	if isDir(dir) {
		return dir, nil
	}
	pkgs, err := r.libraryClosure(toolPackages)
	if err != nil {
		return "", err
	}
	for i, p := range pkgs {
		pkgs[i] = r.qualified(p)
	}
	return dir, r.unpack(pkgs, dir)
}

// libraryClosure returns pkgs, of the machine's architecture in
// toolsRelease, and the libraries they depend on, and theirs in turn:
// every package a dependency names that is a library (lib*, zlib1g).
// Of alternatives it takes the first, as apt does.
func (r *runner) libraryClosure(pkgs []string) ([]string, error) {
	seen := map[string]bool{}
	next := slices.Clone(pkgs)
	for len(next) > 0 {
		var ask []string
		for _, p := range next {
			if !seen[p] {
				seen[p] = true
				ask = append(ask, r.qualified(p))
			}
		}
		next = nil
		if len(ask) == 0 {
			break
		}
		out, err := r.apt("", "apt-cache", append([]string{"depends", "--no-recommends", "--no-suggests", "--no-conflicts",
			"--no-breaks", "--no-replaces", "--no-enhances"}, ask...)...)
		if err != nil {
			return nil, err
		}
		alternative := false
		for _, line := range strings.Split(string(out), "\n") {
			field := strings.Fields(line)
			if len(field) != 2 || !strings.HasPrefix(line, " ") {
				alternative = false
				continue
			}
			kind, name := field[0], field[1]
			first := !alternative
			alternative = strings.HasPrefix(kind, "|") // the next line is another choice
			kind = strings.TrimPrefix(kind, "|")
			if (kind != "Depends:" && kind != "PreDepends:") || !first || strings.HasPrefix(name, "<") {
				continue
			}
			name, _, _ = strings.Cut(name, ":")
			if strings.HasPrefix(name, "lib") || name == "zlib1g" {
				next = append(next, name)
			}
		}
	}
	return slices.Sorted(maps.Keys(seen)), nil
}

// qualified names package p of the machine's architecture in toolsRelease
// for apt.
func (r *runner) qualified(p string) string {
	return p + ":" + r.machine.debian + "/" + toolsRelease
}

// findProgram returns the path under root of program p, looked for where
// Debian installs programs.
func findProgram(root, p string) (string, error) {
	for _, dir := range []string{"/usr/sbin", "/usr/bin", "/sbin", "/bin"} {
		path := filepath.Join(root, dir, p)
		if fi, err := os.Stat(path); err == nil && fi.Mode().IsRegular() {
			return path, nil
		}
	}
	return "", fmt.Errorf("no program %s under %s", p, root)
}

// libraryDirs are where the dynamic loader looks for a library when
// nothing tells it otherwise (no /etc/ld.so.cache in the guest): Debian's
// multiarch directories first.
var libraryDirs = []string{"/lib/*-linux-gnu*", "/usr/lib/*-linux-gnu*", "/lib64", "/usr/lib64", "/lib", "/usr/lib"}

// sharedLibraries returns the files under root that the dynamic program
// bin loads, each as the guest path it must have and the host file that
// holds it: its loader, the libraries it names (DT_NEEDED), and theirs in
// turn. A library is one of bin's class and machine, as the loader
// requires, so that a multiarch root's other architectures are passed
// over. A static program needs none.
func sharedLibraries(root, bin string) (map[string]string, error) {
	f, err := elf.Open(bin)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	files := map[string]string{}
	var interp string
	for _, p := range f.Progs {
		if p.Type != elf.PT_INTERP {
			continue
		}
		b := make([]byte, p.Filesz)
		if _, err := p.ReadAt(b, 0); err != nil {
			return nil, fmt.Errorf("%s: its loader: %w", bin, err)
		}
		interp = strings.TrimRight(string(b), "\x00")
		host, err := inRoot(root, interp)
		if err != nil {
			return nil, fmt.Errorf("%s: its loader: %w", bin, err)
		}
		files[interp] = host
	}
	found := map[string]bool{} // the libraries found, by name
	if interp != "" {
		found[filepath.Base(interp)] = true // which libc names too
	}
	var visit func(f *elf.File, name string) error
	visit = func(f *elf.File, name string) error {
		needed, err := f.ImportedLibraries()
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		for _, lib := range needed {
			if found[lib] {
				continue
			}
			found[lib] = true
			guest, host, lf, err := findLibrary(root, lib, f.Class, f.Machine)
			if err != nil {
				return fmt.Errorf("%s needs %s: %w", name, lib, err)
			}
			files[guest] = host
			err = visit(lf, lib)
			lf.Close()
			if err != nil {
				return err
			}
		}
		return nil
	}
	if err := visit(f, bin); err != nil {
		return nil, err
	}
	return files, nil
}

// findLibrary finds the library named lib of class and machine under
// root, and returns its guest path, its host file and the ELF file, open.
func findLibrary(root, lib string, class elf.Class, m elf.Machine) (string, string, *elf.File, error) {
	for _, pattern := range libraryDirs {
		dirs, _ := filepath.Glob(filepath.Join(root, pattern))
		for _, dir := range dirs {
			guest := filepath.Join("/", strings.TrimPrefix(dir, root), lib)
			host, err := inRoot(root, guest)
			if err != nil {
				continue
			}
			f, err := elf.Open(host)
			if err != nil {
				continue
			}
			if f.Class == class && f.Machine == m {
				return guest, host, f, nil
			}
			f.Close()
		}
	}
	return "", "", nil, fmt.Errorf("no %s %s library in %s", class, m, root)
}

// inRoot returns the host path of guest path p in the tree at root,
// following symbolic links as the guest would: an absolute target is
// taken under root, not on this machine.
func inRoot(root, p string) (string, error) {
	for range 40 {
		host := filepath.Join(root, p)
		fi, err := os.Lstat(host)
		if err != nil {
			return "", err
		}
		if fi.Mode()&fs.ModeSymlink == 0 {
			return host, nil
		}
		target, err := os.Readlink(host)
		if err != nil {
			return "", err
		}
		if !filepath.IsAbs(target) {
			target = filepath.Join(filepath.Dir(p), target)
		}
		p = target
	}
	return "", errors.New(p + ": too many levels of symbolic links")
}
