package upstream

import (
	"cmp"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"

	"github.com/straitproxy/strait/config"
	"github.com/straitproxy/strait/tlsutil"
	"github.com/straitproxy/strait/tunnel"
)

// Defaults for Options.
const (
	DefaultQueryTTL    = 10 * time.Second
	DefaultMaxAttempts = 3
)

// ErrNoEndpoints is returned, wrapped, by Dial when there is no endpoint to
// try: none was discovered yet, or none is healthy.
var ErrNoEndpoints = errors.New("no healthy endpoints")

// TLS is what the dialer needs from the certificate source (implemented by
// *tlsutil.Source).
type TLS interface {
	// ClientConfig returns a tls.Config presenting our leaf and accepting
	// only a server whose SPIFFE ID equals expected, with ServerName set to
	// sni. It may be cached and shared, so it is never mutated here.
	ClientConfig(expected tlsutil.Identity, sni string, opts tlsutil.ClientOptions) *tls.Config
	// PeerClientConfig is ClientConfig for a service of a cluster peer:
	// the server must chain to the peer's roots and present one of the
	// SPIFFE IDs in accept.
	PeerClientConfig(p *tlsutil.PeerRoots, accept []string, sni string, opts tlsutil.ClientOptions) (*tls.Config, error)
	TrustDomain() string
	// Generation names the leaf and roots ClientConfig uses now; it
	// changes when either rotates. Tunnels are tagged with the generation
	// they were dialed under and drain when it changes, so that new
	// connections are not carried by a handshake made with retired
	// material (see tlsutil.Source.Generation).
	Generation() string
}

// PeerTrust supplies the CA roots of cluster peers (implemented by
// *peering.Trust).
type PeerTrust interface {
	// PeerRoots returns the named peer's roots, nil while unknown.
	PeerRoots(peer string) *tlsutil.PeerRoots
}

// Endpoint is one instance of the destination, as discovered in Consul, or
// a mesh gateway that leads to the destination.
type Endpoint struct {
	// Addr is the host:port dialed: the peer's public listener (its LAN
	// address in this datacenter, its WAN address in another), or a mesh
	// gateway's when Gateway is set.
	Addr string `json:"addr"`
	Node string `json:"node,omitempty"`
	// Service is the destination service the peer serves, which its leaf
	// certificate names: Proxy.DestinationServiceName for connect-proxy
	// entries, Service.Service for Connect-native ones. Through a gateway
	// it is still the final service: TLS runs end to end.
	Service    string `json:"service"`
	Namespace  string `json:"namespace"`  // "default" when Consul does not say
	Partition  string `json:"partition"`  // "default" when Consul does not say
	Datacenter string `json:"datacenter"` // the node's (a chain target's); else the upstream's or the local one

	// Target is the discovery chain target the endpoint belongs to (its
	// ID); empty for a prepared query.
	Target string `json:"target,omitempty"`
	// SNI is the server name to send; empty means Consul's service SNI
	// for Service, Namespace, Partition and Datacenter.
	SNI string `json:"sni,omitempty"`
	// Gateway is "local" or "remote" when Addr is a mesh gateway of this
	// or of the target's datacenter; empty for a direct dial.
	Gateway string `json:"gateway,omitempty"`
	// Weight is the instance's Weights.Passing (Weights.Warning while a
	// check warns), 1 to 128; 0 means 1.
	Weight int `json:"weight,omitempty"`
	// Peer is the cluster peer the service is imported from; Addr is then
	// the exporting cluster's mesh gateway (its WAN address), SNI the
	// instance's PeerMeta.SNI, and the server must chain to the peer's
	// roots and present one of PeerIDs (PeerMeta.SpiffeID, comma-joined:
	// the service's identity and its gateway's).
	Peer    string `json:"peer,omitempty"`
	PeerIDs string `json:"peer_spiffe_ids,omitempty"`
}

