package tproxy

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"

	"github.com/straitproxy/strait/internal/watch"
)

// consulService is Consul's own catalog entry, never an upstream.
const consulService = "consul"

// typicalServices selects services of the typical kind (no proxies, no
// gateways) in /v1/catalog/services: the candidates of
// Internal.IntentionUpstreams (agent/consul/state/intention.go
// intentionTopologyTxn).
const typicalServices = `ServiceKind == ""`

// allowedUpstreams is Consul's IntentionUpstreams for self: the candidates
// that the intentions whose source matches self (ixns, in precedence
// order, as /v1/connect/intentions/match?by=source returns them) let self
// reach. The first intention whose destination matches a candidate
// decides (an L7 intention counts as allowing: its permissions cannot be
// evaluated without a request); without one, defaultAllow does. self and
// Consul's own service are never upstreams. The result is sorted.
func allowedUpstreams(self string, candidates []string, ixns []*api.Intention, defaultAllow bool) []string {
	var out []string
	for _, c := range candidates {
		if c == self || c == consulService {
			continue
		}
		allow := defaultAllow
		for _, ixn := range ixns {
			if !destinationMatches(ixn, c) {
				continue
			}
			allow = ixn.Action == api.IntentionActionAllow || len(ixn.Permissions) > 0
			break
		}
		if allow {
			out = append(out, c)
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// destinationMatches reports whether ixn's destination is candidate (in
// the default namespace and partition, the only ones Consul CE has).
func destinationMatches(ixn *api.Intention, candidate string) bool {
	if ixn.DestinationName != "*" && ixn.DestinationName != candidate {
		return false
	}
	switch ixn.DestinationNS {
	case "", "default", "*":
	default:
		return false
	}
	switch ixn.DestinationPartition {
	case "", "default":
		return true
	}
	return false
}

// Implicit follows the implicit upstreams of a transparent proxy's
// service: every service the intentions allow it to reach. It runs
// blocking watches of the typical services in the catalog and of the
// intentions whose source is the service, and asks the agent for the
// default decision (/v1/agent/connect/authorize for a destination no
// intention names) at start, after every change and every DefaultTTL;
// each time the answer changes it calls its callback with the sorted names.
type Implicit struct {
	client    *api.Client
	service   string
	namespace string
	partition string
	self      func() string // our SPIFFE ID; "" until known
	log       hclog.Logger
	ttl       time.Duration
	onChange  func([]string)

	mu           sync.Mutex
	candidates   []string
	haveServices bool
	ixns         []*api.Intention
	haveIxns     bool
	defaultAllow bool
	haveDefault  bool
	last         []string
	published    bool
	poke         chan struct{}
}

// ImplicitOptions configure an Implicit.
type ImplicitOptions struct {
	Client               *api.Client // required
	Service              string      // required
	Namespace, Partition string
	// Self returns the SPIFFE ID of the service's leaf certificate, ""
	// until it is known; the default decision is asked for it.
	Self func() string
	// DefaultTTL is how often the default decision is asked again
	// without a change; zero means a minute.
	DefaultTTL time.Duration
	// OnChange receives the implicit upstreams each time they change
	// (the first time once every watch has answered). It is called from
	// Run's goroutine and must not block for long.
	OnChange func([]string)
	Logger   hclog.Logger
}

// NewImplicit returns an Implicit; Run starts it.
func NewImplicit(o ImplicitOptions) *Implicit {
	if o.Logger == nil {
		o.Logger = hclog.NewNullLogger()
	}
	if o.DefaultTTL <= 0 {
		o.DefaultTTL = time.Minute
	}
	if o.Self == nil {
		o.Self = func() string { return "" }
	}
	return &Implicit{client: o.Client, service: o.Service, namespace: o.Namespace, partition: o.Partition,
		self: o.Self, log: o.Logger.Named("implicit-upstreams"), ttl: o.DefaultTTL, onChange: o.OnChange,
		poke: make(chan struct{}, 1)}
}

// Run watches until ctx is done.
func (m *Implicit) Run(ctx context.Context) {
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() { m.watchServices(ctx) })
	wg.Go(func() { m.watchIntentions(ctx) })
	t := time.NewTicker(m.ttl)
	defer t.Stop()
	retry := time.NewTimer(0)
	defer retry.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-m.poke:
		case <-t.C:
		case <-retry.C:
		}
		if err := m.askDefault(); err != nil {
			if ctx.Err() != nil {
				return
			}
			m.log.Warn("asking the agent for the default intention decision; retrying", "error", err)
			retry.Reset(2 * time.Second)
		}
		m.publish()
	}
}

func (m *Implicit) kick() {
	select {
	case m.poke <- struct{}{}:
	default:
	}
}

