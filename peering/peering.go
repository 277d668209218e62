// Package peering follows Consul cluster peerings for strait: the CA roots
// each peer replicated to us, and which peers the local service is
// exported to.
//
// Consul hands Envoy the peers' trust bundles over its private gRPC
// (TrustBundleRead, TrustBundleListByService); over HTTP the same roots
// are the PeerCAPems of /v1/peerings, whose blocking query wakes when a
// peer's bundle changes (the peering is rewritten with it). The peers a
// service is exported to are the consumers in /v1/exported-services
// (blocking). Tokens need peering:read and mesh:read for these; a token
// without them leaves peering off (logged once, re-checked every few
// minutes) rather than failing the proxy.
//
// A Trust serves both directions: upstreams ask PeerRoots(name) for the
// roots that a peer's servers must chain to, and the public listener gets
// the roots of exactly the peers its service is exported to (Options.
// Inbound, normally tlsutil.Source.SetInboundPeers), as Consul's
// TrustBundleListByService gives Envoy.
package peering

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"

	"github.com/straitproxy/strait/internal/watch"
	"github.com/straitproxy/strait/tlsutil"
)

// DefaultForbiddenRetry is how often a watch the token may not run is
// tried again.
const DefaultForbiddenRetry = 5 * time.Minute

// Options configure a Trust. Client is required.
type Options struct {
	Client *api.Client
	Logger hclog.Logger
	// Service is the local service whose inbound peers are followed: the
	// peers /v1/exported-services lists as its consumers. Empty follows
	// none (a proxy without a public listener, a gateway).
	Service string
	// Partition of Service and of the peerings; empty is the default.
	Partition string
	// Inbound receives the roots of the peers Service is exported to,
	// whenever that set or their roots change (and once, empty, when it
	// is first known to be empty). Called from one goroutine at a time.
	Inbound func([]*tlsutil.PeerRoots)
	// ForbiddenRetry (DefaultForbiddenRetry) paces a watch that the agent
	// answered 403.
	ForbiddenRetry time.Duration
}

// Trust follows peer roots and exported services. Its methods are safe for
// concurrent use; Run does the watching.
type Trust struct {
	opts Options
	log  hclog.Logger

	// roots are every peering's roots by peer name; nil until the first
	// answer of the peerings watch.
	roots atomic.Pointer[map[string]*tlsutil.PeerRoots]
	// want is closed once something needs the peerings watch (an
	// upstream asking PeerRoots, or Service being exported to a peer).
	want     chan struct{}
	wantOnce sync.Once

	mu        sync.Mutex
	consumers []string // peers Service is exported to, sorted
	haveCons  bool
	lastIn    string // the inbound set last handed to Inbound, as names+fingerprints
	changed   chan struct{}
}

// New returns a Trust; nothing is watched until Run.
func New(opts Options) *Trust {
	if opts.Logger == nil {
		opts.Logger = hclog.NewNullLogger()
	}
	if opts.ForbiddenRetry <= 0 {
		opts.ForbiddenRetry = DefaultForbiddenRetry
	}
	return &Trust{opts: opts, log: opts.Logger.Named("peering"), want: make(chan struct{}), changed: make(chan struct{}), lastIn: "-"}
}

// Run watches until ctx is done: the exported services when Options.Service
// is set, and the peerings from the first moment they are needed.
func (t *Trust) Run(ctx context.Context) {
	var wg sync.WaitGroup
	if t.opts.Service != "" {
		wg.Go(func() { t.watchExported(ctx) })
	}
	wg.Go(func() {
		select {
		case <-ctx.Done():
			return
		case <-t.want:
		}
		t.watchPeerings(ctx)
	})
	wg.Wait()
}

// Want starts the peerings watch if it is not running yet.
func (t *Trust) Want() { t.wantOnce.Do(func() { close(t.want) }) }

// PeerRoots returns the roots of the named peer, or nil while they are not
// known (the first answer is out, or there is no such peering). It starts
// the peerings watch.
func (t *Trust) PeerRoots(name string) *tlsutil.PeerRoots {
	t.Want()
	m := t.roots.Load()
	if m == nil {
		return nil
	}
	return (*m)[strings.ToLower(name)]
}

// Changed returns a channel closed at the next change of the roots.
func (t *Trust) Changed() <-chan struct{} {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.changed
}

// Status is the Trust as the admin listener shows it.
type Status struct {
	// Peers are the peerings whose roots are known, by name, with the
	// trust domain and roots fingerprint.
	Peers []PeerStatus `json:"peers"`
	// Inbound are the peers the service is exported to.
	Inbound []string `json:"inbound,omitempty"`
}

// PeerStatus is one peering's roots.
type PeerStatus struct {
	Name        string `json:"name"`
	TrustDomain string `json:"trust_domain"`
	Fingerprint string `json:"roots_fingerprint"`
}

// Status returns what the Trust knows now.
func (t *Trust) Status() Status {
	s := Status{Peers: []PeerStatus{}}
	if m := t.roots.Load(); m != nil {
		for _, p := range *m {
			s.Peers = append(s.Peers, PeerStatus{Name: p.Name, TrustDomain: p.TrustDomain, Fingerprint: p.Fingerprint})
		}
	}
	slices.SortFunc(s.Peers, func(a, b PeerStatus) int { return strings.Compare(a.Name, b.Name) })
	t.mu.Lock()
	s.Inbound = slices.Clone(t.consumers)
	t.mu.Unlock()
	return s
}

