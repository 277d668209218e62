package proxy

import (
	"strings"
	"sync"
	"time"
)

// lineLimiter bounds the log and access-log lines that one tunnel or one
// source address can make strait write: a refused tunnel stream costs the
// peer a few bytes, a log line costs us far more. Per key (a tunnel, or a
// source IP, with the line's reason) the first lines pass, then one per
// second; the rest are counted and the count is carried by the next line
// that passes, or by the summary when the tunnel ends.
type lineLimiter struct {
	burst float64
	rate  float64 // lines per second after the burst
	max   int     // keys kept; beyond, quiet keys are forgotten

	mu sync.Mutex
	m  map[string]*lineBucket
}

type lineBucket struct {
	tokens     float64
	last       time.Time
	suppressed int64
}

func newLineLimiter() *lineLimiter {
	return &lineLimiter{burst: 5, rate: 1, max: 4096, m: make(map[string]*lineBucket)}
}

// allow reports whether a line for key may be written, and how many lines
// for key were suppressed since the last one that was.
func (l *lineLimiter) allow(key string) (bool, int64) {
	now := time.Now()
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.m[key]
	if b == nil {
		if len(l.m) >= l.max {
			l.evict(now)
		}
		b = &lineBucket{tokens: l.burst, last: now}
		l.m[key] = b
	}
	b.tokens = min(l.burst, b.tokens+now.Sub(b.last).Seconds()*l.rate)
	b.last = now
	if b.tokens < 1 {
		b.suppressed++
		return false, 0
	}
	b.tokens--
	n := b.suppressed
	b.suppressed = 0
	return true, n
}

// takePrefix forgets every key starting with prefix (one tunnel's) and
// returns the lines suppressed for them.
func (l *lineLimiter) takePrefix(prefix string) int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	var n int64
	for k, b := range l.m {
		if strings.HasPrefix(k, prefix) {
			n += b.suppressed
			delete(l.m, k)
		}
	}
	return n
}

// evict drops keys that have refilled and suppressed nothing; if none has,
// everything (a flood of distinct keys must not grow the map). l.mu is held.
func (l *lineLimiter) evict(now time.Time) {
	for k, b := range l.m {
		if b.suppressed == 0 && b.tokens+now.Sub(b.last).Seconds()*l.rate >= l.burst {
			delete(l.m, k)
		}
	}
	if len(l.m) >= l.max {
		clear(l.m)
	}
}
