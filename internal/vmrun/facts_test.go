//go:build linux

package main

import (
	"strings"
	"testing"
	"time"
)

// TestFactTable: the lines of two machines make a column each, a fact
// one of them lacks shows "-", other lines are passed over, and a nil
// table (no -facts) takes lines without a word.
func TestFactTable(t *testing.T) {
	var none *factTable
	none.line("kernel-fact: kernel: 6.1.0")
	ft := &factTable{answers: map[string]map[string]string{}}
	for _, line := range []string{
		"kernel-fact: stray: before any kernel",
		"vmrun-guest: /loopctl.test",
		"kernel-fact: kernel: 5.10.0-35-amd64",
		"kernel-fact: LOOP_CTL_ADD 1<<20: taken",
		"kernel-fact: LOOP_CLR_FD by the only opener: detach",
		"=== RUN   TestKernelFacts",
		"kernel-fact: kernel: 6.18.44",
		"kernel-fact: LOOP_CTL_ADD 1<<20: EINVAL",
		"kernel-fact: GPT partitions found: no",
	} {
		ft.line(line)
	}
	got := string(ft.markdown(time.Date(2026, 12, 5, 0, 0, 0, 0, time.UTC)))
	want := `| | 5.10.0-35-amd64 | 6.18.44 |
| --- | --- | --- |
| LOOP_CTL_ADD 1<<20 | taken | EINVAL |
| LOOP_CLR_FD by the only opener | detach | - |
| GPT partitions found | - | no |
`
	if !strings.HasSuffix(got, want) || !strings.Contains(got, "Generated on 2026-12-05") {
		t.Fatalf("markdown:\n%s\nwant it to end with\n%s", got, want)
	}
}