// forbidden reports an agent's 403 answer.
func forbidden(err error) bool {
	var se api.StatusError
	if errors.As(err, &se) {
		return se.Code == http.StatusForbidden
	}
	return strings.Contains(err.Error(), "Unexpected response code: 403")
}

// denied handles a 403: logged once per run of them, then the watch is
// retried after ForbiddenRetry without counting as a failure (a token
// without peering rights is a supported configuration).
func (t *Trust) denied(ctx context.Context, logged *bool, what string, err error) (uint64, error) {
	if !*logged {
		t.log.Warn("the token may not read "+what+"; cluster peering is off until it may", "error", err, "retry_in", t.opts.ForbiddenRetry)
		*logged = true
	}
	if !watch.Sleep(ctx, t.opts.ForbiddenRetry) {
		return 0, ctx.Err()
	}
	return 0, nil
}

func (t *Trust) watchExported(ctx context.Context) {
	logged := false
	what := "exported-services"
	watch.Loop(ctx, t.log, what, watch.Backoff{}, func(ctx context.Context, index uint64) (uint64, error) {
		q := &api.QueryOptions{WaitIndex: index, Partition: t.opts.Partition}
		svcs, meta, err := t.opts.Client.ExportedServices(q.WithContext(ctx))
		if err != nil {
			if forbidden(err) {
				return t.denied(ctx, &logged, what, err)
			}
			return 0, fmt.Errorf("watching %s: %w", what, err)
		}
		logged = false
		var peers []string
		for _, s := range svcs {
			if s.Service != t.opts.Service || !defaultish(s.Namespace) {
				continue
			}
			for _, p := range s.Consumers.Peers {
				peers = append(peers, strings.ToLower(p))
			}
		}
		slices.Sort(peers)
		peers = slices.Compact(peers)
		t.mu.Lock()
		changed := !t.haveCons || !slices.Equal(peers, t.consumers)
		t.consumers, t.haveCons = peers, true
		t.mu.Unlock()
		if changed {
			t.log.Info("service exported to peers", "service", t.opts.Service, "peers", peers)
		}
		if len(peers) > 0 {
			t.Want()
		}
		t.publishInbound()
		return meta.LastIndex, nil
	})
}

// defaultish: the namespace Consul CE reports, "" or "default".
func defaultish(ns string) bool { return ns == "" || ns == "default" }

// watchPeerings is a blocking watch of /v1/peerings (api.Peerings().List
// returns no QueryMeta, so the raw query keeps the index): every peering's
// roots, replaced when the peer rotates its CA.
func (t *Trust) watchPeerings(ctx context.Context) {
	logged := false
	what := "peerings"
	watch.Loop(ctx, t.log, what, watch.Backoff{}, func(ctx context.Context, index uint64) (uint64, error) {
		q := &api.QueryOptions{WaitIndex: index, Partition: t.opts.Partition}
		var list []*api.Peering
		meta, err := t.opts.Client.Raw().Query("/v1/peerings", &list, q.WithContext(ctx))
		if err != nil {
			if forbidden(err) {
				return t.denied(ctx, &logged, what, err)
			}
			return 0, fmt.Errorf("watching %s: %w", what, err)
		}
		logged = false
		old := t.roots.Load()
		m := make(map[string]*tlsutil.PeerRoots, len(list))
		for _, p := range list {
			if p == nil || len(p.PeerCAPems) == 0 || p.State == api.PeeringStateDeleting || p.State == api.PeeringStateTerminated {
				continue
			}
			name := strings.ToLower(p.Name)
			fallback := ""
			if _, rest, ok := strings.Cut(p.PeerServerName, ".peering."); ok {
				fallback = rest
			}
			r, err := tlsutil.NewPeerRoots(name, p.PeerCAPems, fallback)
			if err != nil {
				t.log.Warn("ignoring a peering whose roots cannot be used", "peer", p.Name, "error", err)
				continue
			}
			if old != nil {
				if prev := (*old)[name]; prev != nil && prev.Fingerprint == r.Fingerprint && prev.TrustDomain == r.TrustDomain {
					r = prev // same roots: keep the object, and the configs and caches built on it
				}
			}
			m[name] = r
		}
		if old == nil || !sameRoots(*old, m) {
			var names []string
			for n, r := range m {
				names = append(names, n+"="+r.TrustDomain)
			}
			slices.Sort(names)
			t.log.Info("peer roots", "peers", names)
			t.roots.Store(&m)
			t.mu.Lock()
			close(t.changed)
			t.changed = make(chan struct{})
			t.mu.Unlock()
		}
		t.publishInbound()
		return meta.LastIndex, nil
	})
}

func sameRoots(a, b map[string]*tlsutil.PeerRoots) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

// publishInbound hands Options.Inbound the roots of the peers Service is
// exported to, when that differs from what it last got.
func (t *Trust) publishInbound() {
	if t.opts.Inbound == nil || t.opts.Service == "" {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.haveCons {
		return
	}
	var in []*tlsutil.PeerRoots
	var key []string
	if m := t.roots.Load(); m != nil {
		for _, name := range t.consumers {
			if r := (*m)[name]; r != nil {
				in = append(in, r)
				key = append(key, name+"/"+r.TrustDomain+"/"+r.Fingerprint)
			}
		}
	}
	k := strings.Join(key, ",")
	if k == t.lastIn {
		return
	}
	t.lastIn = k
	t.log.Info("inbound peers trusted", "service", t.opts.Service, "peers", key)
	t.opts.Inbound(in)
}
