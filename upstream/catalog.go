package upstream

import (
	"cmp"
	"context"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"

	"github.com/straitproxy/strait/internal/watch"
)

// Catalog runs the blocking watches that chains' targets need, once per
// distinct query however many targets ask for it: the instances of a
// service in a datacenter under a subset filter, and the mesh gateways of
// a datacenter. A watch starts with its first user and stops with its
// last. Every goroutine it starts is joined by Close.
type Catalog struct {
	client *api.Client
	log    hclog.Logger
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu       sync.Mutex
	health   map[healthKey]*feed
	gateways map[string]*feed // by datacenter
}

// NewCatalog returns a Catalog whose watches run under ctx (and report to
// its watch.Observer). Close it when done.
func NewCatalog(ctx context.Context, client *api.Client, log hclog.Logger) *Catalog {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	ctx, cancel := context.WithCancel(ctx)
	return &Catalog{
		client: client, log: log, ctx: ctx, cancel: cancel,
		health: map[healthKey]*feed{}, gateways: map[string]*feed{},
	}
}

// Close stops every watch and waits for their goroutines.
func (c *Catalog) Close() {
	c.cancel()
	c.wg.Wait()
}

// healthKey is one /v1/health/connect query: in a datacenter of ours, or
// of a cluster peer's imported services.
type healthKey struct {
	service, namespace, partition, datacenter, filter, peer string
}

func (k healthKey) String() string {
	s := "health/connect/" + k.service + "?dc=" + k.datacenter
	if k.peer != "" {
		s = "health/connect/" + k.service + "?peer=" + k.peer
	}
	if k.filter != "" {
		s += "&filter=" + k.filter
	}
	return s
}

// instance is one service instance as a watch saw it, with the health
// detail a target's rules (OnlyPassing) need.
type instance struct {
	lan, wan string // host:port to dial from this datacenter, or from another
	node     string
	service  string // the service the instance serves (a sidecar's destination)
	critical bool   // some check is critical (or in maintenance)
	passing  bool   // every check is passing
	warning  bool   // some check is warning
	// weightPassing and weightWarning are Service.Weights; 0 when Consul
	// gave none (then 1 applies).
	weightPassing, weightWarning int
	// virtual are the instance's consul-virtual and virtual tagged
	// addresses (a service's virtual IP; consul-k8s puts the ClusterIP in
	// virtual), which a transparent proxy routes on.
	virtual []netip.Addr
	// dialedDirectly is the instance's TransparentProxy.DialedDirectly:
	// transparent proxies may dial its own address.
	dialedDirectly bool
	// peerSNI and peerIDs are an imported instance's
	// Service.Connect.PeerMeta: its first SNI and its SPIFFE IDs,
	// comma-joined.
	peerSNI, peerIDs string
}

// Tagged addresses a transparent proxy routes on (Consul's
// structs.TaggedAddressVirtualIP and naming.VirtualIPTag).
const (
	taggedConsulVirtual = "consul-virtual"
	taggedVirtual       = "virtual"
)

// health applies Consul's rules for Envoy endpoints
// (agent/xds/endpoints.go calculateEndpointHealthAndWeight): any critical
// check makes an instance unhealthy, with onlyPassing anything not passing
// does; the weight is Weights.Passing, Weights.Warning while a check
// warns; a weight below 1 makes the instance unhealthy, and weights are at
// most 128.
func (in instance) health(onlyPassing bool) (healthy bool, weight int) {
	weight, healthy = 1, !in.critical
	weighted := in.weightPassing != 0 || in.weightWarning != 0
	if weighted {
		weight = in.weightPassing
	}
	if onlyPassing && !in.passing {
		healthy = false
	}
	if in.warning && weighted {
		weight = in.weightWarning
	}
	if weight < 1 {
		healthy, weight = false, 1
	}
	return healthy, min(weight, 128)
}

