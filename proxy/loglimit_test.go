package proxy

import "testing"

// TestLineLimiter: per key the burst passes, the rest is counted and
// reported by the next line that passes or by takePrefix; keys do not
// share budgets; a flood of distinct keys does not grow the map.
func TestLineLimiter(t *testing.T) {
	l := newLineLimiter()
	passed := 0
	for range 100 {
		if ok, _ := l.allow("tunnel a|denied"); ok {
			passed++
		}
	}
	if passed != int(l.burst) {
		t.Fatalf("%d of 100 lines passed, want the burst %v", passed, l.burst)
	}
	if ok, _ := l.allow("tunnel b|denied"); !ok {
		t.Fatal("another tunnel shares the first one's budget")
	}
	if n := l.takePrefix("tunnel a|"); n != 100-int64(l.burst) {
		t.Fatalf("summary counts %d suppressed lines, want %d", n, 100-int64(l.burst))
	}
	if n := l.takePrefix("tunnel a|"); n != 0 {
		t.Fatalf("a second summary counts %d", n)
	}
	for i := range 3 * l.max {
		l.allow(string(rune(i)) + "|x")
	}
	if len(l.m) > l.max {
		t.Fatalf("%d keys kept, limit %d", len(l.m), l.max)
	}
}
