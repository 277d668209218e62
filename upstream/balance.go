package upstream

import (
	"hash/fnv"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
)

// Balancer is a resolver's LoadBalancer reduced to what L4 can apply.
type Balancer struct {
	Policy string `json:"policy"`
	// ChoiceCount is least_request's number of random choices (2 unless
	// configured, at most 64).
	ChoiceCount int `json:"choice_count,omitempty"`
	// SourceIP: the hash policies include SourceIP (ring_hash, maglev);
	// without it a hash policy has nothing to hash at L4 and picks at
	// random, as Envoy does when no hash can be computed.
	SourceIP bool `json:"source_ip,omitempty"`
	// RingSize is ring_hash's number of ring entries: MinimumRingSize
	// (default 1024), at most MaximumRingSize and 65536.
	RingSize int `json:"ring_size,omitempty"`
	// Ignored lists what the resolver asked for that L4 cannot do (hash
	// policies on headers, cookies, query parameters).
	Ignored []string `json:"ignored,omitempty"`
}

// lbState is what the balancers keep per endpoint set: round robin's
// position and schedule, the hash ring, the maglev table. Each is built on
// first use and lives as long as the set, so it changes only when the
// endpoints do: a client's endpoint stays its own while the set is stable.
type lbState struct {
	rr      atomic.Uint64
	wrrOnce sync.Once
	wrr     []int32

	ringMu   sync.Mutex
	ring     []ringEntry
	ringSize int

	maglevOnce sync.Once
	maglev     []int32
}

type ringEntry struct {
	hash uint64
	ep   int32
}

// mix64 is splitmix64's finalizer: FNV's output is weak in its low bits
// for short inputs, and ring positions must spread.
func mix64(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}

func hashString(s string) uint64 {
	h := fnv.New64a()
	h.Write([]byte(s))
	return mix64(h.Sum64())
}

// hashSource is the SourceIP hash: the 16-byte form of the address, so
// that 10.0.0.1 and ::ffff:10.0.0.1 hash alike.
func hashSource(ip netip.Addr) uint64 {
	b := ip.As16()
	h := fnv.New64a()
	h.Write(b[:])
	return mix64(h.Sum64())
}

// pick chooses the endpoint of set to try next: among those not tried and
// not ejected, else those not tried, else all, by b's policy. src is the
// proxied connection's source (hash policies); it may be invalid.
func (u *Upstream) pick(set *endpointSet, b *Balancer, tried []bool, src netip.Addr) int {
	eps := set.eps
	now := u.mono()
	var buf [64]int
	cand := buf[:0]
	for i, e := range eps {
		if !tried[i] && e.st.ejectedUntil.Load() <= now {
			cand = append(cand, i)
		}
	}
	if len(cand) == 0 {
		for i := range eps {
			if !tried[i] {
				cand = append(cand, i)
			}
		}
	}
	if len(cand) == 0 {
		for i := range eps {
			cand = append(cand, i)
		}
	}
	if len(cand) == 1 {
		return cand[0]
	}
	switch b.Policy {
	case PolicyRoundRobin:
		return set.pickRoundRobin(cand)
	case PolicyRandom:
		return pickWeighted(eps, cand)
	case PolicyRingHash, PolicyMaglev:
		if b.SourceIP && src.IsValid() {
			return set.pickHash(b, cand, hashSource(src))
		}
		return pickWeighted(eps, cand)
	}
	return pickLeastRequest(eps, cand, max(b.ChoiceCount, 2))
}

// pickWeighted draws one candidate with probability proportional to its
// weight.
func pickWeighted(eps []*endpoint, cand []int) int {
	total := 0
	for _, i := range cand {
		total += eps[i].weight()
	}
	r := rand.IntN(total)
	for _, i := range cand {
		if r -= eps[i].weight(); r < 0 {
			return i
		}
	}
	return cand[len(cand)-1]
}

// pickLeastRequest draws k distinct candidates, each draw weighted, and
// returns the one with the fewest active connections per unit of weight;
// a tie goes to the earlier draw. k = 2 with equal weights is the power of
// two random choices.
func pickLeastRequest(eps []*endpoint, cand []int, k int) int {
	k = min(k, len(cand))
	best := -1
	var bestActive int64
	var bestW int
	for range k {
		j := 0
		total := 0
		for _, i := range cand {
			total += eps[i].weight()
		}
		r := rand.IntN(total)
		for n, i := range cand {
			if r -= eps[i].weight(); r < 0 {
				j = n
				break
			}
		}
		i := cand[j]
		cand[j] = cand[len(cand)-1]
		cand = cand[:len(cand)-1]
		a, w := eps[i].st.active.Load(), eps[i].weight()
		// a/w < bestActive/bestW, without division.
		if best < 0 || a*int64(bestW) < bestActive*int64(w) {
			best, bestActive, bestW = i, a, w
		}
	}
	return best
}

// pickRoundRobin walks the set's smooth weighted round robin schedule
// from a shared position to the first candidate.
func (s *endpointSet) pickRoundRobin(cand []int) int {
	s.lb.wrrOnce.Do(func() { s.lb.wrr = smoothWRR(s.eps) })
	sched := s.lb.wrr
	var mbuf [64]bool
	allowed := candMask(mbuf[:0], len(s.eps), cand)
	n := s.lb.rr.Add(1) - 1
	for j := range uint64(len(sched)) {
		if i := int(sched[(n+j)%uint64(len(sched))]); allowed[i] {
			return i
		}
	}
	return cand[0]
}