// probeService is a service name no intention should name: the default
// decision is asked with it.
const probeService = "strait-default-decision-probe"

// askDefault asks the agent how it decides a connection that no intention
// matches (Consul's default is one for the whole cluster). First from a
// made-up source to our own service, which our token may authorize (the
// agent wants service:write on the target); if an intention matched that
// (a wildcard source), then from us to a made-up destination: an
// intention matching that has a wildcard destination, which also matches
// every candidate, so the default would not matter.
func (m *Implicit) askDefault() error {
	uri := m.self()
	i := strings.LastIndex(uri, "/svc/")
	if uri == "" || i < 0 {
		return fmt.Errorf("leaf certificate not loaded yet")
	}
	probes := []*api.AgentAuthorizeParams{
		{Target: m.service, ClientCertURI: uri[:i] + "/svc/" + probeService, ClientCertSerial: "00"},
		{Target: probeService, ClientCertURI: uri, ClientCertSerial: "00"},
	}
	var errs []error
	for _, params := range probes {
		// The api client's ConnectAuthorize takes no context: the agent
		// answers from its cache at once.
		res, err := m.client.Agent().ConnectAuthorize(params)
		if err != nil {
			errs = append(errs, fmt.Errorf("default intention decision (%s to %s): %w", params.ClientCertURI, params.Target, err))
			continue
		}
		if strings.HasPrefix(res.Reason, "Matched ") && params.Target == m.service {
			continue // a wildcard intention decided: try the other way
		}
		m.mu.Lock()
		m.defaultAllow, m.haveDefault = res.Authorized, true
		m.mu.Unlock()
		m.log.Trace("default intention decision", "allow", res.Authorized, "reason", res.Reason)
		return nil
	}
	return errors.Join(errs...)
}

// publish computes the implicit upstreams once every input is known and
// hands them on when they changed.
func (m *Implicit) publish() {
	m.mu.Lock()
	if !m.haveServices || !m.haveIxns || !m.haveDefault {
		m.mu.Unlock()
		return
	}
	out := allowedUpstreams(m.service, m.candidates, m.ixns, m.defaultAllow)
	if m.published && slices.Equal(out, m.last) {
		m.mu.Unlock()
		return
	}
	prev := m.last
	m.last, m.published = out, true
	m.mu.Unlock()
	var added, removed []string
	for _, n := range out {
		if !slices.Contains(prev, n) {
			added = append(added, n)
		}
	}
	for _, n := range prev {
		if !slices.Contains(out, n) {
			removed = append(removed, n)
		}
	}
	m.log.Info("implicit upstreams changed", "count", len(out), "added", firstFew(added), "removed", firstFew(removed))
	if m.onChange != nil {
		m.onChange(out)
	}
}

func (m *Implicit) watchServices(ctx context.Context) {
	watch.Loop(ctx, m.log, "catalog/services?filter="+typicalServices, watch.Backoff{}, func(ctx context.Context, index uint64) (uint64, error) {
		q := &api.QueryOptions{Filter: typicalServices, WaitIndex: index}
		svcs, meta, err := m.client.Catalog().Services(q.WithContext(ctx))
		if err != nil {
			return 0, fmt.Errorf("implicit upstreams: listing services: %w", err)
		}
		names := make([]string, 0, len(svcs))
		for n := range svcs {
			names = append(names, n)
		}
		slices.Sort(names)
		m.mu.Lock()
		changed := !m.haveServices || !slices.Equal(names, m.candidates)
		m.candidates, m.haveServices = names, true
		m.mu.Unlock()
		if changed {
			m.kick()
		}
		return meta.LastIndex, nil
	})
}

func (m *Implicit) watchIntentions(ctx context.Context) {
	watch.Loop(ctx, m.log, "connect/intentions/match?by=source&name="+m.service, watch.Backoff{}, func(ctx context.Context, index uint64) (uint64, error) {
		q := &api.QueryOptions{WaitIndex: index, Namespace: m.namespace, Partition: m.partition}
		res, meta, err := m.client.Connect().IntentionMatch(&api.IntentionMatch{By: api.IntentionMatchSource, Names: []string{m.service}}, q.WithContext(ctx))
		if err != nil {
			return 0, fmt.Errorf("implicit upstreams: intentions by source %s: %w", m.service, err)
		}
		ixns := res[m.service]
		m.mu.Lock()
		m.ixns, m.haveIxns = ixns, true
		m.mu.Unlock()
		m.kick() // a change of intentions may come with a change of the default
		return meta.LastIndex, nil
	})
}

// firstFew keeps a log line short: at most 20 names, then how many more.
func firstFew(names []string) []string {
	if len(names) <= 20 {
		return names
	}
	return append(slices.Clip(names[:20]), fmt.Sprintf("(%d more)", len(names)-20))
}
