//go:build linux

package main

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"time"
)

// factPrefix starts the lines TestKernelFacts prints (its factPrefix).
const factPrefix = "kernel-fact: "

// A factTable gathers the lines TestKernelFacts prints on each machine:
// one column a kernel, named by the "kernel" fact, its release.
type factTable struct {
	names   []string                     // the facts, in the order printed
	columns []string                     // the kernels' releases, in run order
	answers map[string]map[string]string // release -> fact -> answer
	column  string                       // the release of the machine now printing
}

// line takes one line of a machine's output; t may be nil (no -facts).
func (t *factTable) line(line string) {
	rest, ok := strings.CutPrefix(line, factPrefix)
	if t == nil || !ok {
		return
	}
	name, answer, ok := strings.Cut(rest, ": ")
	if !ok {
		return
	}
	if name == "kernel" {
		t.column = answer
		if t.answers[answer] == nil {
			t.answers[answer] = map[string]string{}
			t.columns = append(t.columns, answer)
		}
		return
	}
	if t.column == "" {
		return
	}
	if !slices.Contains(t.names, name) {
		t.names = append(t.names, name)
	}
	t.answers[t.column][name] = answer
}

// writeFacts runs TestKernelFacts on this machine too, with the test
// binary built for the machines, and writes the table to path.
func (r *runner) writeFacts(path string) error {
	if r.test == "" {
		return fmt.Errorf("no machine ran")
	}
	cmd := exec.Command(r.test, "-test.run", "^TestKernelFacts$", "-test.v", "-test.count=1")
	cmd.Env = append(os.Environ(), "LOOPCTL_REQUIRE_INTEGRATION=1")
	cmd.Dir = r.lib
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		return fmt.Errorf("TestKernelFacts on this machine: %v\n%s", err, out)
	}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		r.facts.line(sc.Text())
	}
	return os.WriteFile(path, r.facts.markdown(time.Now()), 0o644)
}

// markdown is the table as KERNELS.md holds it, with how it was made.
func (t *factTable) markdown(now time.Time) []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, `# What each kernel answers

Generated on %s by

    cd internal/vmrun && go run . -tmp tmpfs -facts ../../KERNELS.md -- -test.run '^TestKernelFacts$' -test.v

Each column is what TestKernelFacts (facts_integration_linux_test.go)
printed on one kernel: Debian's, booted in qemu by internal/vmrun, and,
last, the kernel of the machine that ran the command. Each answer is the
kernel's own to raw system calls on devices the test made: an errno, or
what the call did. "not asked": a call that could change devices of
others outside a machine of the test's own, or that udev, running,
would answer for. RELIABILITY.md ("Kernels") says what the package does
about each row. Run the command again to bring the table up to date.

`, now.UTC().Format("2006-01-02"))
	b.WriteString("| |")
	for _, c := range t.columns {
		fmt.Fprintf(&b, " %s |", c)
	}
	b.WriteString("\n| --- |")
	for range t.columns {
		b.WriteString(" --- |")
	}
	b.WriteString("\n")
	for _, name := range t.names {
		fmt.Fprintf(&b, "| %s |", name)
		for _, c := range t.columns {
			answer := t.answers[c][name]
			if answer == "" {
				answer = "-"
			}
			fmt.Fprintf(&b, " %s |", answer)
		}
		b.WriteString("\n")
	}
	return b.Bytes()
}