// instanceOf reads a health entry. service is the served service: for a
// connect-proxy its destination, for a Connect-native service or a
// gateway its own name.
func instanceOf(e *api.ServiceEntry) (instance, bool) {
	s := e.Service
	if s == nil || s.Port <= 0 {
		return instance{}, false
	}
	in := instance{service: s.Service, passing: true, weightPassing: s.Weights.Passing, weightWarning: s.Weights.Warning}
	if s.Kind == api.ServiceKindConnectProxy && s.Proxy != nil {
		in.service = s.Proxy.DestinationServiceName
	}
	var nodeAddr, nodeWAN string
	if n := e.Node; n != nil {
		in.node, nodeAddr, nodeWAN = n.Node, n.Address, n.TaggedAddresses["wan"]
	}
	for _, c := range e.Checks {
		switch c.Status {
		case api.HealthPassing:
		case api.HealthWarning:
			in.warning, in.passing = true, false
		default: // critical, maintenance
			in.critical, in.passing = true, false
		}
	}
	// Consul's BestAddress (agent/structs/structs.go): LAN is the service
	// address, then the node's; WAN is the service's wan tagged address
	// (with its port when it has one), the service address, the node's
	// wan tagged address, the node address.
	lanHost := cmp.Or(s.Address, nodeAddr)
	if lanHost == "" {
		return instance{}, false
	}
	in.lan = net.JoinHostPort(lanHost, strconv.Itoa(s.Port))
	for _, tag := range []string{taggedConsulVirtual, taggedVirtual} {
		if a, ok := s.TaggedAddresses[tag]; ok {
			if ip, err := netip.ParseAddr(a.Address); err == nil && !slices.Contains(in.virtual, ip.Unmap()) {
				in.virtual = append(in.virtual, ip.Unmap())
			}
		}
	}
	in.dialedDirectly = s.Proxy != nil && s.Proxy.TransparentProxy != nil && s.Proxy.TransparentProxy.DialedDirectly
	wanHost, wanPort := s.Address, s.Port
	if w, ok := s.TaggedAddresses["wan"]; ok && w.Address != "" {
		wanHost = w.Address
		if w.Port != 0 {
			wanPort = w.Port
		}
	}
	if wanHost == "" {
		wanHost = cmp.Or(nodeWAN, nodeAddr)
	}
	in.wan = net.JoinHostPort(wanHost, strconv.Itoa(wanPort))
	return in, true
}

// feed is one shared watch: its latest answer, and the channels to poke
// when it changes.
type feed struct {
	what   string
	refs   int // guarded by Catalog.mu
	cancel context.CancelFunc

	cur      atomic.Pointer[[]instance] // nil until the first answer
	answered atomic.Bool                // the first query finished, well or not

	mu   sync.Mutex
	subs map[chan struct{}]int
}

func (f *feed) subscribe(ch chan struct{}) {
	f.mu.Lock()
	f.subs[ch]++
	f.mu.Unlock()
}

func (f *feed) unsubscribe(ch chan struct{}) {
	f.mu.Lock()
	if f.subs[ch]--; f.subs[ch] <= 0 {
		delete(f.subs, ch)
	}
	f.mu.Unlock()
}

// publish stores a new answer (nil: only the first outcome, a failure) and
// pokes every subscriber without blocking.
func (f *feed) publish(ins *[]instance) {
	if ins != nil {
		f.cur.Store(ins)
	}
	f.answered.Store(true)
	f.mu.Lock()
	defer f.mu.Unlock()
	for ch := range f.subs {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
}

// instances returns the latest answer; ok is false before the first.
func (f *feed) instances() ([]instance, bool) {
	p := f.cur.Load()
	if p == nil {
		return nil, false
	}
	return *p, true
}

// acquire returns the feed of key in m, starting it with start when it is
// new, and subscribes ch to it. release undoes both; the last release
// stops the watch.
func (c *Catalog) acquire(m map[healthKey]*feed, gm map[string]*feed, hk healthKey, dc string, ch chan struct{}) (*feed, func()) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var f *feed
	if m != nil {
		f = m[hk]
	} else {
		f = gm[dc]
	}
	if f == nil {
		ctx, cancel := context.WithCancel(c.ctx)
		f = &feed{cancel: cancel, subs: map[chan struct{}]int{}}
		if m != nil {
			f.what = hk.String()
			m[hk] = f
			c.wg.Go(func() { c.watchHealth(ctx, hk, f) })
		} else {
			f.what = "mesh-gateways?dc=" + dc
			gm[dc] = f
			c.wg.Go(func() { c.watchGateways(ctx, dc, f) })
		}
	}
	f.refs++
	f.subscribe(ch)
	var once sync.Once
	return f, func() {
		once.Do(func() {
			f.unsubscribe(ch)
			c.mu.Lock()
			defer c.mu.Unlock()
			if f.refs--; f.refs > 0 {
				return
			}
			f.cancel()
			if m != nil {
				if m[hk] == f {
					delete(m, hk)
				}
			} else if gm[dc] == f {
				delete(gm, dc)
			}
		})
	}
}

