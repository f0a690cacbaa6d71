//go:build linux

package main

import (
	"math"
	"math/bits"
	"strings"
	"syscall"
)

// parseSize reads a size as util-linux does (its strtosize): a number in
// C's notation (decimal, 0x hexadecimal, 0 octal), optionally a decimal
// fraction, and optionally a unit, K M G T P E Z Y (or lowercase) alone or
// followed by iB (both powers of 1024) or B (powers of 1000): 1.5MiB,
// 0x1000, 4KB. Leading white space and a plus sign are allowed, a minus
// sign is not. Errors are EINVAL, or ERANGE for a value past 2^64-1.
func parseSize(s string) (uint64, error) {
	if t := strings.TrimLeft(s, cSpace); t == "" || t[0] == '-' {
		return 0, syscall.EINVAL
	}
	x, p, err := parseUint(s)
	if err != nil || p == "" {
		return x, err
	}
	var frac uint64
	zeros := 0
	for {
		base := uint64(1024)
		switch {
		case len(p) == 3 && p[1] == 'i' && (p[2] == 'B' || p[2] == 'b'):
		case len(p) == 2 && (p[1] == 'B' || p[1] == 'b'):
			base = 1000
		case len(p) >= 2:
			// A decimal fraction before the unit: 1.5K. (util-linux
			// takes only one fraction that is not zero.)
			if frac != 0 || p[0] != '.' {
				return 0, syscall.EINVAL
			}
			q := p[1:]
			for q != "" && q[0] == '0' {
				q, zeros = q[1:], zeros+1
			}
			if q != "" && q[0] >= '0' && q[0] <= '9' {
				if frac, q, err = parseUint(q); err != nil {
					return 0, err
				}
			}
			if q == "" {
				// A fraction and no unit. (With a fraction of zeros
				// util-linux reads past the string's end: undefined.)
				return 0, syscall.EINVAL
			}
			p = q
			continue
		}
		power := strings.IndexByte("KMGTPEZY", p[0]) + 1
		if power == 0 {
			power = strings.IndexByte("kmgtpezy", p[0]) + 1
		}
		if power == 0 {
			return 0, syscall.EINVAL
		}
		return scale(x, frac, zeros, base, power)
	}
}

// cSpace is what C's isspace accepts.
const cSpace = " \t\n\v\f\r"

// scale multiplies x by base^power, and adds what the fraction frac, after
// zeros leading zeros, stands for of base^power: computed digit by digit
// from the last, as util-linux does, so that results agree to the byte.
func scale(x, frac uint64, zeros int, base uint64, power int) (uint64, error) {
	unit := uint64(1)
	for range power {
		if x > math.MaxUint64/base {
			return 0, syscall.ERANGE
		}
		x *= base
		if unit <= math.MaxUint64/base { // util-linux stops scaling it there
			unit *= base
		}
	}
	if frac == 0 {
		return x, nil
	}
	div := uint64(10) // what the last digit's place divides the unit by
	for div < frac {
		if div <= math.MaxUint64/10 {
			div *= 10
		} else {
			frac /= 10
		}
	}
	for range zeros {
		if div <= math.MaxUint64/10 {
			div *= 10
		} else {
			frac /= 10
		}
	}
	for place := uint64(1); frac != 0; place *= 10 {
		digit := frac % 10
		frac /= 10
		if segment := div / place; digit != 0 && segment/digit != 0 {
			x += unit / (segment / digit)
		}
	}
	return x, nil
}

// parseUint reads an unsigned number in C's notation from the start of s,
// as strtoumax with base 0: white space, a plus sign, then decimal, 0x
// hexadecimal or 0 octal digits. It returns the number and what follows.
// No digit is EINVAL; a number past 2^64-1, ERANGE.
func parseUint(s string) (uint64, string, error) {
	t := strings.TrimPrefix(strings.TrimLeft(s, cSpace), "+")
	base, digits := uint64(10), t
	switch {
	case len(t) > 2 && (t[:2] == "0x" || t[:2] == "0X") && hexDigit(t[2]) >= 0:
		base, digits = 16, t[2:]
	case t != "" && t[0] == '0':
		base = 8
	}
	var x uint64
	overflow := false
	i := 0
	for ; i < len(digits); i++ {
		d := hexDigit(digits[i])
		if d < 0 || uint64(d) >= base {
			break
		}
		hi, lo := bits.Mul64(x, base)
		sum, carry := bits.Add64(lo, uint64(d), 0)
		overflow = overflow || hi != 0 || carry != 0
		x = sum
	}
	switch {
	case i == 0:
		return 0, s, syscall.EINVAL
	case overflow:
		return 0, "", syscall.ERANGE
	}
	return x, digits[i:], nil
}

func hexDigit(c byte) int {
	switch {
	case c >= '0' && c <= '9':
		return int(c - '0')
	case c >= 'a' && c <= 'f':
		return int(c-'a') + 10
	case c >= 'A' && c <= 'F':
		return int(c-'A') + 10
	}
	return -1
}
