package gateway

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"

	"github.com/straitproxy/strait/internal/watch"
	"github.com/straitproxy/strait/metrics"
)

// Defaults of CatalogOptions.
const (
	// DefaultMaxWatches bounds the local targets (a service, or a subset
	// of one) watched at once. Each is a blocking query, which holds one
	// HTTP connection to the agent: the agent's http_max_conns_per_client
	// (200 by default) must stay above this plus the remote watches.
	DefaultMaxWatches = 100
	// DefaultIdleTimeout is how long a local target's watch outlives its
	// last connection.
	DefaultIdleTimeout = 10 * time.Minute
	// DefaultDatacentersInterval is how often the datacenter list is
	// re-read (/v1/catalog/datacenters cannot block; Consul's own gateway
	// caches it for 30s).
	DefaultDatacentersInterval = 30 * time.Second
)

// meshGatewayFilter selects mesh gateways in /v1/catalog/services.
const meshGatewayFilter = `ServiceKind == "mesh-gateway"`

// CatalogOptions configure a Catalog. Client is required.
type CatalogOptions struct {
	Client  *api.Client
	Logger  hclog.Logger
	Metrics *metrics.Metrics
	// MaxWatches (DefaultMaxWatches), IdleTimeout (DefaultIdleTimeout)
	// and DatacentersInterval (DefaultDatacentersInterval).
	MaxWatches          int
	IdleTimeout         time.Duration
	DatacentersInterval time.Duration
}

// Catalog is the Router backed by the local Consul agent, with blocking
// watches only (no request per connection):
//
//   - the agent's datacenter (/v1/agent/self, once) and the mesh's trust
//     domain (/v1/agent/connect/ca/roots);
//   - this datacenter's service names (/v1/catalog/services), so that a
//     name not in the catalog never starts a watch;
//   - every service-resolver (/v1/config/service-resolver, one watch for
//     all: the subsets' filters, DefaultSubset and ConnectTimeout);
//   - per local target, started by its first connection and stopped when
//     idle, /v1/health/connect/<service>?filter=<subset filter>;
//   - the datacenters (/v1/catalog/datacenters, re-read periodically), and
//     per other datacenter its mesh gateways:
//     /v1/catalog/services?dc=X&filter=ServiceKind == "mesh-gateway", then
//     /v1/health/service/<name>?dc=X for each name.
type Catalog struct {
	opts   CatalogOptions
	client *api.Client
	log    hclog.Logger
	m      *metrics.Metrics

	ready     chan struct{}
	readyOnce sync.Once

	mu            sync.Mutex
	ctx           context.Context // Run's; nil before Run
	stopped       bool            // Run is joining its goroutines: start no more
	wg            sync.WaitGroup  // every watch goroutine
	dc, td        string
	haveServices  bool
	haveResolvers bool
	services      map[string]string // lowercase name -> catalog name
	resolvers     map[string]*api.ServiceResolverConfigEntry
	local         map[localKey]*localWatch
	remote        map[string]*remoteWatch
	datacenters   []string
	// exported maps a lower-case service name to the peers it is
	// exported to (/v1/exported-services); nil until the first answer.
	exported map[string]map[string]bool
}

type localKey struct{ service, subset string } // lowercase, as in server names

type localWatch struct {
	t           *Target
	filter      string
	onlyPassing bool
	cancel      context.CancelFunc
}

type remoteWatch struct {
	t      *Target
	cancel context.CancelFunc
}

// NewCatalog returns a Catalog; nothing is watched until Run.
func NewCatalog(opts CatalogOptions) *Catalog {
	if opts.Logger == nil {
		opts.Logger = hclog.NewNullLogger()
	}
	if opts.Metrics == nil {
		opts.Metrics = metrics.Discard()
	}
	if opts.MaxWatches <= 0 {
		opts.MaxWatches = DefaultMaxWatches
	}
	if opts.IdleTimeout <= 0 {
		opts.IdleTimeout = DefaultIdleTimeout
	}
	if opts.DatacentersInterval <= 0 {
		opts.DatacentersInterval = DefaultDatacentersInterval
	}
	return &Catalog{
		opts: opts, client: opts.Client, log: opts.Logger, m: opts.Metrics, ready: make(chan struct{}),
		services: map[string]string{}, resolvers: map[string]*api.ServiceResolverConfigEntry{},
		local: map[localKey]*localWatch{}, remote: map[string]*remoteWatch{},
	}
}

