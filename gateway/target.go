package gateway

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"sort"
	"sync"
	"sync/atomic"
	"time"
)

// DefaultConnectTimeout bounds routing and dialing a backend when the
// service's resolver sets no ConnectTimeout (Consul's default, 5s).
const DefaultConnectTimeout = 5 * time.Second

// Endpoint is one backend address of a target.
type Endpoint struct {
	Addr string `json:"addr"`
	Node string `json:"node,omitempty"`
	// ID is the instance's service ID (a proxy's, a Connect-native
	// service's or a gateway's).
	ID string `json:"id,omitempty"`
}

// endpoint is an Endpoint with its live connection count, carried over
// from one endpoint set to the next while the address stays listed.
type endpoint struct {
	Endpoint
	active atomic.Int64
}

// Target is one route's healthy endpoints, kept current by a watch: a
// local service or subset, or a remote datacenter's gateways. It is safe
// for concurrent use.
type Target struct {
	name Name
	// connectTimeout bounds dialing (the resolver's ConnectTimeout).
	connectTimeout atomic.Int64

	mu     sync.Mutex
	eps    []*endpoint
	first  chan struct{} // closed once the first endpoint set is stored
	loaded bool
	// lastUsed (unix nanoseconds) and conns let the Catalog stop the
	// watches of idle targets.
	lastUsed atomic.Int64
	conns    atomic.Int64
	updated  atomic.Int64
}

// NewTarget returns a target with no endpoints; Ready is open until the
// first SetEndpoints.
func NewTarget(n Name) *Target {
	t := &Target{name: n, first: make(chan struct{})}
	t.connectTimeout.Store(int64(DefaultConnectTimeout))
	t.touch()
	return t
}

// Name is what the target routes.
func (t *Target) Name() Name { return t.name }

func (t *Target) touch() { t.lastUsed.Store(time.Now().UnixNano()) }

// ConnectTimeout is the dial budget of one connection to this target.
func (t *Target) ConnectTimeout() time.Duration { return time.Duration(t.connectTimeout.Load()) }

// SetConnectTimeout changes it; d <= 0 means DefaultConnectTimeout.
func (t *Target) SetConnectTimeout(d time.Duration) {
	if d <= 0 {
		d = DefaultConnectTimeout
	}
	t.connectTimeout.Store(int64(d))
}

// SetEndpoints replaces the healthy endpoints. Live connection counts
// follow their address.
func (t *Target) SetEndpoints(eps []Endpoint) {
	t.mu.Lock()
	defer t.mu.Unlock()
	old := make(map[string]*endpoint, len(t.eps))
	for _, e := range t.eps {
		old[e.Addr] = e
	}
	next := make([]*endpoint, 0, len(eps))
	seen := make(map[string]bool, len(eps))
	for _, e := range eps {
		if seen[e.Addr] {
			continue
		}
		seen[e.Addr] = true
		if o, ok := old[e.Addr]; ok {
			if o.Endpoint == e {
				next = append(next, o)
				continue
			}
			// Same address, another instance: keep the count.
			n := &endpoint{Endpoint: e}
			n.active.Store(o.active.Load())
			next = append(next, n)
			continue
		}
		next = append(next, &endpoint{Endpoint: e})
	}
	sort.Slice(next, func(i, j int) bool { return next[i].Addr < next[j].Addr })
	t.eps = next
	t.updated.Store(time.Now().UnixNano())
	if !t.loaded {
		t.loaded = true
		close(t.first)
	}
}

// Ready is closed once the target has had its first endpoint set.
func (t *Target) Ready() <-chan struct{} { return t.first }

func (t *Target) snapshot() []*endpoint {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.eps
}

// ErrNoEndpoints: the target has no healthy endpoint.
var ErrNoEndpoints = errors.New("no healthy endpoints")

