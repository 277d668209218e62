package proxy

import (
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/straitproxy/strait/authz"
	"github.com/straitproxy/strait/config"
	"github.com/straitproxy/strait/internal/watch"
	"github.com/straitproxy/strait/metrics"
	"github.com/straitproxy/strait/upstream"
)

// phase is where a Proxy is on its way to serving.
type phase int32

const (
	phaseWaitingConfig phase = iota
	phaseWaitingCerts
	phaseWaitingIntentions
	phaseBinding
	phaseReady
	phaseFailed
	phaseStopping
)

func (ph phase) String() string {
	switch ph {
	case phaseWaitingConfig:
		return "waiting for configuration"
	case phaseWaitingCerts:
		return "waiting for certificates"
	case phaseWaitingIntentions:
		return "waiting for intentions"
	case phaseBinding:
		return "binding listeners"
	case phaseReady:
		return "ready"
	case phaseFailed:
		return "failed"
	}
	return "shutting down"
}

// Readiness is the answer of the admin listener's /ready.
type Readiness struct {
	// Ready is true once certificates, intentions (with a public
	// listener) and every listener are up, until shutdown starts or the
	// leaf expires. It stays true while the agent is unreachable: strait
	// keeps serving from its cached state, and Degraded says so.
	Ready bool `json:"ready"`
	// Reason says what is missing when not ready.
	Reason string `json:"reason,omitempty"`
	// Degraded lists what is wrong without stopping traffic: watches
	// failing (agent unreachable), a leaf late in life that the agent has
	// not renewed, configuration that could not be fully applied.
	Degraded []string `json:"degraded,omitempty"`
}

// Readiness reports whether the proxy serves, and what is degraded.
func (p *Proxy) Readiness() Readiness {
	ph := phase(p.phase.Load())
	r := Readiness{Degraded: p.degraded()}
	switch ph {
	case phaseReady:
		r.Ready = true
		if b := p.source().Bundle(); b != nil && time.Now().After(b.NotAfter) {
			r.Ready, r.Reason = false, fmt.Sprintf("leaf certificate expired at %s and the agent has no newer one", b.NotAfter.UTC().Format(time.RFC3339))
		}
	case phaseFailed:
		r.Reason = "failed"
		if e := p.failure.Load(); e != nil {
			r.Reason += ": " + *e
		}
	default:
		r.Reason = ph.String()
	}
	return r
}

func (p *Proxy) setPhase(ph phase) { p.phase.Store(int32(ph)) }

func (p *Proxy) fail(err error) {
	s := err.Error()
	p.failure.Store(&s)
	p.setPhase(phaseFailed)
}

func (p *Proxy) degraded() []string {
	var out []string
	out = append(out, p.watches.failing()...)
	if src := p.source(); src != nil {
		if b := src.Bundle(); b != nil {
			life := b.NotAfter.Sub(b.NotBefore)
			left := time.Until(b.NotAfter)
			if left > 0 && left < life/10 {
				out = append(out, fmt.Sprintf("leaf certificate expires in %s and the agent has not renewed it", left.Round(time.Second)))
			}
		}
	}
	p.mu.Lock()
	if p.telemetryErr != nil {
		out = append(out, "telemetry block ignored: "+p.telemetryErr.Error())
	}
	if p.applyErr != nil {
		out = append(out, "configuration not fully applied: "+p.applyErr.Error())
	}
	p.mu.Unlock()
	return out
}

// watchTracker is the watch.Observer of every watch the proxy runs: it
// counts errors (watch.errors) and remembers which watches are failing, for
// /ready's degraded list.
type watchTracker struct {
	m  *metrics.Metrics
	mu sync.Mutex
	w  map[string]*watchState
}

type watchState struct {
	err      error
	since    time.Time // first failure of the current run of failures
	failures int
}

func newWatchTracker(m *metrics.Metrics) *watchTracker {
	return &watchTracker{m: m, w: map[string]*watchState{}}
}

// WatchResult implements watch.Observer.
func (t *watchTracker) WatchResult(what string, err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	switch {
	case errors.Is(err, watch.ErrStopped):
		delete(t.w, what)
		return
	case err == nil:
		if st := t.w[what]; st != nil {
			st.err, st.failures = nil, 0
		} else {
			t.w[what] = &watchState{}
		}
		return
	}
	t.m.IncrCounter(metrics.WatchErrors, 1, []metrics.Label{{Name: "watch", Value: what}})
	st := t.w[what]
	if st == nil {
		st = &watchState{}
		t.w[what] = st
	}
	if st.err == nil {
		st.since = time.Now()
	}
	st.err = err
	st.failures++
}

