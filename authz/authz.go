package authz

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
	"golang.org/x/sync/singleflight"

	"github.com/straitproxy/strait/internal/watch"
	"github.com/straitproxy/strait/tlsutil"
)

// Defaults for Options.
const (
	defaultTTL              = time.Minute
	defaultAuthorizeTimeout = 5 * time.Second
)

// maxCachedDecisions bounds the per-source cache of one intention set. Every
// entry needs a certificate signed by the mesh CA, so reaching it means
// something odd; we then evict rather than grow.
const maxCachedDecisions = 4096

// Decision is the outcome of Authorize.
type Decision struct {
	Allow bool
	// Reason says why, e.g. "matched intention web => db (allow)",
	// "L7 intention web => db denies at L4", "default: <agent's reason>",
	// or "agent (<why it was asked>): <agent's reason>" when local
	// evaluation could not decide.
	Reason string
	// Default is true when no intention matched and the agent's default
	// policy decided.
	Default bool
}

// Options configures an Authorizer.
type Options struct {
	// Target is the destination service name: ours. Required.
	Target string
	// Namespace and Partition of Target; empty means "default" (or the
	// client's own setting). Leave both empty on Consul CE, which answers
	// 400 to any ns or partition parameter.
	Namespace string
	Partition string
	// Logger; nil means no logging.
	Logger hclog.Logger
	// DefaultTTL bounds how long an answer from the agent for one source is
	// reused; zero means one minute. Cached answers are also dropped
	// whenever the intention set changes.
	DefaultTTL time.Duration
	// AuthorizeTimeout bounds one authorize call to the agent when it can
	// be bounded (see AgentConfig); zero means 5s. The first caller's
	// deadline applies too when it is sooner.
	AuthorizeTimeout time.Duration
	// AgentConfig, if set, is the configuration the client was created
	// from. The authorize fallback is then a POST built here with a
	// context, carrying Namespace and Partition. When nil, Authorize uses
	// client.Agent().ConnectAuthorize, which takes neither a context nor a
	// namespace or partition (the client's own apply): the caller's wait is
	// still bounded by its ctx, but the request runs to completion.
	AgentConfig *api.Config
	// Backoff paces retries of the intentions watch; the zero value is
	// watch's default.
	Backoff watch.Backoff
}

// Authorizer decides inbound connections for one destination service. Its
// methods are safe for concurrent use.
type Authorizer struct {
	client *api.Client
	opts   Options
	log    hclog.Logger
	call   func(context.Context, *api.AgentAuthorizeParams) (*api.AgentAuthorize, error)
	now    func() time.Time // replaced in tests

	state     atomic.Pointer[state]
	gen       atomic.Uint64
	flights   singleflight.Group
	ready     chan struct{}
	readyOnce sync.Once

	changedMu sync.Mutex
	changed   chan struct{} // closed and replaced by notify
}

// state is one intention set. Its rules are immutable; its cache of agent
// answers belongs to it, so replacing the state invalidates the cache and a
// lookup that finishes late only writes into a state nobody reads.
type state struct {
	gen       uint64
	loaded    bool
	index     uint64
	updatedAt time.Time
	rules     []rule

	mu     sync.RWMutex
	cached map[tlsutil.Identity]cachedDecision
}

type cachedDecision struct {
	Decision
	expires time.Time
}

// New returns an Authorizer for opts.Target. It does nothing until Run is
// called, but Authorize already works by asking the agent.
func New(client *api.Client, opts Options) *Authorizer {
	if opts.Logger == nil {
		opts.Logger = hclog.NewNullLogger()
	}
	if opts.DefaultTTL <= 0 {
		opts.DefaultTTL = defaultTTL
	}
	if opts.AuthorizeTimeout <= 0 {
		opts.AuthorizeTimeout = defaultAuthorizeTimeout
	}
	a := &Authorizer{
		client:  client,
		opts:    opts,
		log:     opts.Logger.Named("authz"),
		now:     time.Now,
		ready:   make(chan struct{}),
		changed: make(chan struct{}),
	}
	a.call = a.connectAuthorize
	if opts.AgentConfig != nil {
		d, err := newDirectAgent(client, opts.AgentConfig, opts.Namespace, opts.Partition)
		if err != nil {
			a.log.Warn("cannot use AgentConfig; authorize calls will not be cancellable", "error", err)
		} else {
			a.call = d.authorize
		}
	}
	a.state.Store(&state{cached: map[tlsutil.Identity]cachedDecision{}})
	return a
}

