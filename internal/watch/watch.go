// Package watch runs Consul blocking queries in a loop that survives agent
// restarts: errors back off exponentially with jitter, and a successful answer
// resets the backoff.
package watch

import (
	"context"
	"math/rand/v2"
	"time"

	"github.com/hashicorp/go-hclog"
)

// Func performs one blocking query that waits for a change after index and
// returns the index to use next. Returning the same index is allowed (for
// example when the wait timed out with no change).
type Func func(ctx context.Context, index uint64) (uint64, error)

// Backoff bounds the retry delays of Loop. The zero value means 250ms growing
// to 30s.
type Backoff struct {
	Min, Max time.Duration
}

func (b Backoff) delay(failures int) time.Duration {
	lo, hi := b.Min, b.Max
	if lo <= 0 {
		lo = 250 * time.Millisecond
	}
	if hi <= 0 {
		hi = 30 * time.Second
	}
	d := lo
	for i := 1; i < failures && d < hi; i++ {
		d *= 2
	}
	d = min(d, hi)
	// Full jitter on the upper half, so that many proxies restarting with
	// one agent do not retry in lockstep.
	return d/2 + rand.N(d/2+1)
}

// Loop calls fn until ctx is done. index starts at 0 and follows what fn
// returns; if the index goes backwards (the agent restarted and lost its
// state) it restarts from 0 as Consul's docs require.
func Loop(ctx context.Context, log hclog.Logger, what string, b Backoff, fn Func) {
	var index uint64
	failures := 0
	for ctx.Err() == nil {
		next, err := fn(ctx, index)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			failures++
			d := b.delay(failures)
			if failures == 1 || failures%10 == 0 {
				log.Warn("watch failed; retrying", "watch", what, "error", err, "retry_in", d, "failures", failures)
			} else {
				log.Debug("watch failed; retrying", "watch", what, "error", err, "retry_in", d, "failures", failures)
			}
			t := time.NewTimer(d)
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
			continue
		}
		if failures > 0 {
			log.Info("watch recovered", "watch", what, "after_failures", failures)
		}
		failures = 0
		switch {
		case next < index:
			next = 0 // went backwards: start over with a non-blocking read
		case next == 0:
			next = 1 // never block on 0, which would return at once forever
		}
		index = next
	}
}

// Sleep waits for d or until ctx is done, and reports whether the full
// duration elapsed.
func Sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