// failing describes the watches whose last query failed, sorted.
func (t *watchTracker) failing() []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []string
	for what, st := range t.w {
		if st.err == nil {
			continue
		}
		kind := "agent error"
		if unreachable(st.err) {
			kind = "agent unreachable"
		}
		out = append(out, fmt.Sprintf("%s: %s: %v (failing since %s, %d failures)",
			kind, what, st.err, st.since.UTC().Format(time.RFC3339), st.failures))
	}
	slices.Sort(out)
	return out
}

// unreachable reports network-level failures to reach the agent, as
// opposed to answers from it.
func unreachable(err error) bool {
	var ne net.Error // *url.Error (the HTTP client's transport failures), *net.OpError, timeouts
	return errors.As(err, &ne)
}

// WatchObserver is the observer to run configuration watches under
// (watch.WithObserver), so that their failures show on /ready and in
// watch.errors too.
func (p *Proxy) WatchObserver() watch.Observer { return p.watches }

// ListenerStats is one listener's counters for /stats.
type ListenerStats struct {
	Name string `json:"name"`
	Kind string `json:"kind"` // inbound or upstream
	Addr string `json:"addr"`
	// Draining is true for a listener removed by reconfiguration whose
	// connections may still finish.
	Draining bool `json:"draining,omitempty"`
	// Active counts accepted connections not finished yet, handshakes
	// included; Proxied counts connections ever handed to the copy loop.
	Active   int   `json:"active"`
	Accepted int64 `json:"accepted"`
	Proxied  int64 `json:"proxied"`
	// Refused counts accepted connections closed at once by a limit
	// (max_inbound_connections, max_handshakes).
	Refused int64 `json:"refused"`
	// RxBytes and TxBytes are bytes from and to the accepted side, as
	// reported at close and by the shared flush.
	RxBytes int64 `json:"rx_bytes"`
	TxBytes int64 `json:"tx_bytes"`
}

// Listeners reports every listener, draining ones included, by name.
func (p *Proxy) Listeners() []ListenerStats {
	p.mu.Lock()
	out := make([]ListenerStats, 0, len(p.listeners))
	for l := range p.listeners {
		out = append(out, ListenerStats{
			Name: l.name, Kind: l.kind, Addr: l.addr, Draining: l.draining.Load(),
			Active: l.Active(), Accepted: l.accepted.Load(), Proxied: l.proxied.Load(), Refused: l.refused.Load(),
			RxBytes: l.rx.Load(), TxBytes: l.tx.Load(),
		})
	}
	p.mu.Unlock()
	slices.SortFunc(out, func(a, b ListenerStats) int {
		return strings.Compare(a.Kind+a.Name+a.Addr, b.Kind+b.Name+b.Addr)
	})
	return out
}

// CertInfo describes the leaf and roots in use.
type CertInfo struct {
	Service          string    `json:"service"`
	SPIFFEID         string    `json:"spiffe_id"`
	Serial           string    `json:"serial"`
	NotBefore        time.Time `json:"not_before"`
	NotAfter         time.Time `json:"not_after"`
	ExpiresInSeconds int64     `json:"expires_in_seconds"`
	TrustDomain      string    `json:"trust_domain"`
	RootIDs          []string  `json:"root_ids"`
}

// Certs returns the certificate material in use, or false before it is
// loaded.
func (p *Proxy) Certs() (CertInfo, bool) {
	src := p.source()
	if src == nil {
		return CertInfo{}, false
	}
	b := src.Bundle()
	if b == nil {
		return CertInfo{}, false
	}
	return CertInfo{
		Service: p.service, SPIFFEID: b.Identity.String(), Serial: b.LeafSerial,
		NotBefore: b.NotBefore, NotAfter: b.NotAfter, ExpiresInSeconds: int64(time.Until(b.NotAfter).Seconds()),
		TrustDomain: b.TrustDomain, RootIDs: slices.Clone(b.RootIDs),
	}, true
}

// UpstreamDestination is where an upstream leads, as the admin
// listener's /upstreams and /config show it.
type UpstreamDestination struct {
	DestinationType      string `json:"destination_type"`
	DestinationName      string `json:"destination_name"`
	DestinationNamespace string `json:"destination_namespace,omitempty"`
	DestinationPartition string `json:"destination_partition,omitempty"`
	Datacenter           string `json:"datacenter,omitempty"`
}