// Health returns the shared watch of a target's instances.
func (c *Catalog) healthFeed(k healthKey, ch chan struct{}) (*feed, func()) {
	return c.acquire(c.health, nil, k, "", ch)
}

// gatewayFeed returns the shared watch of the mesh gateways of dc.
func (c *Catalog) gatewayFeed(dc string, ch chan struct{}) (*feed, func()) {
	return c.acquire(nil, c.gateways, healthKey{}, dc, ch)
}

// queryNS turns "default" into "", which Consul CE accepts everywhere.
func queryNS(s string) string {
	if s == "default" {
		return ""
	}
	return s
}

// peerServiceEntry is a /v1/health/connect entry with what
// api.AgentService lacks: Connect.PeerMeta of an imported instance.
type peerServiceEntry struct {
	Node    *api.Node
	Service *struct {
		api.AgentService
		Connect *struct {
			PeerMeta *struct {
				SNI      []string
				SpiffeID []string
			}
		}
	}
	Checks api.HealthChecks
}

// watchPeerHealth is watchHealth for a peer's imported service:
// /v1/health/connect/<service>?peer=<peer>. The instances are the
// exporting cluster's mesh gateways standing for the service, each with
// the SNI to send and the identities to accept.
func (c *Catalog) watchPeerHealth(ctx context.Context, k healthKey, f *feed) {
	watch.Loop(ctx, c.log, k.String(), watch.Backoff{}, func(ctx context.Context, index uint64) (uint64, error) {
		q := &api.QueryOptions{
			Peer: k.peer, Namespace: queryNS(k.namespace), Partition: queryNS(k.partition),
			Filter: k.filter, WaitIndex: index,
		}
		var entries []peerServiceEntry
		meta, err := c.client.Raw().Query("/v1/health/connect/"+url.PathEscape(k.service), &entries, q.WithContext(ctx))
		if err != nil {
			if !f.answered.Load() && ctx.Err() == nil {
				f.publish(nil)
			}
			return 0, fmt.Errorf("watching %s: %w", k, err)
		}
		ins := make([]instance, 0, len(entries))
		for _, e := range entries {
			if e.Service == nil {
				continue
			}
			svc := e.Service.AgentService
			in, ok := instanceOf(&api.ServiceEntry{Node: e.Node, Service: &svc, Checks: e.Checks})
			if !ok || e.Service.Connect == nil || e.Service.Connect.PeerMeta == nil {
				continue
			}
			pm := e.Service.Connect.PeerMeta
			if len(pm.SNI) == 0 || len(pm.SpiffeID) == 0 {
				continue
			}
			in.peerSNI, in.peerIDs = pm.SNI[0], strings.Join(pm.SpiffeID, ",")
			ins = append(ins, in)
		}
		f.publish(&ins)
		return meta.LastIndex, nil
	})
}

