//go:build linux

package main

import (
	"fmt"
	"io"
	"strings"
	"unicode"
	"unicode/utf8"
)

// out is where the program writes, and how.
type out struct {
	w, errw io.Writer
	prog    string
	utf8    bool // the locale is UTF-8: printable characters stay as they are
}

// warnx prints a message as util-linux's warnx: "losetup: ...".
func (o *out) warnx(format string, args ...any) {
	fmt.Fprintf(o.errw, "%s: %s\n", o.prog, fmt.Sprintf(format, args...))
}

// warn prints a message and the errno in err, as util-linux's warn.
func (o *out) warn(err error, format string, args ...any) {
	fmt.Fprintf(o.errw, "%s: %s: %s\n", o.prog, fmt.Sprintf(format, args...), errnoText(err))
}

// oneLine prints a bound device in losetup's classic format:
// "/dev/loop0: [65024]:12 (/file), offset 512, sizelimit 4096".
func (o *out) oneLine(r row) {
	s := r.s
	var b strings.Builder
	if s.BackingDevice == 0 && s.BackingInode == 0 {
		fmt.Fprintf(&b, "%s: []: (%s)", r.path, s.BackingFile) // not root
	} else {
		fmt.Fprintf(&b, "%s: [%04d]:%d (%s)", r.path, s.BackingDevice, s.BackingInode, s.BackingFile)
	}
	if s.Offset != 0 {
		fmt.Fprintf(&b, ", offset %d", s.Offset)
	}
	if s.SizeLimit != 0 {
		fmt.Fprintf(&b, ", sizelimit %d", s.SizeLimit)
	}
	fmt.Fprintln(o.w, b.String())
}

// table prints rows as util-linux's libsmartcols does for losetup: aligned
// columns, raw (space separated, escaped) or JSON.
// An empty table prints nothing, not even its headings, except in JSON.
func (o *out) table(c *config, rows []row) {
	switch {
	case c.json:
		o.jsonTable(c, rows)
	case len(rows) == 0:
	case c.raw:
		o.rawTable(c, rows)
	default:
		o.alignedTable(c, rows)
	}
}

func (o *out) alignedTable(c *config, rows []row) {
	cells := make([][]string, len(rows))
	cellWidths := make([][]int, len(rows))
	widths := make([]int, len(c.columns))
	for i, id := range c.columns {
		widths[i] = len(columns[id].name) // headings count, printed or not
	}
	for r := range rows {
		for i, id := range c.columns {
			text, _ := rows[r].cell(id)
			safe, width := o.safe(text)
			cells[r] = append(cells[r], safe)
			cellWidths[r] = append(cellWidths[r], width)
			widths[i] = max(widths[i], width)
		}
	}
	line := func(texts []string, textWidths []int) {
		var b strings.Builder
		for i, id := range c.columns {
			if i > 0 {
				b.WriteByte(' ')
			}
			pad := strings.Repeat(" ", widths[i]-textWidths[i])
			switch {
			case columns[id].right:
				b.WriteString(pad + texts[i])
			case i == len(c.columns)-1:
				b.WriteString(texts[i])
			default:
				b.WriteString(texts[i] + pad)
			}
		}
		fmt.Fprintln(o.w, b.String())
	}
	if !c.noHead {
		var names []string
		var nameWidths []int
		for _, id := range c.columns {
			names, nameWidths = append(names, columns[id].name), append(nameWidths, len(columns[id].name))
		}
		line(names, nameWidths)
	}
	for r := range cells {
		line(cells[r], cellWidths[r])
	}
}

func (o *out) rawTable(c *config, rows []row) {
	if !c.noHead {
		var names []string
		for _, id := range c.columns {
			names = append(names, columns[id].name)
		}
		fmt.Fprintln(o.w, strings.Join(names, " "))
	}
	for _, r := range rows {
		var texts []string
		for _, id := range c.columns {
			text, _ := r.cell(id)
			texts = append(texts, rawEscape(text))
		}
		fmt.Fprintln(o.w, strings.Join(texts, " "))
	}
}

