package upstream

import (
	"cmp"
	"context"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/straitproxy/strait/config"
	"github.com/straitproxy/strait/internal/watch"
)

// chainSnap is a compiled chain with the current endpoint set of each of
// its targets. It is replaced, never mutated, when the chain or an
// endpoint answer changes.
type chainSnap struct {
	plan    *plan
	legs    []legSnap
	cum     []float64     // cumulative leg weights, for pickLeg
	targets []*targetSnap // sorted by ID
	byID    map[string]*targetSnap
	ready   bool // every target's first answer is in
	// addrs are the addresses a transparent proxy routes to the chain.
	addrs Addresses
}

// Addresses are the destination IPs by which a transparent proxy's
// outbound listener recognises connections for an upstream, whatever
// their port (Consul's filter chain matches in agent/xds/listeners.go).
type Addresses struct {
	// Virtual are the chain's AutoVirtualIPs and ManualVirtualIPs and
	// the consul-virtual and virtual tagged addresses of its targets'
	// instances: a connection to one follows the chain like any other.
	Virtual []netip.Addr `json:"virtual,omitempty"`
	// Direct are the addresses of instances registered with
	// TransparentProxy.DialedDirectly: a connection to one goes to that
	// very address (DialOptions.Direct), over mTLS with its target's
	// identity.
	Direct []netip.Addr `json:"direct,omitempty"`
}

// Equal reports whether a and b list the same addresses.
func (a Addresses) Equal(b Addresses) bool {
	return slices.Equal(a.Virtual, b.Virtual) && slices.Equal(a.Direct, b.Direct)
}

// Addresses returns the addresses a transparent proxy routes to this
// upstream now; none for a prepared query or before the chain is known.
func (u *Upstream) Addresses() Addresses {
	if snap := u.snap.Load(); snap != nil {
		return snap.addrs
	}
	return Addresses{}
}

// addressesOf computes a snapshot's Addresses from its plan and the
// feeds' latest answers: every instance counts, healthy or not (the
// addresses name the service; health decides where a Dial goes).
func (u *Upstream) addressesOf(p *plan, f *feeds) Addresses {
	a := Addresses{Virtual: slices.Clone(p.vips)}
	for id, t := range p.targets {
		hf := f.health[id]
		if hf == nil || t.Peer != "" {
			continue
		}
		ins, _ := hf.instances()
		remote := t.Datacenter != "" && t.Datacenter != u.localDC
		for _, in := range ins {
			if in.service != t.Service {
				continue
			}
			a.Virtual = append(a.Virtual, in.virtual...)
			if in.dialedDirectly {
				hostport := in.lan
				if remote {
					hostport = in.wan
				}
				if ap, err := netip.ParseAddrPort(hostport); err == nil {
					a.Direct = append(a.Direct, ap.Addr().Unmap())
				}
			}
		}
	}
	for _, l := range []*[]netip.Addr{&a.Virtual, &a.Direct} {
		slices.SortFunc(*l, netip.Addr.Compare)
		*l = slices.Compact(*l)
		if len(*l) == 0 {
			*l = nil
		}
	}
	return a
}

type legSnap struct {
	weight float64
	res    *route
}

type targetSnap struct {
	Target
	set *endpointSet // nil before the first answer
	// unknown is why the target has no set yet, or why it cannot have
	// one (a peer target).
	unknown string
}

// route is what one Dial uses: a resolver's targets in failover order, its
// connect timeout and balancer.
type route struct {
	name    string
	timeout time.Duration
	lb      Balancer
	targets []*targetSnap
}

// pickLeg chooses a splitter leg by weight (one connection, one draw).
func (s *chainSnap) pickLeg() *route {
	if len(s.legs) == 1 {
		return s.legs[0].res
	}
	r := rand.Float64()
	for i, c := range s.cum {
		if r < c {
			return s.legs[i].res
		}
	}
	return s.legs[len(s.legs)-1].res
}

// hasLive reports whether set has an endpoint not ejected at now.
func hasLive(set *endpointSet, now int64) bool {
	if set == nil {
		return false
	}
	for _, e := range set.eps {
		if e.st.ejectedUntil.Load() <= now {
			return true
		}
	}
	return false
}