// Ready is closed once the Catalog knows its datacenter, the trust domain,
// the local service names and the resolvers.
func (c *Catalog) Ready() <-chan struct{} { return c.ready }

// Run watches until ctx is done and returns once every watch has stopped.
// Call it once.
func (c *Catalog) Run(ctx context.Context) {
	c.mu.Lock()
	c.ctx = ctx
	c.mu.Unlock()
	c.wg.Go(func() { c.watchRoots(ctx) })
	c.wg.Go(func() { c.watchServices(ctx) })
	c.wg.Go(func() { c.watchResolvers(ctx) })
	c.wg.Go(func() { c.runDatacenters(ctx) })
	c.wg.Go(func() { c.janitor(ctx) })
	c.wg.Go(func() { c.watchExported(ctx) })
	<-ctx.Done()
	c.mu.Lock()
	c.stopped = true
	c.mu.Unlock()
	c.wg.Wait()
}

func (c *Catalog) maybeReadyLocked() {
	if c.dc != "" && c.td != "" && c.haveServices && c.haveResolvers {
		c.readyOnce.Do(func() {
			close(c.ready)
			c.log.Info("routes ready", "datacenter", c.dc, "trust_domain", c.td)
		})
	}
}

func (c *Catalog) watchRoots(ctx context.Context) {
	watch.Loop(ctx, c.log, "connect/ca/roots", watch.Backoff{}, func(ctx context.Context, index uint64) (uint64, error) {
		q := &api.QueryOptions{WaitIndex: index}
		roots, meta, err := c.client.Agent().ConnectCARoots(q.WithContext(ctx))
		if err != nil {
			return 0, fmt.Errorf("watching the CA roots: %w", err)
		}
		c.mu.Lock()
		if td := strings.ToLower(roots.TrustDomain); td != "" && td != c.td {
			c.td = td
			c.log.Info("trust domain", "trust_domain", td)
		}
		c.maybeReadyLocked()
		c.mu.Unlock()
		return meta.LastIndex, nil
	})
}

// self reads the agent's datacenter, retrying until it succeeds or ctx is
// done.
func (c *Catalog) self(ctx context.Context) bool {
	for failures := 0; ; failures++ {
		self, err := c.client.Agent().Self()
		if err == nil {
			if dc, _ := self["Config"]["Datacenter"].(string); dc != "" {
				c.mu.Lock()
				c.dc = strings.ToLower(dc)
				c.maybeReadyLocked()
				c.mu.Unlock()
				return true
			}
			err = errors.New("the agent reports no datacenter")
		}
		c.log.Warn("reading the agent's datacenter; retrying", "error", err)
		if !watch.Sleep(ctx, min(30*time.Second, 250*time.Millisecond<<min(failures, 7))) {
			return false
		}
	}
}

func (c *Catalog) watchServices(ctx context.Context) {
	watch.Loop(ctx, c.log, "catalog/services", watch.Backoff{}, func(ctx context.Context, index uint64) (uint64, error) {
		q := &api.QueryOptions{WaitIndex: index}
		svcs, meta, err := c.client.Catalog().Services(q.WithContext(ctx))
		if err != nil {
			return 0, fmt.Errorf("watching the catalog's services: %w", err)
		}
		names := make(map[string]string, len(svcs))
		for n := range svcs {
			names[strings.ToLower(n)] = n
		}
		c.mu.Lock()
		c.services = names
		c.haveServices = true
		for k, lw := range c.local {
			if names[k.service] != lw.t.name.Service {
				c.stopLocalLocked(k, "service left the catalog")
			}
		}
		c.maybeReadyLocked()
		c.mu.Unlock()
		return meta.LastIndex, nil
	})
}

func (c *Catalog) watchResolvers(ctx context.Context) {
	watch.Loop(ctx, c.log, "config/service-resolver", watch.Backoff{}, func(ctx context.Context, index uint64) (uint64, error) {
		q := &api.QueryOptions{WaitIndex: index}
		entries, meta, err := c.client.ConfigEntries().List(api.ServiceResolver, q.WithContext(ctx))
		if err != nil {
			return 0, fmt.Errorf("watching the service-resolvers: %w", err)
		}
		rs := make(map[string]*api.ServiceResolverConfigEntry, len(entries))
		for _, e := range entries {
			if r, ok := e.(*api.ServiceResolverConfigEntry); ok {
				rs[strings.ToLower(r.Name)] = r
			}
		}
		c.mu.Lock()
		c.resolvers = rs
		c.haveResolvers = true
		// A target whose subset changed or disappeared restarts with its
		// next connection.
		for k, lw := range c.local {
			filter, onlyPassing, timeout, ok := c.subsetLocked(k.service, k.subset)
			if !ok || filter != lw.filter || onlyPassing != lw.onlyPassing {
				c.stopLocalLocked(k, "service-resolver changed")
				continue
			}
			lw.t.SetConnectTimeout(timeout)
		}
		c.maybeReadyLocked()
		c.mu.Unlock()
		return meta.LastIndex, nil
	})
}

