package loopctl

import (
	"context"
	"errors"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestRetryWhile: a call is tried again while its error asks for it, up to
// againTries more times, and its last error returned; any other error
// ends the tries at once.
func TestRetryWhile(t *testing.T) {
	s := newSystem(osKernel{}, "/sys")
	s.againPause = time.Microsecond
	for _, c := range []struct {
		name      string
		errs      []error // what the tries answer, the last one repeated
		wantTries int
		want      error
	}{
		{"success", []error{nil}, 1, nil},
		{"EAGAIN then success", []error{unix.EAGAIN, unix.EAGAIN, nil}, 3, nil},
		{"EAGAIN throughout", []error{unix.EAGAIN}, againTries + 1, unix.EAGAIN},
		{"another error", []error{unix.EAGAIN, unix.EBUSY}, 2, unix.EBUSY},
	} {
		t.Run(c.name, func(t *testing.T) {
			tries := 0
			err := s.retryAgain(func() error {
				err := c.errs[min(tries, len(c.errs)-1)]
				tries++
				return err
			})
			if err != c.want || tries != c.wantTries {
				t.Errorf("%d tries, %v; want %d, %v", tries, err, c.wantTries, c.want)
			}
		})
	}
}

// TestBackoff: the first attempt does not wait, later ones wait at most
// the limit, and a context that ends ends the wait with its error.
func TestBackoff(t *testing.T) {
	ctx := context.Background()
	if err := backoff(ctx, 0, time.Hour); err != nil {
		t.Fatalf("attempt 0: %v", err)
	}
	if err := backoff(ctx, 30, time.Millisecond); err != nil {
		t.Fatalf("attempt 30 with a 1 ms limit: %v", err)
	}
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	for _, attempt := range []int{0, 5} {
		if err := backoff(cancelled, attempt, time.Hour); !errors.Is(err, context.Canceled) {
			t.Errorf("attempt %d, cancelled: %v, want context.Canceled", attempt, err)
		}
	}
}