// watchHealth is a blocking watch of /v1/health/connect/<service> with the
// key's datacenter and filter, every instance included (the targets apply
// their own health rules), through the agent's cache.
func (c *Catalog) watchHealth(ctx context.Context, k healthKey, f *feed) {
	if k.peer != "" {
		c.watchPeerHealth(ctx, k, f)
		return
	}
	watch.Loop(ctx, c.log, k.String(), watch.Backoff{}, func(ctx context.Context, index uint64) (uint64, error) {
		q := &api.QueryOptions{
			Datacenter: k.datacenter, Namespace: queryNS(k.namespace), Partition: queryNS(k.partition),
			Filter: k.filter, WaitIndex: index, UseCache: true,
		}
		entries, meta, err := c.client.Health().Connect(k.service, "", false, q.WithContext(ctx))
		if err != nil {
			if !f.answered.Load() && ctx.Err() == nil {
				f.publish(nil)
			}
			return 0, fmt.Errorf("watching %s: %w", k, err)
		}
		ins := make([]instance, 0, len(entries))
		for _, e := range entries {
			if in, ok := instanceOf(e); ok {
				if e.Service.Kind == api.ServiceKindTerminatingGateway {
					// A terminating gateway the service is linked to
					// stands for it: dialed with the service's SNI, it
					// presents the service's leaf.
					in.service = k.service
				}
				ins = append(ins, in)
			}
		}
		f.publish(&ins)
		return meta.LastIndex, nil
	})
}

// meshGatewayFilter selects mesh gateways in /v1/catalog/services.
const meshGatewayFilter = `ServiceKind == "mesh-gateway"`

// watchGateways watches the names of dc's mesh gateway services
// (/v1/catalog/services filtered by kind, blocking) and, per name, its
// passing instances (/v1/health/service/<name>?passing, blocking). The
// feed's answer is every passing gateway instance.
func (c *Catalog) watchGateways(ctx context.Context, dc string, f *feed) {
	var (
		mu       sync.Mutex
		perName  = map[string][]instance{}
		children = map[string]context.CancelFunc{}
		wg       sync.WaitGroup
	)
	merge := func() {
		mu.Lock()
		var all []instance
		for _, ins := range perName {
			all = append(all, ins...)
		}
		mu.Unlock()
		slices.SortFunc(all, func(a, b instance) int { return cmp.Compare(a.lan, b.lan) })
		f.publish(&all)
	}
	defer func() {
		for _, cancel := range children {
			cancel()
		}
		wg.Wait()
	}()
	what := "catalog/services?dc=" + dc + "&filter=" + meshGatewayFilter
	watch.Loop(ctx, c.log, what, watch.Backoff{}, func(ctx context.Context, index uint64) (uint64, error) {
		q := &api.QueryOptions{Datacenter: dc, Filter: meshGatewayFilter, WaitIndex: index}
		svcs, meta, err := c.client.Catalog().Services(q.WithContext(ctx))
		if err != nil {
			if !f.answered.Load() && ctx.Err() == nil {
				f.publish(nil)
			}
			return 0, fmt.Errorf("listing mesh gateways in %s: %w", dc, err)
		}
		removed := false
		for name, cancel := range children {
			if _, ok := svcs[name]; !ok {
				cancel()
				delete(children, name)
				mu.Lock()
				delete(perName, name)
				mu.Unlock()
				removed = true
			}
		}
		if removed || len(svcs) == 0 {
			merge()
		}
		for name := range svcs {
			if _, ok := children[name]; ok {
				continue
			}
			cctx, cancel := context.WithCancel(ctx)
			children[name] = cancel
			wg.Go(func() {
				w := "health/service/" + name + "?dc=" + dc + "&passing"
				watch.Loop(cctx, c.log, w, watch.Backoff{}, func(ctx context.Context, index uint64) (uint64, error) {
					q := &api.QueryOptions{Datacenter: dc, WaitIndex: index}
					entries, meta, err := c.client.Health().Service(name, "", true, q.WithContext(ctx))
					if err != nil {
						if !f.answered.Load() && ctx.Err() == nil {
							f.publish(nil)
						}
						return 0, fmt.Errorf("watching mesh gateway %s in %s: %w", name, dc, err)
					}
					ins := make([]instance, 0, len(entries))
					for _, e := range entries {
						if e.Service == nil || e.Service.Kind != api.ServiceKindMeshGateway {
							continue
						}
						if in, ok := instanceOf(e); ok {
							ins = append(ins, in)
						}
					}
					mu.Lock()
					if cctx.Err() == nil {
						perName[name] = ins
					}
					mu.Unlock()
					merge()
					return meta.LastIndex, nil
				})
			})
		}
		return meta.LastIndex, nil
	})
}