// subsetLocked returns what a server name for service (lowercase) and
// subset ("" for none) selects: the subset's filter and OnlyPassing (the
// resolver's DefaultSubset when subset is ""), and the resolver's
// ConnectTimeout. ok is false when the subset is not defined.
func (c *Catalog) subsetLocked(service, subset string) (filter string, onlyPassing bool, timeout time.Duration, ok bool) {
	r := c.resolvers[service]
	if r == nil {
		return "", false, 0, subset == ""
	}
	name := cmp.Or(subset, r.DefaultSubset)
	if name == "" {
		return "", false, r.ConnectTimeout, true
	}
	ss, found := r.Subsets[name]
	if !found {
		if subset == "" {
			// A DefaultSubset naming no subset: Consul refuses to
			// write that; route the whole service.
			return "", false, r.ConnectTimeout, true
		}
		return "", false, 0, false
	}
	return ss.Filter, ss.OnlyPassing, r.ConnectTimeout, true
}

// Route implements Router.
func (c *Catalog) Route(ctx context.Context, sni string) (*Target, error) {
	select {
	case <-c.ready:
	case <-ctx.Done():
		return nil, &RouteError{Result: ResultNotReady, Err: errors.New("datacenter, trust domain or catalog not known yet")}
	}
	c.mu.Lock()
	t, err := c.targetLocked(sni)
	c.mu.Unlock()
	if err != nil {
		return nil, err
	}
	t.touch()
	select {
	case <-t.Ready():
		return t, nil
	case <-ctx.Done():
		return nil, &RouteError{Result: ResultNoEndpoints, Err: fmt.Errorf("%s %s: no endpoints from Consul yet: %w", t.name.Kind, t.name.Target(), ctx.Err())}
	}
}

func (c *Catalog) targetLocked(sni string) (*Target, error) {
	n, reason := ParseName(sni, c.td, c.dc)
	if reason != "" {
		return nil, &RouteError{Result: ResultUnknownSNI, Reason: reason}
	}
	if n.Kind == KindRemote {
		rw := c.remote[n.Datacenter]
		if rw == nil {
			return nil, &RouteError{Result: ResultUnknownSNI, Reason: UnknownDatacenter}
		}
		return rw.t, nil
	}
	svc, ok := c.services[n.Service]
	if !ok {
		return nil, &RouteError{Result: ResultUnknownSNI, Reason: UnknownService}
	}
	if n.Peer != "" && !c.exported[n.Service][n.Peer] {
		// Only what the exported-services entry offers that peer: a
		// peer's proxies cannot name any other service of ours.
		return nil, &RouteError{Result: ResultUnknownSNI, Reason: UnknownNotExported}
	}
	n.Peer = "" // a peered name shares the service's local route
	filter, onlyPassing, timeout, ok := c.subsetLocked(n.Service, n.Subset)
	if !ok {
		return nil, &RouteError{Result: ResultUnknownSNI, Reason: UnknownSubset}
	}
	k := localKey{n.Service, n.Subset}
	if lw := c.local[k]; lw != nil {
		return lw.t, nil
	}
	if c.ctx == nil || c.stopped {
		return nil, &RouteError{Result: ResultShutdown, Err: errors.New("catalog stopped")}
	}
	if len(c.local) >= c.opts.MaxWatches && !c.evictLocked() {
		return nil, &RouteError{Result: ResultWatchLimit, Err: fmt.Errorf("%d service watches, all in use", len(c.local))}
	}
	n.Service = svc
	lw := &localWatch{t: NewTarget(n), filter: filter, onlyPassing: onlyPassing}
	lw.t.SetConnectTimeout(timeout)
	ctx, cancel := context.WithCancel(c.ctx)
	lw.cancel = cancel
	c.local[k] = lw
	c.wg.Go(func() { c.watchLocal(ctx, lw) })
	c.gaugesLocked()
	c.log.Debug("watching a local target", "target", n.Target(), "filter", filter)
	return lw.t, nil
}

