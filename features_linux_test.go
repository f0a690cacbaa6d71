package loopctl

import (
	"os"
	"slices"
	"strings"
	"testing"
)

func TestParseRelease(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		release string
		want    kernelVersion
		ok      bool
	}{
		{"6.12.118+deb13-amd64", kernelVersion{6, 12, 118}, true},
		{"6.1.0-57-amd64", kernelVersion{6, 1, 0}, true},
		{"6.18.44-fc-v1300", kernelVersion{6, 18, 44}, true},
		{"7.3.4+deb13-arm64", kernelVersion{7, 3, 4}, true},
		{"5.15.0-1070-azure", kernelVersion{5, 15, 0}, true},
		{"6.8", kernelVersion{6, 8, 0}, true},
		{"6.9-rc1", kernelVersion{6, 9, 0}, true},
		{"4.19.0.1", kernelVersion{4, 19, 0}, true},
		{"6", kernelVersion{}, false},
		{"6.", kernelVersion{}, false},
		{"6.01.2", kernelVersion{}, false},
		{"linux-6.1", kernelVersion{}, false},
		{"", kernelVersion{}, false},
	} {
		got, ok := parseRelease(tt.release)
		if got != tt.want || ok != tt.ok {
			t.Errorf("parseRelease(%q) = %v, %t; want %v, %t", tt.release, got, ok, tt.want, tt.ok)
		}
	}
}

// TestKernelVersionFacts: what the package does on each kernel of the
// test matrix, and on those between, as KERNELS.md measures it.
func TestKernelVersionFacts(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		v                kernelVersion
		stale, scanTwice bool
	}{
		{kernelVersion{5, 10, 0}, true, false},
		{kernelVersion{5, 15, 0}, true, true},
		{kernelVersion{6, 1, 0}, true, true},
		{kernelVersion{6, 6, 140}, true, true},
		{kernelVersion{6, 12, 117}, true, true},
		{kernelVersion{6, 12, 118}, true, false},
		{kernelVersion{6, 18, 44}, true, false},
		{kernelVersion{7, 0, 0}, true, true},
		{kernelVersion{7, 1, 0}, true, false},
		{kernelVersion{7, 2, 0}, false, false},
		{newestKernel, false, false},
	} {
		if stale, twice := !tt.v.has(featDropsHandPartitions), !tt.v.has(featScanOnce); stale != tt.stale || twice != tt.scanTwice {
			t.Errorf("%v: keeps stale partitions %t, scans twice %t; want %t, %t", tt.v, stale, twice, tt.stale, tt.scanTwice)
		}
	}
}

// TestFeaturesMatchKernelsMD holds the table of features to KERNELS.md,
// which measures what each kernel of the test matrix answers: a feature
// learnt by version must be had by exactly the kernels whose answer says
// so.
func TestFeaturesMatchKernelsMD(t *testing.T) {
	t.Parallel()
	// The answers of the KERNELS.md rows that are features, for a kernel
	// with the feature and for one without.
	answers := map[feature]struct{ has, lacks []string }{
		featAddAny:              {[]string{"new"}, []string{"EEXIST"}},
		featScanOnce:            {[]string{"no"}, []string{"yes"}},
		featDropsHandPartitions: {[]string{"detach"}, []string{"kept", "at open"}},
	}
	if _, err := os.Stat("go.mod"); err != nil {
		t.Skip("run outside the source tree, which holds KERNELS.md")
	}
	b, err := os.ReadFile("KERNELS.md")
	if err != nil {
		t.Fatal(err)
	}
	var kernels []kernelVersion
	rows := map[string][]string{}
	for _, line := range strings.Split(string(b), "\n") {
		if !strings.HasPrefix(line, "| ") {
			continue
		}
		cells := strings.Split(strings.Trim(line, "| "), " | ")
		if kernels == nil {
			for _, rel := range cells {
				v, ok := parseRelease(rel)
				if !ok {
					t.Fatalf("KERNELS.md column %q: not a kernel release", rel)
				}
				kernels = append(kernels, v)
			}
			continue
		}
		rows[cells[0]] = cells[1:]
	}
	for f, want := range answers {
		name := features[f].name
		got, ok := rows[name]
		if !ok || len(got) != len(kernels) {
			t.Errorf("KERNELS.md has no row %q for each kernel", name)
			continue
		}
		for i, v := range kernels {
			ok := slices.Contains(want.lacks, got[i])
			if v.has(f) {
				ok = slices.Contains(want.has, got[i])
			}
			if !ok {
				t.Errorf("%q on %v: KERNELS.md says %q, but the table says the kernel has it: %t", name, v, got[i], v.has(f))
			}
		}
	}
}

// TestFeatureAnswers: a feature learnt by the kernel's answer is taken to
// be there until the kernel answers otherwise, and kept then; one learnt
// by version follows the version.
func TestFeatureAnswers(t *testing.T) {
	t.Parallel()
	s := newSystem(nil, "/nonexistent")
	s.version = kernelVersion{6, 1, 0}
	if !s.has(featConfigure) || !s.has(featDiskSeq) {
		t.Fatal("a feature learnt by answer is taken to be there before any answer")
	}
	s.lacks(featDiskSeq)
	if s.has(featDiskSeq) || !s.has(featConfigure) {
		t.Fatal("the answer was not kept, or kept for another feature")
	}
	if s.has(featScanOnce) || s.has(featDropsHandPartitions) {
		t.Fatal("6.1 has neither the fix of the scan mark nor the drop of hand-made partitions")
	}
	for f, e := range features {
		if e.name == "" || e.without == "" || e.since == (kernelVersion{}) {
			t.Errorf("feature %d: name, first kernel and what the package does without it must be given", f)
		}
	}
}
