//go:build linux

package main

import (
	"debug/elf"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// TestKernelCandidates picks the newest kernel of each machine's flavour
// from names as apt-cache search prints them: the unsigned package where
// Debian signs the flavour, never Linux 7's metapackage, and Linux 7's
// three packages; the next older kernel after it.
func TestKernelCandidates(t *testing.T) {
	for _, tt := range []struct {
		k, flavour string
		names      []string // all of them of other kernels or flavours but the matching ones
		want       []string // the newest
		next       string   // the next older kernel's package
	}{
		{"6.12", "amd64", []string{
			"linux-image-6.12.41+deb13-amd64-unsigned", "linux-image-6.12.118+deb13-amd64-unsigned",
			"linux-image-6.12.118+deb13-amd64", "linux-image-6.12.118+deb13-cloud-amd64-unsigned",
			"linux-image-6.1.0-57-amd64-unsigned",
		}, []string{"linux-image-6.12.118+deb13-amd64-unsigned"}, "linux-image-6.12.41+deb13-amd64-unsigned"},
		{"5.10", "amd64", []string{"linux-image-5.10.0-9-amd64-unsigned", "linux-image-5.10.0-46-amd64-unsigned",
			"linux-image-5.10.0-30-amd64-unsigned"}, []string{"linux-image-5.10.0-46-amd64-unsigned"}, "linux-image-5.10.0-30-amd64-unsigned"},
		{newest, "amd64", []string{
			"linux-binary-unsigned-7.3.4+deb13-amd64", "linux-image-7.3.4+deb13-amd64",
			"linux-binary-unsigned-7.2.12+deb13-amd64", "linux-binary-unsigned-7.10.1+deb13-amd64",
			"linux-image-6.12.118+deb13-amd64-unsigned",
		}, []string{"linux-binary-unsigned-7.10.1+deb13-amd64", "linux-modules-7.10.1+deb13-amd64", "linux-base-7.10.1+deb13-amd64"},
			"linux-binary-unsigned-7.3.4+deb13-amd64"},
		{newest, "arm64", []string{"linux-binary-7.3.4+deb13-arm64", "linux-binary-unsigned-7.3.4+deb13-arm64",
			"linux-image-7.3.4+deb13-arm64", "linux-binary-unsigned-7.3.4+deb13-arm64-16k", "linux-image-6.12.118+deb13-arm64-unsigned"},
			[]string{"linux-binary-unsigned-7.3.4+deb13-arm64", "linux-modules-7.3.4+deb13-arm64", "linux-base-7.3.4+deb13-arm64"},
			"linux-image-6.12.118+deb13-arm64-unsigned"},
		{"6.12", "arm64", []string{"linux-image-6.12.118+deb13-arm64", "linux-image-6.12.118+deb13-arm64-unsigned",
			"linux-image-6.12.118+deb13-arm64-16k-unsigned", "linux-image-6.12.118+deb13-rt-arm64-unsigned", "linux-image-6.12.107+deb13-arm64"},
			[]string{"linux-image-6.12.118+deb13-arm64-unsigned"}, "linux-image-6.12.107+deb13-arm64"},
		{"6.12", "armmp", []string{"linux-image-6.12.115+deb13-armmp", "linux-image-6.12.115+deb13.1-armmp",
			"linux-image-6.12.118+deb13-armmp-lpae", "linux-image-6.12.116+deb13-armmp"},
			[]string{"linux-image-6.12.116+deb13-armmp"}, "linux-image-6.12.115+deb13.1-armmp"},
		{newest, "s390x", []string{"linux-image-7.3.4+deb13-s390x", "linux-binary-7.3.4+deb13-s390x",
			"linux-image-6.12.118+deb13-s390x", "linux-image-7.2.12+deb13-s390x", "linux-binary-7.2.12+deb13-s390x"},
			[]string{"linux-binary-7.3.4+deb13-s390x", "linux-modules-7.3.4+deb13-s390x", "linux-base-7.3.4+deb13-s390x"},
			"linux-binary-7.2.12+deb13-s390x"},
	} {
		re := regexp.MustCompile(kernelPattern(tt.k, tt.flavour))
		var match []string
		for _, n := range tt.names {
			if re.MatchString(n) {
				match = append(match, n)
			}
		}
		got := kernelCandidates(match)
		if len(got) < 2 || !slices.Equal(got[0], tt.want) || got[1][0] != tt.next {
			t.Errorf("Linux %s, %s, of %q (matching %q): %q; want %q, then %s", tt.k, tt.flavour, tt.names, match, got, tt.want, tt.next)
		}
	}
}

// TestSharedLibraries finds what this machine's losetup loads, as ldd
// does, and in a tree of another root, follows an absolute link there,
// not on this machine.
func TestSharedLibraries(t *testing.T) {
	bin, err := findProgram("/", "losetup")
	if err != nil {
		t.Skip(err)
	}
	libs, err := sharedLibraries("/", bin)
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("ldd", bin).Output()
	if err != nil {
		t.Skip("ldd:", err)
	}
	var want []string // the libraries' names as ldd prints them
	for _, f := range strings.Fields(string(out)) {
		if strings.HasPrefix(f, "/") {
			want = append(want, filepath.Base(f))
		}
	}
	var got []string
	for guest, host := range libs {
		got = append(got, filepath.Base(guest))
		f, err := elf.Open(host)
		if err != nil {
			t.Fatalf("%s (%s): %v", guest, host, err)
		}
		f.Close()
	}
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) || len(got) < 2 {
		t.Errorf("%s loads %q, ldd says %q", bin, got, want)
	}

	root := t.TempDir()
	for _, d := range []string{"lib/x-linux-gnu", "usr/lib"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(root, "lib/x-linux-gnu/libc.so.6"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/lib/x-linux-gnu/libc.so.6", filepath.Join(root, "usr/lib/libc.so.6")); err != nil {
		t.Fatal(err)
	}
	if got, err := inRoot(root, "/usr/lib/libc.so.6"); err != nil || got != filepath.Join(root, "lib/x-linux-gnu/libc.so.6") {
		t.Errorf("inRoot through an absolute link = %q, %v", got, err)
	}
}

// TestMachines checks that every machine's init can be built: its kernel's
// architecture is itself a machine, whose GOARCH the init takes.
func TestMachines(t *testing.T) {
	for name, m := range machines {
		if m.initArch() == "" {
			t.Errorf("-arch %s: no machine is of Debian's %s, the GOARCH of its init", name, m.debian)
		}
	}
	if got := machines["386"].initArch(); got != "amd64" {
		t.Errorf("-arch 386: init of GOARCH %s, want amd64", got)
	}
}