// active is the index of the target a new connection starts with: the
// first, in failover order, that has an endpoint not ejected; else the
// first that has endpoints at all; -1 when none has.
func (r *route) active(now int64) int {
	for i, t := range r.targets {
		if hasLive(t.set, now) {
			return i
		}
	}
	for i, t := range r.targets {
		if t.set != nil && len(t.set.eps) > 0 {
			return i
		}
	}
	return -1
}

// order is the targets one Dial tries: the active one, the failover
// targets after it that have endpoints, then those before it (all of
// whose endpoints are ejected) as a last resort.
func (r *route) order(now int64, buf []*targetSnap) []*targetSnap {
	a := r.active(now)
	if a < 0 {
		return buf[:0]
	}
	out := append(buf[:0], r.targets[a])
	for _, t := range r.targets[a+1:] {
		if t.set != nil && len(t.set.eps) > 0 {
			out = append(out, t)
		}
	}
	for _, t := range r.targets[:a] {
		if t.set != nil && len(t.set.eps) > 0 {
			out = append(out, t)
		}
	}
	return out
}

// runChain keeps the upstream's discovery chain and its targets' endpoints
// current until ctx is done: a blocking watch of the chain, and through the
// Catalog one watch per distinct target query and per datacenter whose
// mesh gateways a target needs.
func (u *Upstream) runChain(ctx context.Context) {
	cat := u.catalog
	if cat == nil {
		cat = NewCatalog(ctx, u.client, u.log)
		defer cat.Close()
	}
	if u.localDC == "" {
		u.localDC = u.agentDatacenter(ctx)
	}
	plans := make(chan *plan, 1)
	var wg sync.WaitGroup
	defer wg.Wait()
	if u.cfg.DestinationPeer != "" {
		// Consul follows no discovery chain for a peer upstream: its
		// one target is the imported service.
		plans <- peerPlan(u.cfg)
	} else {
		wg.Go(func() { u.watchChain(ctx, plans) })
	}

	kick := make(chan struct{}, 1)
	var cur *feeds
	defer func() { cur.release() }()
	var p *plan
	for {
		select {
		case <-ctx.Done():
			return
		case np := <-plans:
			next := u.acquireFeeds(cat, np, kick)
			cur.release() // after acquiring: feeds both use stay up
			cur, p = next, np
		case <-kick:
		}
		if p != nil {
			u.rebuild(p, cur)
		}
	}
}

