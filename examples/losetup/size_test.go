//go:build linux

package main

import (
	"errors"
	"math"
	"math/big"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// TestParseSize holds util-linux 2.38.1's answers, quirks included (read
// back from bindings it made; TestCompareSizes compares many more).
func TestParseSize(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want uint64
		err  error
	}{
		{"4096", 4096, nil},
		{"0", 0, nil},
		{"4K", 4096, nil},
		{"4k", 4096, nil},
		{"4KiB", 4096, nil},
		{"4kib", 4096, nil},
		{"4KB", 4000, nil},
		{"4Kb", 4000, nil},
		{"0x1000", 4096, nil},
		{"0X1000", 4096, nil},
		{"010000", 4096, nil},
		{" 4096", 4096, nil},
		{"+4096", 4096, nil},
		{"1.5K", 1536, nil},
		{"3.5K", 3584, nil},
		{"2.25K", 2303, nil}, // util-linux's digit-by-digit sum rounds down each digit
		{"4.00K", 4096, nil},
		{"1.08K", 1109, nil},
		{"1.010K", 1126, nil},
		{"0.5Y", 1 << 79 >> 20, nil}, // half of 1024^8 overflows; util-linux scales the unit only while it fits
		{"1M", 1 << 20, nil},
		{"1GiB", 1 << 30, nil},
		{"15E", 15 << 60, nil},
		{"18446744073709551615", math.MaxUint64, nil},
		{"16E", 0, syscall.ERANGE},
		{"18446744073709551616", 0, syscall.ERANGE},
		{"1Z", 0, syscall.ERANGE},
		{"-4096", 0, syscall.EINVAL},
		{" -1", 0, syscall.EINVAL},
		{"", 0, syscall.EINVAL},
		{"K", 0, syscall.EINVAL},
		{"0x", 0, syscall.EINVAL},
		{"09", 0, syscall.EINVAL}, // octal
		{"4.5", 0, syscall.EINVAL},
		{"4 K", 0, syscall.EINVAL},
		{"4KiBB", 0, syscall.EINVAL},
		{"4Ki", 0, syscall.EINVAL},
		{"4i", 0, syscall.EINVAL},
		{"1x", 0, syscall.EINVAL},
	} {
		got, err := parseSize(tt.in)
		if tt.err != nil {
			if !errors.Is(err, tt.err) {
				t.Errorf("parseSize(%q) = %d, %v; want %v", tt.in, got, err, tt.err)
			}
			continue
		}
		if got != tt.want || err != nil {
			t.Errorf("parseSize(%q) = %d, %v; want %d", tt.in, got, err, tt.want)
		}
	}
}

// FuzzParseSize checks parseSize against what must hold of any input: it
// never panics, errs only with EINVAL or ERANGE, reads plain numbers as
// strconv does, and a whole number with a unit is exactly that multiple,
// or ERANGE past 2^64-1.
func FuzzParseSize(f *testing.F) {
	for _, s := range []string{"4096", "4KiB", "1.5M", "0x10", "010", " +7", "-1", "1.08K", "9E", "0.5Y", "18446744073709551616"} {
		f.Add(s)
	}
	units := []struct {
		suffix string
		base   int64
		power  int
	}{{"K", 1024, 1}, {"MiB", 1024, 2}, {"GB", 1000, 3}, {"t", 1024, 4}, {"EiB", 1024, 6}, {"YB", 1000, 8}}
	f.Fuzz(func(t *testing.T, s string) {
		got, err := parseSize(s)
		if err != nil && !errors.Is(err, syscall.EINVAL) && !errors.Is(err, syscall.ERANGE) {
			t.Fatalf("parseSize(%q): %v, want EINVAL or ERANGE", s, err)
		}
		if err == nil && strings.HasPrefix(strings.TrimLeft(s, cSpace), "-") {
			t.Fatalf("parseSize(%q) = %d: a negative size", s, got)
		}
		if s == "" || s[0] < '1' || s[0] > '9' || strings.Trim(s, "0123456789") != "" {
			return // below: decimal numbers, without the leading zero of octal
		}
		n, perr := strconv.ParseUint(s, 10, 64)
		if (perr == nil) != (err == nil) || perr == nil && n != got {
			t.Fatalf("parseSize(%q) = %d, %v; strconv says %d, %v", s, got, err, n, perr)
		}
		if perr != nil {
			return
		}
		for _, u := range units {
			v, err := parseSize(s + u.suffix)
			want := new(big.Int).Mul(new(big.Int).SetUint64(n), new(big.Int).Exp(big.NewInt(u.base), big.NewInt(int64(u.power)), nil))
			if !want.IsUint64() {
				if !errors.Is(err, syscall.ERANGE) {
					t.Fatalf("parseSize(%q) = %d, %v; want ERANGE", s+u.suffix, v, err)
				}
				continue
			}
			if err != nil || v != want.Uint64() {
				t.Fatalf("parseSize(%q) = %d, %v; want %d", s+u.suffix, v, err, want.Uint64())
			}
		}
	})
}