// DefaultForbiddenRetry paces the exported-services watch when the token
// may not read it (403: mesh:read missing).
const DefaultForbiddenRetry = 5 * time.Minute

// watchExported follows /v1/exported-services (blocking): which services
// of ours each cluster peer may reach through this gateway with a peered
// name. A 403 leaves peered names unrouted, logged once, re-checked every
// DefaultForbiddenRetry.
func (c *Catalog) watchExported(ctx context.Context) {
	logged := false
	watch.Loop(ctx, c.log, "exported-services", watch.Backoff{}, func(ctx context.Context, index uint64) (uint64, error) {
		q := &api.QueryOptions{WaitIndex: index}
		svcs, meta, err := c.client.ExportedServices(q.WithContext(ctx))
		if err != nil {
			var se api.StatusError
			if errors.As(err, &se) && se.Code == 403 {
				if !logged {
					c.log.Warn("the token may not read exported-services (mesh:read); peered names are not routed", "error", err)
					logged = true
				}
				if !watch.Sleep(ctx, DefaultForbiddenRetry) {
					return 0, ctx.Err()
				}
				return 0, nil
			}
			return 0, fmt.Errorf("watching the exported services: %w", err)
		}
		logged = false
		ex := map[string]map[string]bool{}
		for _, e := range svcs {
			if e.Namespace != "" && e.Namespace != "default" {
				continue
			}
			name := strings.ToLower(e.Service)
			for _, p := range e.Consumers.Peers {
				if ex[name] == nil {
					ex[name] = map[string]bool{}
				}
				ex[name][strings.ToLower(p)] = true
			}
		}
		c.mu.Lock()
		changed := !maps.EqualFunc(c.exported, ex, maps.Equal) || c.exported == nil
		c.exported = ex
		c.mu.Unlock()
		if changed {
			c.log.Info("exported services", "services", len(ex))
		}
		return meta.LastIndex, nil
	})
}

// evictLocked stops the watch of the least recently used local target
// without connections, and reports whether there was one.
func (c *Catalog) evictLocked() bool {
	var victim localKey
	var oldest int64
	found := false
	for k, lw := range c.local {
		if lw.t.conns.Load() > 0 {
			continue
		}
		if u := lw.t.lastUsed.Load(); !found || u < oldest {
			victim, oldest, found = k, u, true
		}
	}
	if found {
		c.stopLocalLocked(victim, "watch limit reached; least recently used")
	}
	return found
}

func (c *Catalog) stopLocalLocked(k localKey, why string) {
	lw := c.local[k]
	if lw == nil {
		return
	}
	lw.cancel()
	delete(c.local, k)
	c.gaugesLocked()
	c.log.Debug("stopped watching a local target", "target", lw.t.name.Target(), "why", why)
}

func (c *Catalog) gaugesLocked() {
	c.m.SetGauge(metrics.GatewayWatches, float32(len(c.local)), []metrics.Label{{Name: "kind", Value: KindLocal}})
	c.m.SetGauge(metrics.GatewayWatches, float32(len(c.remote)), []metrics.Label{{Name: "kind", Value: KindRemote}})
}

func (c *Catalog) watchLocal(ctx context.Context, lw *localWatch) {
	svc := lw.t.name.Service
	what := "health/connect/" + svc
	if lw.t.name.Subset != "" {
		what += " subset " + lw.t.name.Subset
	}
	watch.Loop(ctx, c.log, what, watch.Backoff{}, func(ctx context.Context, index uint64) (uint64, error) {
		q := &api.QueryOptions{WaitIndex: index, Filter: lw.filter, UseCache: true}
		entries, meta, err := c.client.Health().Connect(svc, "", false, q.WithContext(ctx))
		if err != nil {
			return 0, fmt.Errorf("watching the instances of %s: %w", svc, err)
		}
		eps := make([]Endpoint, 0, len(entries))
		for _, e := range entries {
			if !healthy(e, lw.onlyPassing) {
				continue
			}
			if ep, ok := lanEndpoint(e); ok {
				eps = append(eps, ep)
			}
		}
		lw.t.SetEndpoints(eps)
		return meta.LastIndex, nil
	})
}

// healthy is Consul's endpoint health (agent/xds/endpoints.go
// calculateEndpointHealthAndWeight): unhealthy with any critical check
// (maintenance included), or with any non-passing one under OnlyPassing.
func healthy(e *api.ServiceEntry, onlyPassing bool) bool {
	for _, ch := range e.Checks {
		switch ch.Status {
		case api.HealthCritical, api.HealthMaint:
			return false
		case api.HealthWarning:
			if onlyPassing {
				return false
			}
		}
	}
	return true
}