// Ready is closed once the first intention set has been loaded.
func (a *Authorizer) Ready() <-chan struct{} { return a.ready }

// Changed returns a channel that is closed at the next change that can
// turn an allowed source into a denied one: a new intention set, or an
// answer from the agent for a source that differs from the one cached
// before. Callers re-check what they admitted (open connections) and call
// Changed again for the next change.
func (a *Authorizer) Changed() <-chan struct{} {
	a.changedMu.Lock()
	defer a.changedMu.Unlock()
	return a.changed
}

func (a *Authorizer) notify() {
	a.changedMu.Lock()
	close(a.changed)
	a.changed = make(chan struct{})
	a.changedMu.Unlock()
}

// DefaultTTL is how long an agent answer is reused (Options.DefaultTTL
// with its default applied): re-checking open connections this often
// also catches a change of the agent's default policy.
func (a *Authorizer) DefaultTTL() time.Duration { return a.opts.DefaultTTL }

// Run watches the intentions whose destination is Target with a blocking
// query until ctx is done. When the agent is unreachable or fails, the last
// good set stays in use and the query is retried with backoff. Call Run once.
func (a *Authorizer) Run(ctx context.Context) {
	watch.Loop(ctx, a.log, "intentions for "+a.opts.Target, a.opts.Backoff, a.fetch)
}

func (a *Authorizer) fetch(ctx context.Context, index uint64) (uint64, error) {
	q := &api.QueryOptions{
		WaitIndex: index,
		Namespace: a.opts.Namespace,
		Partition: a.opts.Partition,
		UseCache:  true, // served from the agent's cache, kept fresh in the background
	}
	m, meta, err := a.client.Connect().IntentionMatch(&api.IntentionMatch{
		By:    api.IntentionMatchDestination,
		Names: []string{a.opts.Target},
	}, q.WithContext(ctx))
	if err != nil {
		return 0, fmt.Errorf("authz: watch intentions for %q: %w", a.opts.Target, err)
	}
	// A non-blocking read (index 0: first load, or a resync after an
	// error, when the agent may have restarted with lower indexes) always
	// installs, even if its index happens to equal the one we hold.
	a.install(meta.LastIndex, m[a.opts.Target], index == 0)
	return meta.LastIndex, nil
}

// install replaces the state unless index is the one already loaded.
func (a *Authorizer) install(index uint64, ixns []*api.Intention, force bool) {
	if cur := a.state.Load(); !force && cur.loaded && cur.index == index {
		return
	}
	st := &state{
		gen:       a.gen.Add(1),
		loaded:    true,
		index:     index,
		updatedAt: a.now(),
		rules:     compile(a.opts.Target, ixns),
		cached:    map[tlsutil.Identity]cachedDecision{},
	}
	a.state.Store(st)
	a.log.Info("intentions loaded", "target", a.opts.Target, "index", index, "intentions", len(st.rules))
	a.readyOnce.Do(func() { close(a.ready) })
	a.notify()
}

// Authorize decides whether src may connect to Target. When an intention
// matches, or the agent's answer for src is cached, it makes no HTTP call
// and allocates nothing. Otherwise it asks the agent (at most one call per
// source at a time), bounded by ctx, and caches the answer. An error means
// no decision could be made; the caller should deny.
func (a *Authorizer) Authorize(ctx context.Context, src tlsutil.Identity, serial string) (Decision, error) {
	if src.Kind != tlsutil.KindService {
		return nonServiceDecision(src.Kind), nil
	}
	st := a.state.Load()
	v := noMatch
	if st.loaded {
		var i int
		i, v = match(st.rules, src)
		if v == matched {
			return st.rules[i].decision, nil
		}
	}
	if d, ok := st.lookup(src, a.now()); ok {
		return d, nil
	}
	if src.Peer != "" {
		if v == undecidable {
			// Sameness groups may hold peers, but the agent's authorize
			// knows nothing of peers: fail closed.
			return Decision{Reason: "a sameness-group intention may apply to a source in peer " + src.Peer + "; strait cannot evaluate it"}, nil
		}
		// No intention names this peer source: the default decides. The
		// agent's authorize ignores trust domains and peers, so it is
		// asked about a probe in a namespace no intention of Consul CE
		// names; its answer is the default unless a wildcard-namespace
		// intention matched the probe.
		probe := src
		probe.Peer, probe.Namespace = "", peerProbeNamespace
		return a.ask(ctx, st, src, probe.String(), serial, v)
	}
	return a.ask(ctx, st, src, src.String(), serial, v)
}