// pick returns the endpoint with the fewest live connections among those
// not tried yet, ties broken at random; -1 when all were tried.
func pick(eps []*endpoint, tried []bool) int {
	best, bestActive, ties := -1, int64(0), 0
	for i, e := range eps {
		if tried[i] {
			continue
		}
		a := e.active.Load()
		switch {
		case best < 0 || a < bestActive:
			best, bestActive, ties = i, a, 1
		case a == bestActive:
			ties++
			if rand.IntN(ties) == 0 { // reservoir sampling among equals
				best = i
			}
		}
	}
	return best
}

// dialer dials one backend address; tests replace it.
type dialer func(ctx context.Context, addr string) (net.Conn, error)

func netDial(ctx context.Context, addr string) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, "tcp", addr)
}

// Dial connects to the least-loaded healthy endpoint; a failed dial moves
// on to the next endpoint not yet tried, all within ctx. It returns the
// connection, the endpoint, the number of attempts and a release func to
// call once when the connection ends.
func (t *Target) dial(ctx context.Context, dial dialer) (net.Conn, Endpoint, int, func(), error) {
	eps := t.snapshot()
	if len(eps) == 0 {
		return nil, Endpoint{}, 0, nil, ErrNoEndpoints
	}
	tried := make([]bool, len(eps))
	var errs []error
	attempts := 0
	for ctx.Err() == nil {
		i := pick(eps, tried)
		if i < 0 {
			break
		}
		tried[i] = true
		e := eps[i]
		attempts++
		e.active.Add(1)
		c, err := dial(ctx, e.Addr)
		if err == nil {
			t.conns.Add(1)
			var once sync.Once
			return c, e.Endpoint, attempts, func() {
				once.Do(func() {
					e.active.Add(-1)
					t.conns.Add(-1)
					t.touch()
				})
			}, nil
		}
		e.active.Add(-1)
		errs = append(errs, fmt.Errorf("%s: %w", e.Addr, err))
	}
	if err := ctx.Err(); err != nil && attempts < len(eps) {
		errs = append(errs, fmt.Errorf("connect timeout after %d of %d endpoints: %w", attempts, len(eps), err))
	}
	return nil, Endpoint{}, attempts, nil, errors.Join(errs...)
}

// TargetStatus is a target as /routes shows it.
type TargetStatus struct {
	Kind           string           `json:"kind"`
	Target         string           `json:"target"`
	Datacenter     string           `json:"datacenter"`
	Service        string           `json:"service,omitempty"`
	Subset         string           `json:"subset,omitempty"`
	Filter         string           `json:"filter,omitempty"`
	Loaded         bool             `json:"loaded"`
	Active         int64            `json:"active_connections"`
	Endpoints      []EndpointStatus `json:"endpoints"`
	UpdatedAt      *time.Time       `json:"updated_at,omitempty"`
	LastUsedAt     time.Time        `json:"last_used_at"`
	ConnectTimeout string           `json:"connect_timeout"`
}

// EndpointStatus is an endpoint with its live connections.
type EndpointStatus struct {
	Endpoint
	Active int64 `json:"active_connections"`
}

func (t *Target) status() TargetStatus {
	t.mu.Lock()
	loaded := t.loaded
	eps := t.eps
	t.mu.Unlock()
	s := TargetStatus{
		Kind: t.name.Kind, Target: t.name.Target(), Datacenter: t.name.Datacenter,
		Service: t.name.Service, Subset: t.name.Subset, Loaded: loaded, Active: t.conns.Load(),
		Endpoints: make([]EndpointStatus, 0, len(eps)), LastUsedAt: time.Unix(0, t.lastUsed.Load()).UTC(),
		ConnectTimeout: t.ConnectTimeout().String(),
	}
	if u := t.updated.Load(); u != 0 {
		at := time.Unix(0, u).UTC()
		s.UpdatedAt = &at
	}
	for _, e := range eps {
		s.Endpoints = append(s.Endpoints, EndpointStatus{Endpoint: e.Endpoint, Active: e.active.Load()})
	}
	return s
}
