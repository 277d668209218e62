package tlsutil

import (
	"crypto/x509"
	"fmt"
	"sync"
	"testing"
	"time"
)

// entries counts what the cache really holds, to compare with its counter.
func (c *verifyCache) entries() int64 {
	var n int64
	c.m.Range(func(any, any) bool { n++; return true })
	return n
}

func fakeLeaf(i int) *x509.Certificate { return &x509.Certificate{Raw: fmt.Appendf(nil, "leaf-%d", i)} }

// TestVerifyCacheCountConcurrent: handshakes that find the same expired
// entry at once, and peers verified at the same moment, must leave the
// counter equal to the number of entries. A drifting counter either lets
// the cache grow past verifyCacheMax (counts low) or stops it caching for
// good (counts high).
func TestVerifyCacheCountConcurrent(t *testing.T) {
	t.Parallel()
	const workers, rounds = 8, 5000
	past, future := time.Now().Add(-time.Hour), time.Now().Add(time.Hour)
	var c verifyCache
	for r := range rounds {
		leaf := fakeLeaf(r % 4)
		c.put(leaf, x509.ExtKeyUsageServerAuth, verified{serial: "old", notAfter: past})
		start := make(chan struct{})
		var wg sync.WaitGroup
		for w := range workers {
			wg.Go(func() {
				<-start
				// Odd rounds: every handshake finds the expired entry and
				// drops it. Even rounds: some verify the peer again meanwhile.
				if r%2 == 0 && w%3 == 2 {
					c.put(leaf, x509.ExtKeyUsageServerAuth, verified{serial: "new", notAfter: future})
				} else {
					c.get(leaf, x509.ExtKeyUsageServerAuth)
				}
			})
		}
		close(start)
		wg.Wait()
		if n, e := c.n.Load(), c.entries(); n != e {
			t.Fatalf("round %d: counter %d, entries %d", r, n, e)
		}
		// Leave no entry behind for the next round's put to skip.
		c.m.Delete(verifyKey{string(leaf.Raw), x509.ExtKeyUsageServerAuth})
		c.n.Store(c.entries())
	}
}

// TestVerifyCacheBounded: the cache holds at most verifyCacheMax entries,
// however many puts race for the last slots, and frees slots as entries
// expire.
func TestVerifyCacheBounded(t *testing.T) {
	t.Parallel()
	var c verifyCache
	past := time.Now().Add(-time.Hour)
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Go(func() {
			for i := w; i < 2*verifyCacheMax; i += 8 {
				c.put(fakeLeaf(i), x509.ExtKeyUsageClientAuth, verified{notAfter: past})
			}
		})
	}
	wg.Wait()
	if n, e := c.n.Load(), c.entries(); n != e || e != verifyCacheMax {
		t.Fatalf("full cache: counter %d, entries %d, want both %d", n, e, verifyCacheMax)
	}
	for i := range 2 * verifyCacheMax {
		c.get(fakeLeaf(i), x509.ExtKeyUsageClientAuth) // expired: removed
	}
	if n, e := c.n.Load(), c.entries(); n != 0 || e != 0 {
		t.Fatalf("after expiry: counter %d, entries %d, want 0", n, e)
	}
	leaf := fakeLeaf(-1)
	c.put(leaf, x509.ExtKeyUsageClientAuth, verified{serial: "s", notAfter: time.Now().Add(time.Hour)})
	if v, ok := c.get(leaf, x509.ExtKeyUsageClientAuth); !ok || v.serial != "s" {
		t.Fatalf("put after expiry not cached: %+v %v", v, ok)
	}
}