// peerProbeNamespace is the namespace of the identity the agent is asked
// about to learn the default decision for a source in a cluster peer.
const peerProbeNamespace = "strait-peer-default-probe"

// ask gets the agent's decision for src and caches it in st. Concurrent
// callers for the same source and state share one call; each waits only as
// long as its own ctx allows.
func (a *Authorizer) ask(ctx context.Context, st *state, src tlsutil.Identity, uri, serial string, v verdict) (Decision, error) {
	if ctx.Err() != nil {
		return Decision{}, fmt.Errorf("authz: agent authorize %s => %s: %w", uri, a.opts.Target, context.Cause(ctx))
	}
	// The call must outlive a cancelled first caller (others may be
	// waiting on it) but not the first caller's deadline or our timeout.
	deadline := time.Now().Add(a.opts.AuthorizeTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	callCtx := context.WithoutCancel(ctx)
	ch := a.flights.DoChan(strconv.FormatUint(st.gen, 10)+" "+src.Peer+" "+src.String(), func() (any, error) {
		// A call that completed between our cache miss and joining the
		// flight has already stored its answer.
		if d, ok := st.lookup(src, a.now()); ok {
			return d, nil
		}
		cctx, cancel := context.WithDeadline(callCtx, deadline)
		defer cancel()
		res, err := a.call(cctx, &api.AgentAuthorizeParams{
			Target:           a.opts.Target,
			ClientCertURI:    uri,
			ClientCertSerial: serial,
		})
		if err != nil {
			// Agent unreachable: an expired answer for this source is
			// still the best knowledge we have, as cached intentions are.
			if d, ok := st.lookupStale(src); ok {
				a.log.Debug("agent authorize failed; using the last answer", "source", uri, "error", err)
				d.Reason += " (stale: agent unreachable)"
				return d, nil
			}
			return Decision{}, fmt.Errorf("authz: agent authorize %s => %s: %w", uri, a.opts.Target, err)
		}
		d := agentDecision(res, v, st.loaded)
		if src.Peer != "" && !d.Default {
			d = Decision{Reason: "default for sources in peer " + src.Peer + " unknown (the agent matched an intention to the probe: " + res.Reason + "); denied"}
		}
		prev, had := st.lookupStale(src)
		st.store(src, d, a.now(), a.opts.DefaultTTL)
		if had && prev.Allow != d.Allow {
			a.notify()
		}
		a.log.Debug("agent authorize", "source", uri, "target", a.opts.Target, "allow", d.Allow, "reason", res.Reason)
		return d, nil
	})
	select {
	case <-ctx.Done():
		return Decision{}, fmt.Errorf("authz: agent authorize %s => %s: %w", uri, a.opts.Target, context.Cause(ctx))
	case r := <-ch:
		if r.Err != nil {
			return Decision{}, r.Err
		}
		return r.Val.(Decision), nil
	}
}

// agentDecision turns the agent's answer into a Decision; v is what local
// evaluation found.
func agentDecision(res *api.AgentAuthorize, v verdict, loaded bool) Decision {
	d := Decision{Allow: res.Authorized}
	switch {
	case v == undecidable:
		d.Reason = "agent (sameness-group intention): " + res.Reason
	case !loaded:
		d.Reason = "agent (intentions not loaded yet): " + res.Reason
	case strings.HasPrefix(res.Reason, "Matched "):
		// The agent's cache is ahead of our copy; the watch will catch up.
		d.Reason = "agent (intention not yet seen locally): " + res.Reason
	default:
		d.Default = true
		d.Reason = "default: " + res.Reason
	}
	return d
}

func (st *state) lookup(src tlsutil.Identity, now time.Time) (Decision, bool) {
	st.mu.RLock()
	c, ok := st.cached[src]
	st.mu.RUnlock()
	if !ok || !now.Before(c.expires) {
		return Decision{}, false
	}
	return c.Decision, true
}

// lookupStale returns src's cached answer even if it has expired.
func (st *state) lookupStale(src tlsutil.Identity) (Decision, bool) {
	st.mu.RLock()
	c, ok := st.cached[src]
	st.mu.RUnlock()
	return c.Decision, ok
}

func (st *state) store(src tlsutil.Identity, d Decision, now time.Time, ttl time.Duration) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if _, ok := st.cached[src]; !ok && len(st.cached) >= maxCachedDecisions {
		for k, c := range st.cached {
			if !now.Before(c.expires) {
				delete(st.cached, k)
			}
		}
		for k := range st.cached {
			if len(st.cached) < maxCachedDecisions {
				break
			}
			delete(st.cached, k)
		}
	}
	st.cached[src] = cachedDecision{Decision: d, expires: now.Add(ttl)}
}