// DestinationOf returns u's destination, its type defaulted.
func DestinationOf(u config.Upstream) UpstreamDestination {
	return UpstreamDestination{
		DestinationType: u.Type(), DestinationName: u.DestinationName,
		DestinationNamespace: u.DestinationNamespace, DestinationPartition: u.DestinationPartition,
		Datacenter: u.Datacenter,
	}
}

// UpstreamStatus is one upstream listener with its endpoints.
type UpstreamStatus struct {
	Name string `json:"name"`
	UpstreamDestination
	Listen           string         `json:"listen"`
	Discovered       bool           `json:"discovered"` // the first answer from Consul arrived
	Active           int            `json:"active_connections"`
	HealthyEndpoints int            `json:"healthy_endpoints"`
	Endpoints        []EndpointInfo `json:"endpoints"`
	// Chain is a service upstream's discovery chain: its legs, targets,
	// the active target of each leg and every target's endpoints (nil for
	// a prepared query, and until the chain is known).
	Chain *upstream.ChainStatus `json:"chain,omitempty"`
}

// EndpointInfo is one endpoint and its balancing state.
type EndpointInfo struct {
	Addr                string     `json:"addr"`
	Node                string     `json:"node,omitempty"`
	Service             string     `json:"service"`
	Namespace           string     `json:"namespace,omitempty"`
	Partition           string     `json:"partition,omitempty"`
	Datacenter          string     `json:"datacenter,omitempty"`
	Target              string     `json:"target,omitempty"`
	Gateway             string     `json:"gateway,omitempty"`
	Weight              int        `json:"weight,omitempty"`
	Active              int64      `json:"active_connections"`
	ConsecutiveFailures int64      `json:"consecutive_failures"`
	TotalFailures       uint64     `json:"total_failures"`
	LastError           string     `json:"last_error,omitempty"`
	LastFailure         *time.Time `json:"last_failure,omitempty"`
	// EjectedUntil is set while dial failures make balancing skip it.
	EjectedUntil *time.Time `json:"ejected_until,omitempty"`
}

// Upstreams reports the upstream listeners in service, sorted by name.
func (p *Proxy) Upstreams() []UpstreamStatus {
	p.mu.Lock()
	uls := make([]*listener, 0, len(p.upstreams))
	for _, ul := range p.upstreams {
		uls = append(uls, ul)
	}
	p.mu.Unlock()
	out := make([]UpstreamStatus, 0, len(uls))
	for _, ul := range uls {
		u := ul.upCfg
		st := UpstreamStatus{
			Name: u.String(), UpstreamDestination: DestinationOf(u), Listen: ul.Addr().String(), Active: ul.Active(),
			Endpoints: []EndpointInfo{},
		}
		select {
		case <-ul.up.Ready():
			st.Discovered = true
		default:
		}
		for _, e := range ul.up.Endpoints() {
			ei := EndpointInfo{
				Addr: e.Addr, Node: e.Node, Service: e.Service, Namespace: e.Namespace, Partition: e.Partition,
				Datacenter: e.Datacenter, Target: e.Target, Gateway: e.Gateway, Weight: e.Weight,
				Active: e.Active, ConsecutiveFailures: e.ConsecutiveFailures,
				TotalFailures: e.TotalFailures, LastError: e.LastError,
			}
			if !e.LastFailure.IsZero() {
				t := e.LastFailure
				ei.LastFailure = &t
			}
			if !e.EjectedUntil.IsZero() {
				t := e.EjectedUntil
				ei.EjectedUntil = &t
			}
			st.Endpoints = append(st.Endpoints, ei)
		}
		st.HealthyEndpoints = len(st.Endpoints)
		st.Chain = ul.up.Chain()
		out = append(out, st)
	}
	slices.SortFunc(out, func(a, b UpstreamStatus) int { return strings.Compare(a.Name+a.Listen, b.Name+b.Listen) })
	return out
}

// Intentions returns the cached intentions and default decisions, or false
// before the proxy has started.
func (p *Proxy) Intentions() (authz.Snapshot, bool) {
	p.mu.Lock()
	az := p.az
	p.mu.Unlock()
	if az == nil {
		return authz.Snapshot{}, false
	}
	return az.Snapshot(), true
}

// Config returns the configuration applied last, or nil before the first.
func (p *Proxy) Config() *config.Config { return p.cfg.Load() }

// Telemetry returns the metrics configuration in effect.
func (p *Proxy) Telemetry() metrics.Telemetry { return p.metrics.Telemetry() }