// lanEndpoint is a local instance's LAN address: the service's address,
// else the node's.
func lanEndpoint(e *api.ServiceEntry) (Endpoint, bool) {
	s := e.Service
	if s == nil || s.Port <= 0 {
		return Endpoint{}, false
	}
	var node, nodeAddr string
	if e.Node != nil {
		node, nodeAddr = e.Node.Node, e.Node.Address
	}
	host := cmp.Or(s.Address, nodeAddr)
	if host == "" {
		return Endpoint{}, false
	}
	return Endpoint{Addr: net.JoinHostPort(host, strconv.Itoa(s.Port)), Node: node, ID: s.ID}, true
}

// wanEndpoint is another datacenter's gateway's WAN address, as Consul
// picks it (structs.CheckServiceNode.BestAddress(true)): the service's wan
// tagged address, its address, the node's wan tagged address, the node's
// address.
func wanEndpoint(e *api.ServiceEntry) (Endpoint, bool) {
	s := e.Service
	if s == nil {
		return Endpoint{}, false
	}
	var node, nodeAddr, nodeWAN string
	if e.Node != nil {
		node, nodeAddr = e.Node.Node, e.Node.Address
		nodeWAN = e.Node.TaggedAddresses["wan"]
	}
	host, port := s.Address, s.Port
	if wan, ok := s.TaggedAddresses["wan"]; ok && wan.Address != "" {
		host, port = wan.Address, wan.Port
	}
	host = cmp.Or(host, nodeWAN, nodeAddr)
	if host == "" || port <= 0 {
		return Endpoint{}, false
	}
	return Endpoint{Addr: net.JoinHostPort(host, strconv.Itoa(port)), Node: node, ID: s.ID}, true
}

// runDatacenters re-reads the datacenter list and keeps one gateway watch
// per other datacenter.
func (c *Catalog) runDatacenters(ctx context.Context) {
	if !c.self(ctx) {
		return
	}
	for {
		dcs, err := c.client.Catalog().Datacenters()
		if err != nil {
			c.log.Warn("reading the datacenters; keeping the previous list", "error", err)
		} else {
			c.reconcileDatacenters(ctx, dcs)
		}
		if !watch.Sleep(ctx, c.opts.DatacentersInterval) {
			return
		}
	}
}

func (c *Catalog) reconcileDatacenters(ctx context.Context, dcs []string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.stopped {
		return
	}
	want := map[string]bool{}
	for _, dc := range dcs {
		dc = strings.ToLower(dc)
		if dc == c.dc {
			continue
		}
		want[dc] = true
		if c.remote[dc] != nil {
			continue
		}
		rctx, cancel := context.WithCancel(ctx)
		rw := &remoteWatch{t: NewTarget(Name{Kind: KindRemote, Datacenter: dc}), cancel: cancel}
		c.remote[dc] = rw
		c.wg.Go(func() { c.watchRemote(rctx, rw) })
		c.log.Info("watching another datacenter's mesh gateways", "datacenter", dc)
	}
	for dc, rw := range c.remote {
		if !want[dc] {
			rw.cancel()
			delete(c.remote, dc)
			c.log.Info("datacenter gone; stopped watching its gateways", "datacenter", dc)
		}
	}
	c.datacenters = slices.Sorted(maps.Keys(want))
	c.gaugesLocked()
}

// watchRemote watches the mesh gateway services of one datacenter and,
// per service name, its instances; the target gets their union.
func (c *Catalog) watchRemote(ctx context.Context, rw *remoteWatch) {
	dc := rw.t.name.Datacenter
	var (
		mu       sync.Mutex
		children = map[string]*gatewayService{}
		wg       sync.WaitGroup
	)
	publish := func() {
		mu.Lock()
		defer mu.Unlock()
		var eps []Endpoint
		for _, ch := range children {
			if !ch.loaded {
				return // wait until every gateway service has answered once
			}
			eps = append(eps, ch.eps...)
		}
		rw.t.SetEndpoints(eps)
	}
	watch.Loop(ctx, c.log, "catalog/services?dc="+dc+" mesh-gateway", watch.Backoff{}, func(ctx context.Context, index uint64) (uint64, error) {
		q := &api.QueryOptions{Datacenter: dc, WaitIndex: index, Filter: meshGatewayFilter}
		svcs, meta, err := c.client.Catalog().Services(q.WithContext(ctx))
		if err != nil {
			return 0, fmt.Errorf("watching the mesh gateways of %s: %w", dc, err)
		}
		mu.Lock()
		for name := range svcs {
			if children[name] != nil {
				continue
			}
			cctx, cancel := context.WithCancel(ctx)
			ch := &gatewayService{cancel: cancel}
			children[name] = ch
			wg.Go(func() {
				c.watchGatewayService(cctx, dc, name, func(eps []Endpoint) {
					mu.Lock()
					ch.eps, ch.loaded = eps, true
					mu.Unlock()
					publish()
				})
			})
		}
		for name, ch := range children {
			if _, ok := svcs[name]; !ok {
				ch.cancel()
				delete(children, name)
			}
		}
		mu.Unlock()
		publish()
		return meta.LastIndex, nil
	})
	mu.Lock()
	for _, ch := range children {
		ch.cancel()
	}
	mu.Unlock()
	wg.Wait()
}