func (o *out) jsonTable(c *config, rows []row) {
	// One buffer, written once: a table of many devices is most of what a
	// one-shot --json --list does after the kernel's part.
	keys := make([]string, len(c.columns))
	for i, id := range c.columns {
		keys[i] = "         " + jsonQuote(strings.ToLower(columns[id].name)) + ": "
	}
	b := make([]byte, 0, 64+len(rows)*len(c.columns)*48)
	b = append(b, "{\n   \"loopdevices\": [\n"...)
	if len(rows) == 0 {
		b = append(b, '\n') // as libsmartcols 2.38 does
	}
	for n, r := range rows {
		if n == 0 {
			b = append(b, "      {\n"...)
		} else {
			b = append(b, "      },{\n"...)
		}
		for i, id := range c.columns {
			b = append(b, keys[i]...)
			text, ok := r.cell(id)
			switch {
			case !ok || text == "":
				b = append(b, "null"...)
			case columns[id].json == jsonNumber:
				b = append(b, text...)
			case columns[id].json == jsonBool && text == "1":
				b = append(b, "true"...)
			case columns[id].json == jsonBool:
				b = append(b, "false"...)
			default:
				b = appendJSONQuote(b, text)
			}
			if i < len(c.columns)-1 {
				b = append(b, ',')
			}
			b = append(b, '\n')
		}
	}
	if len(rows) > 0 {
		b = append(b, "      }\n"...)
	}
	b = append(b, "   ]\n}\n"...)
	o.w.Write(b)
}

// safe returns text as a table shows it, and its width on a terminal:
// control characters, and a backslash before an x, as \xHH; in a UTF-8
// locale other characters as they are, otherwise bytes past ASCII as \xHH.
func (o *out) safe(text string) (string, int) {
	var b strings.Builder
	width := 0
	hex := func(s string) {
		for i := 0; i < len(s); i++ {
			fmt.Fprintf(&b, "\\x%02x", s[i])
			width += 4
		}
	}
	for i := 0; i < len(text); {
		c := text[i]
		switch {
		case c == '\\' && i+1 < len(text) && text[i+1] == 'x', c < 0x20, c == 0x7f:
			hex(text[i : i+1])
			i++
		case c < utf8.RuneSelf:
			b.WriteByte(c)
			width++
			i++
		case !o.utf8:
			hex(text[i : i+1])
			i++
		default:
			r, n := utf8.DecodeRuneInString(text[i:])
			if r == utf8.RuneError || !unicode.IsGraphic(r) {
				hex(text[i : i+n])
			} else {
				b.WriteString(text[i : i+n])
				width += runeWidth(r)
			}
			i += n
		}
	}
	return b.String(), width
}

// runeWidth is how many terminal columns r takes: none for a combining
// mark, two for East Asian wide characters, else one.
func runeWidth(r rune) int {
	switch {
	case unicode.In(r, unicode.Mn, unicode.Me, unicode.Cf):
		return 0
	case r >= 0x1100 && r <= 0x115f, r >= 0x2e80 && r <= 0xa4cf, r >= 0xac00 && r <= 0xd7a3,
		r >= 0xf900 && r <= 0xfaff, r >= 0xfe30 && r <= 0xfe4f, r >= 0xff00 && r <= 0xff60,
		r >= 0xffe0 && r <= 0xffe6, r >= 0x1f300 && r <= 0x1f64f, r >= 0x20000 && r <= 0x3fffd:
		return 2
	}
	return 1
}

// rawEscape returns text as raw output shows it: every byte that is not a
// visible ASCII character, and a backslash before an x, as \xHH.
func rawEscape(text string) string {
	var b strings.Builder
	for i := 0; i < len(text); i++ {
		c := text[i]
		if c <= ' ' || c >= 0x7f || c == '\\' && i+1 < len(text) && text[i+1] == 'x' {
			fmt.Fprintf(&b, "\\x%02x", c)
		} else {
			b.WriteByte(c)
		}
	}
	return b.String()
}

// jsonQuote quotes s as libsmartcols does: quotes and backslashes escaped,
// control characters as \b \f \n \r \t or \u00XX, other bytes as they are.
func jsonQuote(s string) string {
	return string(appendJSONQuote(nil, s))
}

// appendJSONQuote appends s, quoted as jsonQuote does, to b.
func appendJSONQuote(b []byte, s string) []byte {
	const hex = "0123456789abcdef"
	b = append(b, '"')
	for i := 0; i < len(s); i++ {
		switch c := s[i]; c {
		case '"', '\\':
			b = append(b, '\\', c)
		case '\b':
			b = append(b, `\b`...)
		case '\f':
			b = append(b, `\f`...)
		case '\n':
			b = append(b, `\n`...)
		case '\r':
			b = append(b, `\r`...)
		case '\t':
			b = append(b, `\t`...)
		default:
			if c < 0x20 {
				b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
			} else {
				b = append(b, c)
			}
		}
	}
	return append(b, '"')
}
