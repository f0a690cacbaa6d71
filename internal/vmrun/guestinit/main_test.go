//go:build linux

package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestRunTest runs a stand-in test binary that prints what a Go test
// binary prints with -test.v, and checks what reaches the console: the
// failing tests with their logs, what no test printed, the counts, and the
// exit status; with -test.v asked for, all of it.
func TestRunTest(t *testing.T) {
	out := `=== RUN   TestA
    a_test.go:1: a's log
--- PASS: TestA (0.00s)
=== RUN   TestB
=== PAUSE TestB
=== RUN   TestC
=== RUN   TestC/sub
    c_test.go:2: sub's failure
--- FAIL: TestC/sub (0.00s)
--- FAIL: TestC (0.00s)
kernel-fact: printed
=== CONT  TestB
    b_test.go:3: b's skip
--- SKIP: TestB (0.00s)
=== RUN   TestD
    d_test.go:4: d's last words
panic: test timed out
FAIL
`
	bin := filepath.Join(t.TempDir(), "x.test")
	script := "#!/bin/sh\ncase \"$*\" in *-test.v*) ;; *) exit 9;; esac\ncat <<'EOF'\n" + out + "EOF\nexit 1\n"
	if err := os.WriteFile(bin, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	var console strings.Builder
	code, n, err := runTest(&console, []string{bin, "-test.short"}, nil)
	if err != nil || code != 1 || n != (counts{passed: 1, skipped: 1, failed: 2}) {
		t.Fatalf("runTest = %d, %+v, %v; want 1, 1 passed, 1 skipped, 2 failed", code, n, err)
	}
	want := `--- FAIL: TestC/sub (0.00s)
    c_test.go:2: sub's failure
--- FAIL: TestC (0.00s)
kernel-fact: printed
panic: test timed out
FAIL
(TestD did not end; it logged:)
    d_test.go:4: d's last words
`
	if console.String() != want {
		t.Errorf("console:\n%s\nwant:\n%s", console.String(), want)
	}

	console.Reset()
	if _, _, err := runTest(&console, []string{bin, "-test.v"}, nil); err != nil || console.String() != out {
		t.Errorf("with -test.v: %v, console:\n%s\nwant all of it", err, console.String())
	}
}

// TestRunTestLongLine checks that a line too long to scan neither hangs
// the test binary on a full pipe nor goes unsaid.
func TestRunTestLongLine(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "x.test")
	script := "#!/bin/sh\nhead -c 4194304 /dev/zero | tr '\\0' x\necho\necho '--- PASS: TestA (0.00s)'\nexit 3\n"
	if err := os.WriteFile(bin, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	var console strings.Builder
	code, _, err := runTest(&console, []string{bin}, nil)
	if err != nil || code != 3 {
		t.Fatalf("runTest = %d, %v; want 3", code, err)
	}
	if !strings.Contains(console.String(), "its output from here on is not shown") {
		t.Errorf("console:\n%.200s\nwant a word that output was dropped", console.String())
	}
}