// Snapshot is the Authorizer's state, for an admin endpoint.
type Snapshot struct {
	Target    string    `json:"target"`
	Namespace string    `json:"namespace,omitempty"`
	Partition string    `json:"partition,omitempty"`
	Loaded    bool      `json:"loaded"`
	Index     uint64    `json:"index"`
	UpdatedAt time.Time `json:"updated_at,omitzero"`
	// Intentions in evaluation order.
	Intentions []IntentionInfo `json:"intentions"`
	// Cached are the agent's answers in use, sorted by source.
	Cached []CachedDecision `json:"cached"`
}

// IntentionInfo is one cached intention.
type IntentionInfo struct {
	ID                   string `json:"id,omitempty"`
	Precedence           int    `json:"precedence"`
	SourcePeer           string `json:"source_peer,omitempty"`
	SourceSamenessGroup  string `json:"source_sameness_group,omitempty"`
	SourcePartition      string `json:"source_partition,omitempty"`
	SourceNamespace      string `json:"source_namespace,omitempty"`
	SourceName           string `json:"source_name"`
	DestinationPartition string `json:"destination_partition,omitempty"`
	DestinationNamespace string `json:"destination_namespace,omitempty"`
	DestinationName      string `json:"destination_name"`
	Action               string `json:"action,omitempty"`
	L7                   bool   `json:"l7,omitempty"`
	// Decision is what a local source matching this intention gets.
	Allow  bool   `json:"allow"`
	Reason string `json:"reason"`
	// Ignored says why the intention never matches a local source.
	Ignored string `json:"ignored,omitempty"`
}

// CachedDecision is an answer from the agent cached for one source.
type CachedDecision struct {
	Source  string    `json:"source"`
	Allow   bool      `json:"allow"`
	Default bool      `json:"default"`
	Reason  string    `json:"reason"`
	Expires time.Time `json:"expires"`
}

// Snapshot returns a copy of the current intentions and cached answers,
// expired ones excluded.
func (a *Authorizer) Snapshot() Snapshot {
	st := a.state.Load()
	s := Snapshot{
		Target:     a.opts.Target,
		Namespace:  a.opts.Namespace,
		Partition:  a.opts.Partition,
		Loaded:     st.loaded,
		Index:      st.index,
		UpdatedAt:  st.updatedAt,
		Intentions: make([]IntentionInfo, 0, len(st.rules)),
		Cached:     []CachedDecision{},
	}
	for i := range st.rules {
		r := &st.rules[i]
		s.Intentions = append(s.Intentions, IntentionInfo{
			ID:                   r.ixn.ID,
			Precedence:           precedence(r.ixn),
			SourcePeer:           r.ixn.SourcePeer,
			SourceSamenessGroup:  r.ixn.SourceSamenessGroup,
			SourcePartition:      r.ixn.SourcePartition,
			SourceNamespace:      r.ixn.SourceNS,
			SourceName:           r.ixn.SourceName,
			DestinationPartition: r.ixn.DestinationPartition,
			DestinationNamespace: r.ixn.DestinationNS,
			DestinationName:      r.ixn.DestinationName,
			Action:               string(r.ixn.Action),
			L7:                   len(r.ixn.Permissions) > 0,
			Allow:                r.decision.Allow,
			Reason:               r.decision.Reason,
			Ignored:              r.ignored,
		})
	}
	now := a.now()
	st.mu.RLock()
	for id, c := range st.cached {
		if now.Before(c.expires) {
			s.Cached = append(s.Cached, CachedDecision{
				Source: id.String(), Allow: c.Allow, Default: c.Default, Reason: c.Reason, Expires: c.expires,
			})
		}
	}
	st.mu.RUnlock()
	slices.SortFunc(s.Cached, func(x, y CachedDecision) int { return strings.Compare(x.Source, y.Source) })
	return s
}