// candMask marks cand among n endpoints, in buf when it is large enough.
func candMask(buf []bool, n int, cand []int) []bool {
	var m []bool
	if n <= cap(buf) {
		m = buf[:n]
	} else {
		m = make([]bool, n)
	}
	for _, i := range cand {
		m[i] = true
	}
	return m
}

// smoothWRR is nginx's smooth weighted round robin, unrolled into one
// cycle of sum(weights) picks: each endpoint appears weight times, spread
// out rather than in runs.
func smoothWRR(eps []*endpoint) []int32 {
	total := 0
	for _, e := range eps {
		total += e.weight()
	}
	cur := make([]int, len(eps))
	out := make([]int32, 0, total)
	for range total {
		best := 0
		for i, e := range eps {
			cur[i] += e.weight()
			if cur[i] > cur[best] {
				best = i
			}
		}
		cur[best] -= total
		out = append(out, int32(best))
	}
	return out
}

// pickHash maps h onto the ring (ring_hash) or the maglev table and walks
// on to the first candidate: a source keeps its endpoint while that one is
// healthy, and only the sources of an endpoint that left move.
func (s *endpointSet) pickHash(b *Balancer, cand []int, h uint64) int {
	var mbuf [64]bool
	allowed := candMask(mbuf[:0], len(s.eps), cand)
	if b.Policy == PolicyMaglev {
		s.lb.maglevOnce.Do(func() { s.lb.maglev = maglevTable(s.eps, maglevTableSize) })
		t := s.lb.maglev
		start := h % uint64(len(t))
		for j := range uint64(len(t)) {
			if i := int(t[(start+j)%uint64(len(t))]); allowed[i] {
				return i
			}
		}
		return cand[0]
	}
	ring := s.hashRing(b.RingSize)
	start, _ := slices.BinarySearchFunc(ring, h, func(e ringEntry, h uint64) int {
		switch {
		case e.hash < h:
			return -1
		case e.hash > h:
			return 1
		}
		return 0
	})
	for j := range len(ring) {
		if i := int(ring[(start+j)%len(ring)].ep); allowed[i] {
			return i
		}
	}
	return cand[0]
}

// hashRing returns the set's ring of at least size entries (at most twice
// that, and capRingSize), each endpoint with a share proportional to its
// weight, at positions that depend only on its address and the entry's
// number, as in Envoy's ring_hash.
func (s *endpointSet) hashRing(size int) []ringEntry {
	if size <= 0 {
		size = defaultMinRingSize
	}
	s.lb.ringMu.Lock()
	defer s.lb.ringMu.Unlock()
	if s.lb.ring != nil && s.lb.ringSize == size {
		return s.lb.ring
	}
	total := 0
	for _, e := range s.eps {
		total += e.weight()
	}
	// Entries per unit of weight: enough for size entries in all, rounded
	// up to a power of two, so that an endpoint coming or going rarely
	// changes it and the ring changes only where that endpoint's entries
	// are. (Envoy scales to the exact size, which moves a few clients of
	// endpoints that stayed whenever the total weight changes.)
	k := 1
	for k*total < size && k*total*2 <= capRingSize {
		k *= 2
	}
	var ring []ringEntry
	for i, e := range s.eps {
		n := k * e.weight()
		for r := range n {
			ring = append(ring, ringEntry{hash: hashString(e.Addr + "_" + strconv.Itoa(r)), ep: int32(i)})
		}
	}
	slices.SortFunc(ring, func(a, b ringEntry) int {
		switch {
		case a.hash < b.hash:
			return -1
		case a.hash > b.hash:
			return 1
		}
		return int(a.ep - b.ep)
	})
	s.lb.ring, s.lb.ringSize = ring, size
	return ring
}

// maglevTable builds a weighted Maglev lookup table of size m (a prime),
// as Envoy does: each endpoint fills its preference list's next free slot
// in turn, weighted endpoints more often.
func maglevTable(eps []*endpoint, m int) []int32 {
	table := make([]int32, m)
	for i := range table {
		table[i] = -1
	}
	if len(eps) == 0 {
		return table
	}
	type perm struct {
		offset, skip, next uint64
		weight, target     float64
	}
	maxW := 0
	for _, e := range eps {
		maxW = max(maxW, e.weight())
	}
	ps := make([]perm, len(eps))
	for i, e := range eps {
		h := hashString(e.Addr)
		h2 := mix64(h ^ 0x9e3779b97f4a7c15)
		ps[i] = perm{offset: h % uint64(m), skip: h2%uint64(m-1) + 1, weight: float64(e.weight()) / float64(maxW)}
	}
	filled := 0
	for iter := 1.0; filled < m; iter++ {
		for i := range ps {
			p := &ps[i]
			if iter*p.weight < p.target {
				continue
			}
			p.target++
			for {
				c := (p.offset + p.next*p.skip) % uint64(m)
				p.next++
				if table[c] < 0 {
					table[c] = int32(i)
					filled++
					break
				}
			}
			if filled == m {
				break
			}
		}
	}
	return table
}
