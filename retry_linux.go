package loopctl

import (
	"context"
	"math/rand/v2"
	"time"

	"golang.org/x/sys/unix"
)

// againTries bounds the tries again of a call that answers EAGAIN
// (LOOP_SET_STATUS64 and LOOP_SET_BLOCK_SIZE while the kernel drains the
// queue) or EBUSY from LOOP_CTL_REMOVE of a device open elsewhere: with
// backoff's pauses up to the system's againPause, about a second in all,
// after which the error is returned.
const againTries = 16

// retryAgain runs fn, retrying while it fails with EAGAIN (retryWhile).
// It is the one place EAGAIN is retried.
func (s *system) retryAgain(fn func() error) error {
	return s.retryWhile(fn, func(err error) bool { return err == unix.EAGAIN })
}

// retryWhile runs fn, and again while again holds for its error, up to
// againTries more times, pausing before each as backoff does (the one
// retry policy, here for calls that take no context); then it returns
// the error.
func (s *system) retryWhile(fn func() error, again func(error) bool) error {
	for i := 0; ; i++ {
		err := fn()
		if err == nil || i == againTries || !again(err) {
			return err
		}
		backoff(context.Background(), i+1, s.againPause)
	}
}

// backoff is the package's one retry policy: it waits before attempt+1,
// not at all after the first (a lost race is the common case: GET_FREE
// then names another device), then exponentially from 100 µs with jitter,
// each pause at most limit (the system's bindPause for a bind, againPause
// for a busy kernel). It returns early with ctx.Err().
func backoff(ctx context.Context, attempt int, limit time.Duration) error {
	if attempt == 0 {
		return ctx.Err()
	}
	d := min(50*time.Microsecond<<min(attempt, 20), limit)
	d = d/2 + rand.N(d/2+1)
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
