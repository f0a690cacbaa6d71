//go:build !loopctl_stub

package loopctl

import "testing"

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
		if stale, twice := tt.v.keepsStalePartitions(), tt.v.scansTwice(); stale != tt.stale || twice != tt.scanTwice {
			t.Errorf("%v: keeps stale partitions %t, scans twice %t; want %t, %t", tt.v, stale, twice, tt.stale, tt.scanTwice)
		}
	}
}
