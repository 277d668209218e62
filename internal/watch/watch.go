// Package watch runs Consul blocking queries in a loop that survives agent
// restarts: errors back off exponentially with jitter, and a successful answer
// resets the backoff.
package watch

import (
	"context"
	"errors"
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

// Delay is the jittered wait after the given number of consecutive
// failures, for retry loops of their own.
func (b Backoff) Delay(failures int) time.Duration { return b.delay(failures) }

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

// Observer is told the outcome of every query of every Loop run under a
// context that carries it (WithObserver): err is nil on success. It is how
// the proxy counts watch errors and notices that the agent went away
// without each watching package exporting its own status. Implementations
// must be fast and safe for concurrent use.
type Observer interface {
	WatchResult(what string, err error)
}

// ErrStopped is reported to the Observer when a Loop returns, so that it
// can forget the watch (an upstream removed by reconfiguration).
var ErrStopped = errors.New("watch stopped")

type observerKey struct{}

// WithObserver returns a context under which every Loop reports to o.
func WithObserver(ctx context.Context, o Observer) context.Context {
	return context.WithValue(ctx, observerKey{}, o)
}

// observerFrom returns the Observer ctx carries, or nil.
func observerFrom(ctx context.Context) Observer {
	o, _ := ctx.Value(observerKey{}).(Observer)
	return o
}

// Loop calls fn until ctx is done. index starts at 0 and follows what fn
// returns; if the index goes backwards (the agent restarted and lost its
// state) it restarts from 0 as Consul's docs require. Every outcome except
// the cancellation of ctx is reported to ctx's Observer, if any.
func Loop(ctx context.Context, log hclog.Logger, what string, b Backoff, fn Func) {
	var index uint64
	failures := 0
	obs := observerFrom(ctx)
	if obs != nil {
		defer obs.WatchResult(what, ErrStopped)
	}
	for ctx.Err() == nil {
		next, err := fn(ctx, index)
		if ctx.Err() == nil && obs != nil {
			obs.WatchResult(what, err)
		}
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
			// Resynchronise with a non-blocking read: the agent may have
			// restarted with lower indexes, and a blocking query on an
			// index it has not reached yet would hang for the whole wait.
			index = 0
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