// weight returns Weight with its default.
func (e Endpoint) weight() int { return max(e.Weight, 1) }

func (e Endpoint) String() string {
	via := ""
	if e.Gateway != "" {
		via = " via " + e.Gateway + " gateway"
	}
	if e.Peer != "" {
		via = " in peer " + e.Peer + " via its mesh gateway"
	}
	if e.Node == "" {
		return e.Addr + " (" + e.Service + via + ")"
	}
	return e.Addr + " (" + e.Service + " on " + e.Node + via + ")"
}

// EndpointStatus is an endpoint with its balancing state, for admin output.
type EndpointStatus struct {
	Endpoint
	// Active counts connections dialed to the endpoint and not yet released,
	// including dials in progress.
	Active int64 `json:"active_connections"`
	// ConsecutiveFailures counts dial or handshake failures since the last
	// success; TotalFailures counts them since the endpoint was first seen.
	ConsecutiveFailures int64     `json:"consecutive_failures"`
	TotalFailures       uint64    `json:"total_failures"`
	LastError           string    `json:"last_error,omitempty"`
	LastFailure         time.Time `json:"last_failure,omitzero"`
	// EjectedUntil is when balancing stops skipping the endpoint; zero when
	// it is not skipped.
	EjectedUntil time.Time `json:"ejected_until,omitzero"`
}

// Options are the dependencies and tunables of an Upstream.
type Options struct {
	Client *api.Client // required
	TLS    TLS         // required
	// LocalDatacenter is the agent's datacenter: the expected datacenter
	// of endpoints when neither Consul's answer nor the upstream names one,
	// and what makes a chain target cross-datacenter (WAN addresses, mesh
	// gateways). Empty means Run asks the agent (/v1/agent/self).
	LocalDatacenter string
	Logger          hclog.Logger // nil means no logging
	// QueryTTL is how long a prepared query answer is used before it is
	// refreshed; zero or negative means DefaultQueryTTL.
	QueryTTL time.Duration
	// MaxAttempts bounds the endpoints tried by one Dial; zero or negative
	// means DefaultMaxAttempts.
	MaxAttempts int
	// NetDialer dials TCP; nil means a zero net.Dialer.
	NetDialer *net.Dialer
	// Tunnels, when set, carries connections to strait peers that select
	// tlsutil.ALPNMux as streams in pooled tunnels (DialConn). It may be
	// shared by upstreams.
	Tunnels *tunnel.Pool
	// Catalog, when set, runs the health and gateway watches of chain
	// targets, shared with other upstreams using it; nil means a Catalog
	// of the upstream's own, run by Run.
	Catalog *Catalog
	// OnAddresses, when set, is called (from Run's goroutine) each time
	// the upstream's Addresses change, and when it becomes Ready: a
	// transparent proxy's routing table is rebuilt then. It must not
	// block.
	OnAddresses func()
	// Peers supplies cluster peers' roots, for a DestinationPeer upstream
	// and chain targets in a peer; nil means such endpoints cannot be
	// dialed (their dials fail and say so).
	Peers PeerTrust
}

// Upstream discovers and dials the endpoints of one configured upstream.
// Run must be running for the endpoint set to be kept current; Dial,
// Endpoints and Ready are safe for concurrent use.
type Upstream struct {
	cfg         config.Upstream
	name        string // cfg.String(): the upstream in errors and logs
	client      *api.Client
	tls         TLS
	log         hclog.Logger
	dc          string // fallback datacenter of endpoints
	queryTTL    time.Duration
	maxAttempts int
	netDialer   *net.Dialer
	pool        *tunnel.Pool
	// epoch is the origin of the monotonic nanosecond clock that ejection
	// deadlines are stored in, so that wall-clock steps do not matter.
	epoch time.Time

	// set is a prepared query's endpoint set; snap a service upstream's
	// discovery chain with its targets' endpoint sets.
	set     atomic.Pointer[endpointSet]
	snap    atomic.Pointer[chainSnap]
	catalog *Catalog
	peers   PeerTrust
	localDC string // Options.LocalDatacenter, or the agent's
	// onAddresses is Options.OnAddresses.
	onAddresses func()
	ready       chan struct{}
	readyOnce   sync.Once

	// stats outlives endpoint sets, so that replacing the set neither
	// forgets active connections nor clears failure marks. Guarded by
	// statsMu, which also serializes the replacement of set.
	statsMu sync.Mutex
	stats   map[endpointKey]*endpointStats

	// Prepared queries only. fetchSem holds a token while an execute is in
	// flight, so there is at most one; kick is how a Dial that found a
	// stale answer asks Run for a refresh without waiting for it.
	fetchSem chan struct{}
	kick     chan struct{}
}