// agentDatacenter asks the agent for its datacenter, once, when
// Options.LocalDatacenter was not given.
func (u *Upstream) agentDatacenter(ctx context.Context) string {
	for ctx.Err() == nil {
		var self struct{ Config struct{ Datacenter string } }
		q := (&api.QueryOptions{}).WithContext(ctx)
		_, err := u.client.Raw().Query("/v1/agent/self", &self, q)
		if err == nil {
			return self.Config.Datacenter
		}
		u.log.Warn("reading the agent's datacenter", "error", err)
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
	return ""
}

// feeds are the Catalog watches one plan uses.
type feeds struct {
	health   map[string]*feed // by target ID
	gateways map[string]*feed // by datacenter
	releases []func()
}

func (f *feeds) release() {
	if f == nil {
		return
	}
	for _, r := range f.releases {
		r()
	}
}

// gatewayDC is the datacenter whose mesh gateways t is dialed through, or
// "" for a direct dial.
func (u *Upstream) gatewayDC(t Target) string {
	if t.Datacenter == "" || t.Datacenter == u.localDC || t.Peer != "" {
		return ""
	}
	switch t.MeshGateway {
	case config.MeshGatewayLocal:
		return u.localDC
	case config.MeshGatewayRemote:
		return t.Datacenter
	}
	return ""
}

func (u *Upstream) acquireFeeds(cat *Catalog, p *plan, kick chan struct{}) *feeds {
	f := &feeds{health: map[string]*feed{}, gateways: map[string]*feed{}}
	for id, t := range p.targets {
		k := healthKey{service: t.Service, namespace: t.Namespace, partition: t.Partition, datacenter: t.Datacenter, filter: t.Filter}
		if t.Peer != "" {
			k = healthKey{service: t.Service, namespace: t.Namespace, partition: t.Partition, peer: t.Peer, filter: t.Filter}
			if u.peers != nil {
				u.peers.PeerRoots(t.Peer) // start following the peer's roots now, not at the first dial
			}
		}
		hf, rel := cat.healthFeed(k, kick)
		f.health[id] = hf
		f.releases = append(f.releases, rel)
		if dc := u.gatewayDC(t); dc != "" {
			if _, ok := f.gateways[dc]; !ok {
				gf, rel := cat.gatewayFeed(dc, kick)
				f.gateways[dc] = gf
				f.releases = append(f.releases, rel)
			}
		}
	}
	return f
}

// watchChain is the blocking watch of POST /v1/discovery-chain/<name> with
// the upstream's overrides. Each compiled chain is handed to out (a newer
// one replaces one not taken yet); one that cannot be used is logged and
// the previous one stays in force.
func (u *Upstream) watchChain(ctx context.Context, out chan *plan) {
	opts := &api.DiscoveryChainOptions{
		EvaluateInDatacenter:   u.cfg.Datacenter,
		OverrideProtocol:       u.cfg.Protocol,
		OverrideConnectTimeout: u.cfg.ConnectTimeout,
		OverrideMeshGateway:    api.MeshGatewayConfig{Mode: api.MeshGatewayMode(u.cfg.MeshGatewayMode)},
	}
	name := u.cfg.DestinationName
	var last *plan
	var lastChain *api.CompiledDiscoveryChain
	watch.Loop(ctx, u.log, "discovery-chain/"+name, watch.Backoff{}, func(ctx context.Context, index uint64) (uint64, error) {
		q := &api.QueryOptions{
			Namespace: u.cfg.DestinationNamespace, Partition: u.cfg.DestinationPartition,
			WaitIndex: index, UseCache: true,
		}
		chain, vips, meta, err := u.getChain(name, opts, q.WithContext(ctx))
		if err != nil {
			return 0, fmt.Errorf("upstream %s: discovery chain: %w", u.name, err)
		}
		if chain == nil {
			return meta.LastIndex, fmt.Errorf("upstream %s: empty discovery chain answer", u.name)
		}
		if last != nil && reflect.DeepEqual(chain, lastChain) && slices.Equal(vips, last.vips) {
			return meta.LastIndex, nil // the wait timed out, or another entry changed
		}
		lastChain = chain
		p, err := compile(chain)
		if err != nil {
			u.log.Error("ignoring a discovery chain that cannot be used; the previous one stays in force", "error", err)
			return meta.LastIndex, nil
		}
		p.vips = vips
		u.logPlan(p, last)
		last = p
		select {
		case <-out: // drop a plan not taken yet
		default:
		}
		out <- p
		return meta.LastIndex, nil
	})
}

// chainWithVIPs is a compiled chain with the virtual IPs that
// api.CompiledDiscoveryChain does not decode.
type chainWithVIPs struct {
	Chain *struct {
		api.CompiledDiscoveryChain
		AutoVirtualIPs   []string
		ManualVirtualIPs []string
	}
}

// getChain fetches the compiled chain. Without overrides and compiled in
// the local datacenter (every implicit upstream of a transparent proxy) it
// is a GET decoded here, so that the chain's AutoVirtualIPs and
// ManualVirtualIPs (the addresses a transparent proxy routes on) are kept;
// otherwise it takes the api client (a POST, or the compile-dc parameter,
// neither of which Raw can send), and the chain's virtual IPs are not
// known: Consul does not route an explicit upstream with a listener of its
// own by virtual IP either.
func (u *Upstream) getChain(name string, opts *api.DiscoveryChainOptions, q *api.QueryOptions) (*api.CompiledDiscoveryChain, []netip.Addr, *api.QueryMeta, error) {
	if opts.OverrideProtocol != "" || opts.OverrideConnectTimeout != 0 || opts.OverrideMeshGateway.Mode != "" || opts.EvaluateInDatacenter != "" {
		resp, meta, err := u.client.DiscoveryChain().Get(name, opts, q)
		if err != nil || resp == nil {
			return nil, nil, meta, err
		}
		return resp.Chain, nil, meta, nil
	}
	var out chainWithVIPs
	meta, err := u.client.Raw().Query("/v1/discovery-chain/"+name, &out, q)
	if err != nil || out.Chain == nil {
		return nil, nil, meta, err
	}
	var vips []netip.Addr
	for _, s := range append(slices.Clip(out.Chain.AutoVirtualIPs), out.Chain.ManualVirtualIPs...) {
		if ip, err := netip.ParseAddr(s); err == nil && !slices.Contains(vips, ip.Unmap()) {
			vips = append(vips, ip.Unmap())
		}
	}
	slices.SortFunc(vips, netip.Addr.Compare)
	return &out.Chain.CompiledDiscoveryChain, vips, meta, nil
}

// logPlan logs what changed in how the chain is followed, and, once per
// chain version that has them, what of it L4 cannot apply.
func (u *Upstream) logPlan(p, last *plan) {
	var legs []string
	for _, l := range p.legs {
		legs = append(legs, fmt.Sprintf("%s %.4g%% -> %s", l.res.name, l.weight*100, strings.Join(l.res.targets, ",")))
	}
	u.log.Info("discovery chain", "protocol", p.protocol, "legs", legs)
	if p.routerMatches > 0 && (last == nil || last.routerMatches != p.routerMatches) {
		u.log.Warn("the chain's router has routes whose matches need L7; strait uses only its default route",
			"ignored_routes", p.routerMatches)
	}
	if len(p.lbIgnored) > 0 && (last == nil || !slices.Equal(last.lbIgnored, p.lbIgnored)) {
		u.log.Warn("load balancer settings that L4 cannot apply are ignored", "ignored", p.lbIgnored)
	}
	for _, t := range p.targets {
		if t.Peer != "" && t.MeshGateway == config.MeshGatewayLocal && (last == nil || last.targets[t.ID].MeshGateway != t.MeshGateway) {
			u.log.Warn("mesh gateway mode local is not supported for cluster peer targets; dialing the peer's mesh gateways (remote)", "target", t.ID)
		}
	}
}

// peerPlan is the plan of an upstream with a DestinationPeer: one target,
// the service imported from the peer, with the upstream's connect timeout
// (Consul's 5s by default).
func peerPlan(c config.Upstream) *plan {
	ns, ap := cmp.Or(c.DestinationNamespace, "default"), cmp.Or(c.DestinationPartition, "default")
	timeout := cmp.Or(c.ConnectTimeout, DefaultChainConnectTimeout)
	t := Target{
		ID:      c.DestinationName + "." + ns + "." + ap + ".external." + c.DestinationPeer,
		Service: c.DestinationName, Namespace: ns, Partition: ap, Peer: c.DestinationPeer,
		MeshGateway: c.MeshGatewayMode, ConnectTimeout: timeout,
	}
	return &plan{
		protocol: cmp.Or(c.Protocol, "tcp"),
		legs:     []leg{{weight: 1, res: &resolverPlan{name: t.ID, connectTimeout: timeout, targets: []string{t.ID}, lb: defaultBalancer}}},
		targets:  map[string]Target{t.ID: t},
	}
}

// rebuild computes every target's endpoint set from the feeds' latest
// answers and publishes a new snapshot. A target whose endpoints did not
// change keeps its set, and with it its balancers' state (rings). A new
// plan whose watches have not all answered yet (well or not) is not
// published while an older one serves: a chain change does not leave
// connections without endpoints for the time of a first query.
func (u *Upstream) rebuild(p *plan, f *feeds) {
	prev := u.snap.Load()
	snap := &chainSnap{plan: p, byID: map[string]*targetSnap{}, ready: true}
	u.statsMu.Lock()
	defer u.statsMu.Unlock()
	var sets []*endpointSet
	for id, t := range p.targets {
		ts := &targetSnap{Target: t}
		eps, why, settled := u.endpointsOf(t, f)
		if !settled {
			snap.ready = false
		}
		if why != "" {
			ts.unknown = why
		} else {
			eps = sortEndpoints(eps)
			if prev != nil {
				if old := prev.byID[id]; old != nil && old.set != nil && sameEndpoints(old.set, eps) {
					ts.set = old.set
				}
			}
			if ts.set == nil {
				ts.set = u.newSet(eps)
			}
			sets = append(sets, ts.set)
		}
		snap.byID[id] = ts
		snap.targets = append(snap.targets, ts)
	}
	if !snap.ready && prev != nil && prev.plan != p {
		return
	}
	if prev != nil && prev.plan != p {
		// The old plan's sets stay live until their connections end.
		for _, t := range prev.targets {
			sets = append(sets, t.set)
		}
	}
	for _, ts := range snap.targets {
		if ts.set != nil && (prev == nil || prev.byID[ts.ID] == nil || prev.byID[ts.ID].set != ts.set) {
			u.logTarget(ts.Target, ts.set)
		}
	}
	u.forgetStats(sets...)
	slices.SortFunc(snap.targets, func(a, b *targetSnap) int { return strings.Compare(a.ID, b.ID) })
	var cum float64
	for _, l := range p.legs {
		r := &route{name: l.res.name, timeout: l.res.connectTimeout, lb: l.res.lb}
		for _, id := range l.res.targets {
			r.targets = append(r.targets, snap.byID[id])
		}
		cum += l.weight
		snap.legs = append(snap.legs, legSnap{weight: l.weight, res: r})
		snap.cum = append(snap.cum, cum)
	}
	snap.addrs = u.addressesOf(p, f)
	u.snap.Store(snap)
	if snap.ready {
		u.readyOnce.Do(func() { close(u.ready) })
	}
	if u.onAddresses != nil && (prev == nil || !prev.addrs.Equal(snap.addrs) || (snap.ready && !prev.ready)) {
		u.onAddresses()
	}
}

func sameEndpoints(set *endpointSet, eps []Endpoint) bool {
	return slices.EqualFunc(set.eps, eps, func(a *endpoint, b Endpoint) bool { return a.Endpoint == b })
}

func (u *Upstream) logTarget(t Target, set *endpointSet) {
	if len(set.eps) == 0 {
		u.log.Warn("no healthy endpoints", "target", t.ID)
		return
	}
	via := "direct"
	if g := set.eps[0].Gateway; g != "" {
		via = g + " mesh gateways"
	}
	u.log.Info("endpoints updated", "target", t.ID, "count", len(set.eps), "via", via)
}

// endpointsOf computes t's endpoints from the feeds: its healthy instances
// (Consul's rules, see instance.health) at their LAN address in this
// datacenter and their WAN address in another; or, for a target in another
// datacenter with mesh gateway mode local or remote, the gateways of this
// or of the target's datacenter, as long as one instance is healthy. why
// is non-empty when there is no answer to compute from yet; settled is
// false while a first query is still out.
func (u *Upstream) endpointsOf(t Target, f *feeds) (eps []Endpoint, why string, settled bool) {
	hf := f.health[t.ID]
	if hf == nil {
		return nil, "no watch", true
	}
	ins, ok := hf.instances()
	if !ok {
		if hf.answered.Load() {
			return nil, "first query failed", true
		}
		return nil, "waiting for the first answer", false
	}
	base := Endpoint{Service: t.Service, Namespace: t.Namespace, Partition: t.Partition, Datacenter: t.Datacenter, Target: t.ID, SNI: t.SNI}
	if t.Peer != "" {
		// An imported instance is the exporting cluster's mesh gateway,
		// at its WAN address (Envoy's BestAddress(true) for peers).
		eps = []Endpoint{}
		for _, in := range ins {
			healthy, w := in.health(t.OnlyPassing)
			if !healthy || in.service != t.Service || in.peerSNI == "" {
				continue
			}
			e := base
			e.Addr, e.Node, e.Weight = in.wan, in.node, w
			e.SNI, e.Peer, e.PeerIDs = in.peerSNI, t.Peer, in.peerIDs
			eps = append(eps, e)
		}
		return eps, "", true
	}
	gwDC := u.gatewayDC(t)
	remote := t.Datacenter != "" && t.Datacenter != u.localDC
	anyHealthy := false
	for _, in := range ins {
		healthy, w := in.health(t.OnlyPassing)
		if !healthy || in.service != t.Service {
			continue
		}
		anyHealthy = true
		if gwDC != "" {
			break
		}
		e := base
		e.Addr, e.Node, e.Weight = in.lan, in.node, w
		if remote {
			e.Addr = in.wan
		}
		eps = append(eps, e)
	}
	if gwDC == "" {
		return eps, "", true
	}
	gf := f.gateways[gwDC]
	if gf == nil {
		return nil, "no gateway watch", true
	}
	gws, ok := gf.instances()
	if !ok {
		if gf.answered.Load() {
			return nil, "first mesh gateway query failed", true
		}
		return nil, "waiting for the mesh gateways of " + gwDC, false
	}
	if !anyHealthy {
		return []Endpoint{}, "", true
	}
	mode := t.MeshGateway
	for _, g := range gws {
		_, w := g.health(false)
		e := base
		e.Node, e.Weight, e.Gateway = g.node, w, mode
		// Our gateways are dialed on the LAN, the target datacenter's
		// across the WAN.
		e.Addr = g.lan
		if gwDC != u.localDC {
			e.Addr = g.wan
		}
		eps = append(eps, e)
	}
	return eps, "", true
}

// ChainStatus is a service upstream's discovery chain as strait follows it,
// for the admin listener's /upstreams.
type ChainStatus struct {
	Protocol string `json:"protocol"`
	// Legs are the splitter's legs (one without a splitter), each a
	// resolver with its targets in failover order and the target new
	// connections use now.
	Legs []LegStatus `json:"legs"`
	// Targets are every target of the chain with its endpoints.
	Targets []TargetStatus `json:"targets"`
	// IgnoredRouterRoutes counts router routes whose matches need L7.
	IgnoredRouterRoutes int      `json:"ignored_router_routes,omitempty"`
	IgnoredLoadBalancer []string `json:"ignored_load_balancer,omitempty"`
}

// LegStatus is one leg of a chain.
type LegStatus struct {
	Weight         float64  `json:"weight"` // 0 to 1
	Resolver       string   `json:"resolver"`
	ConnectTimeout string   `json:"connect_timeout"`
	LoadBalancer   Balancer `json:"load_balancer"`
	Targets        []string `json:"targets"` // primary, then failover
	// Active is the target new connections start with; empty when no
	// target has healthy endpoints.
	Active string `json:"active"`
}

// TargetStatus is one chain target with its endpoints.
type TargetStatus struct {
	Target
	ConnectTimeout string `json:"connect_timeout"` // shadows Target's, as text
	// Active: some leg starts new connections with this target.
	Active bool `json:"active"`
	// Discovered: its endpoint answer (and its gateways', if any) is in.
	Discovered bool   `json:"discovered"`
	Pending    string `json:"pending,omitempty"` // why not discovered
	// Via is "local" or "remote" when the target is reached through mesh
	// gateways.
	Via       string           `json:"via,omitempty"`
	Endpoints []EndpointStatus `json:"endpoints"`
}

// Chain reports the discovery chain in force, or nil for a prepared query
// upstream and before the first chain arrives.
func (u *Upstream) Chain() *ChainStatus {
	snap := u.snap.Load()
	if snap == nil {
		return nil
	}
	now := u.mono()
	cs := &ChainStatus{Protocol: snap.plan.protocol, IgnoredRouterRoutes: snap.plan.routerMatches, IgnoredLoadBalancer: snap.plan.lbIgnored}
	active := map[string]bool{}
	for _, l := range snap.legs {
		ls := LegStatus{Weight: l.weight, Resolver: l.res.name, ConnectTimeout: l.res.timeout.String(), LoadBalancer: l.res.lb}
		for _, t := range l.res.targets {
			ls.Targets = append(ls.Targets, t.ID)
		}
		if a := l.res.active(now); a >= 0 {
			ls.Active = l.res.targets[a].ID
			active[ls.Active] = true
		}
		cs.Legs = append(cs.Legs, ls)
	}
	for _, t := range snap.targets {
		ts := TargetStatus{
			Target: t.Target, ConnectTimeout: t.ConnectTimeout.String(), Active: active[t.ID],
			Discovered: t.set != nil, Pending: t.unknown, Endpoints: u.statusOf([]EndpointStatus{}, t.set),
		}
		if len(ts.Endpoints) > 0 {
			ts.Via = ts.Endpoints[0].Gateway
		}
		cs.Targets = append(cs.Targets, ts)
	}
	return cs
}