type gatewayService struct {
	cancel context.CancelFunc
	eps    []Endpoint
	loaded bool
}

func (c *Catalog) watchGatewayService(ctx context.Context, dc, name string, set func([]Endpoint)) {
	watch.Loop(ctx, c.log, "health/service/"+name+"?dc="+dc, watch.Backoff{}, func(ctx context.Context, index uint64) (uint64, error) {
		q := &api.QueryOptions{Datacenter: dc, WaitIndex: index}
		entries, meta, err := c.client.Health().Service(name, "", false, q.WithContext(ctx))
		if err != nil {
			return 0, fmt.Errorf("watching mesh gateway %s in %s: %w", name, dc, err)
		}
		eps := make([]Endpoint, 0, len(entries))
		for _, e := range entries {
			if e.Service == nil || e.Service.Kind != api.ServiceKindMeshGateway || !healthy(e, false) {
				continue
			}
			if ep, ok := wanEndpoint(e); ok {
				eps = append(eps, ep)
			}
		}
		set(eps)
		return meta.LastIndex, nil
	})
}

// janitor stops the watches of local targets idle for IdleTimeout.
func (c *Catalog) janitor(ctx context.Context) {
	every := min(c.opts.IdleTimeout/2, time.Minute)
	for watch.Sleep(ctx, every) {
		cutoff := time.Now().Add(-c.opts.IdleTimeout).UnixNano()
		c.mu.Lock()
		for k, lw := range c.local {
			if lw.t.conns.Load() == 0 && lw.t.lastUsed.Load() < cutoff {
				c.stopLocalLocked(k, "idle")
			}
		}
		c.mu.Unlock()
	}
}

// Routes is the Catalog as /routes shows it.
type Routes struct {
	Ready       bool           `json:"ready"`
	Datacenter  string         `json:"datacenter"`
	TrustDomain string         `json:"trust_domain"`
	Datacenters []string       `json:"remote_datacenters"`
	Services    int            `json:"catalog_services"`
	Resolvers   int            `json:"service_resolvers"`
	MaxWatches  int            `json:"max_watches"`
	Remote      []TargetStatus `json:"remote"`
	Local       []TargetStatus `json:"local"`
}

// Routes returns the routes known now.
func (c *Catalog) Routes() Routes {
	c.mu.Lock()
	r := Routes{
		Datacenter: c.dc, TrustDomain: c.td, Datacenters: append([]string{}, c.datacenters...),
		Services: len(c.services), Resolvers: len(c.resolvers), MaxWatches: c.opts.MaxWatches,
		Remote: []TargetStatus{}, Local: []TargetStatus{},
	}
	remote := make([]*Target, 0, len(c.remote))
	for _, rw := range c.remote {
		remote = append(remote, rw.t)
	}
	type lt struct {
		t      *Target
		filter string
	}
	local := make([]lt, 0, len(c.local))
	for _, lw := range c.local {
		local = append(local, lt{lw.t, lw.filter})
	}
	c.mu.Unlock()
	select {
	case <-c.ready:
		r.Ready = true
	default:
	}
	for _, t := range remote {
		r.Remote = append(r.Remote, t.status())
	}
	for _, l := range local {
		s := l.t.status()
		s.Filter = l.filter
		r.Local = append(r.Local, s)
	}
	sort.Slice(r.Remote, func(i, j int) bool { return r.Remote[i].Target < r.Remote[j].Target })
	sort.Slice(r.Local, func(i, j int) bool { return r.Local[i].Target < r.Local[j].Target })
	return r
}