// New validates u and returns an Upstream for it. Nothing is fetched until
// Run (or, for a prepared query, the first Dial).
func New(u config.Upstream, opts Options) (*Upstream, error) {
	if err := u.Validate(); err != nil {
		return nil, err
	}
	if opts.Client == nil {
		return nil, fmt.Errorf("upstream %s: no Consul client", u)
	}
	if opts.TLS == nil {
		return nil, fmt.Errorf("upstream %s: no TLS source", u)
	}
	up := &Upstream{
		cfg:         u,
		name:        u.String(),
		client:      opts.Client,
		tls:         opts.TLS,
		pool:        opts.Tunnels,
		log:         opts.Logger,
		dc:          cmp.Or(u.Datacenter, opts.LocalDatacenter),
		localDC:     opts.LocalDatacenter,
		catalog:     opts.Catalog,
		onAddresses: opts.OnAddresses,
		peers:       opts.Peers,
		queryTTL:    opts.QueryTTL,
		maxAttempts: opts.MaxAttempts,
		netDialer:   opts.NetDialer,
		epoch:       time.Now(),
		ready:       make(chan struct{}),
		stats:       make(map[endpointKey]*endpointStats),
		fetchSem:    make(chan struct{}, 1),
		kick:        make(chan struct{}, 1),
	}
	if up.log == nil {
		up.log = hclog.NewNullLogger()
	}
	up.log = up.log.With("upstream", up.name)
	if up.queryTTL <= 0 {
		up.queryTTL = DefaultQueryTTL
	}
	if up.maxAttempts <= 0 {
		up.maxAttempts = DefaultMaxAttempts
	}
	if up.netDialer == nil {
		up.netDialer = &net.Dialer{}
	}
	return up, nil
}

// String names the upstream as config.Upstream.String does.
func (u *Upstream) String() string { return u.name }

// Ready is closed after the first successful endpoint fetch, even if it
// found no endpoint; for a service upstream, once its discovery chain is
// known and every target's first endpoint query has finished.
func (u *Upstream) Ready() <-chan struct{} { return u.ready }

// Endpoints reports the current endpoints with their balancing state: a
// prepared query's, sorted by address, or those of every target of a
// chain, by target and address.
func (u *Upstream) Endpoints() []EndpointStatus {
	if snap := u.snap.Load(); snap != nil {
		var out []EndpointStatus
		for _, t := range snap.targets {
			out = u.statusOf(out, t.set)
		}
		return out
	}
	return u.statusOf(nil, u.set.Load())
}

// statusOf appends the endpoints of set with their balancing state.
func (u *Upstream) statusOf(out []EndpointStatus, set *endpointSet) []EndpointStatus {
	if set == nil {
		return out
	}
	now := u.mono()
	for _, ep := range set.eps {
		st := ep.st
		s := EndpointStatus{
			Endpoint:            ep.Endpoint,
			Active:              st.active.Load(),
			ConsecutiveFailures: st.consecutive.Load(),
		}
		if until := st.ejectedUntil.Load(); until > now {
			s.EjectedUntil = u.epoch.Add(time.Duration(until))
		}
		st.mu.Lock()
		s.TotalFailures, s.LastError, s.LastFailure = st.total, st.lastErr, st.lastFailure
		st.mu.Unlock()
		out = append(out, s)
	}
	return out
}

// endpointSet is one discovery answer (a prepared query's, or one chain
// target's). Its endpoints are never mutated once stored; the balancers'
// state built from them lives here too, so that it is rebuilt only when
// the endpoints change.
type endpointSet struct {
	eps     []*endpoint // sorted by address, no duplicate keys
	fetched time.Time
	lb      lbState
}

type endpoint struct {
	Endpoint
	st *endpointStats
}

// endpointKey identifies an endpoint across discovery answers. One mesh
// gateway is as many endpoints as the targets it leads to.
type endpointKey struct{ addr, service, target string }

func keyOf(e Endpoint) endpointKey { return endpointKey{e.Addr, e.Service, e.Target} }

type endpointStats struct {
	active      atomic.Int64
	consecutive atomic.Int64
	// ejectedUntil is on the Upstream's monotonic clock (see mono); 0 means
	// not ejected.
	ejectedUntil atomic.Int64
	// peer is what handshakes taught us about the server (see peerKind).
	peer peerState

	mu          sync.Mutex
	total       uint64
	lastErr     string
	lastFailure time.Time
}

// mono is nanoseconds since u.epoch on the monotonic clock.
func (u *Upstream) mono() int64 { return int64(time.Since(u.epoch)) }

// sortEndpoints sorts eps by address and drops duplicate keys.
func sortEndpoints(eps []Endpoint) []Endpoint {
	slices.SortFunc(eps, func(a, b Endpoint) int {
		return cmp.Or(cmp.Compare(a.Addr, b.Addr), cmp.Compare(a.Service, b.Service), cmp.Compare(a.Target, b.Target))
	})
	return slices.CompactFunc(eps, func(a, b Endpoint) bool { return keyOf(a) == keyOf(b) })
}

// newSet makes a set of eps (sorted, deduplicated) with their stats.
// statsMu is held.
func (u *Upstream) newSet(eps []Endpoint) *endpointSet {
	set := &endpointSet{eps: make([]*endpoint, len(eps)), fetched: time.Now()}
	for i, e := range eps {
		k := keyOf(e)
		st := u.stats[k]
		if st == nil {
			st = new(endpointStats)
			u.stats[k] = st
		}
		set.eps[i] = &endpoint{Endpoint: e, st: st}
	}
	return set
}

// forgetStats drops the stats of endpoints in no live set, but only once
// their connections are gone: if one comes back meanwhile its count is
// still right. statsMu is held.
func (u *Upstream) forgetStats(live ...*endpointSet) {
	keep := map[endpointKey]struct{}{}
	for _, s := range live {
		if s == nil {
			continue
		}
		for _, e := range s.eps {
			keep[keyOf(e.Endpoint)] = struct{}{}
		}
	}
	for k, st := range u.stats {
		if _, ok := keep[k]; !ok && st.active.Load() == 0 {
			delete(u.stats, k)
		}
	}
}

// store makes eps the current endpoint set of a prepared query and
// returns it.
func (u *Upstream) store(eps []Endpoint) *endpointSet {
	eps = sortEndpoints(eps)
	u.statsMu.Lock()
	defer u.statsMu.Unlock()
	set := u.newSet(eps)
	u.forgetStats(set)
	old := u.set.Swap(set)

	if old == nil || !slices.EqualFunc(old.eps, set.eps, func(a, b *endpoint) bool { return a.Endpoint == b.Endpoint }) {
		if len(eps) == 0 {
			u.log.Warn("no healthy endpoints")
		} else {
			u.log.Info("endpoints updated", "count", len(eps))
		}
	}
	u.readyOnce.Do(func() { close(u.ready) })
	return set
}
