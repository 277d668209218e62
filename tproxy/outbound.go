package tproxy

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"

	"github.com/straitproxy/strait/config"
	"github.com/straitproxy/strait/internal/watch"
	"github.com/straitproxy/strait/upstream"
)

// DefaultMaxImplicitUpstreams bounds the implicit upstreams one proxy
// follows (each is a discovery chain watch and a health watch per target).
const DefaultMaxImplicitUpstreams = 2048

// OutboundOptions configure an Outbound.
type OutboundOptions struct {
	Client               *api.Client // required
	Service              string      // required: the proxied service
	Namespace, Partition string
	// Self returns the SPIFFE ID of the service's leaf, "" until known.
	Self func() string
	// Upstream returns the dependencies of an implicit upstream (client,
	// TLS, datacenter, tunnels, logger); Outbound adds a shared Catalog
	// and its OnAddresses hook. Required.
	Upstream func() upstream.Options
	// MaxUpstreams bounds the implicit upstreams followed; zero means
	// DefaultMaxImplicitUpstreams. Beyond it, the services that sort last
	// are left out (and logged).
	MaxUpstreams int
	Logger       hclog.Logger
}

// Outbound is the routing side of a transparent proxy's outbound
// listener: it follows the implicit upstreams (Implicit), runs an
// upstream (a discovery chain) for each, keeps the table of their
// addresses (Table), and watches the mesh config entry for
// TransparentProxy.MeshDestinationsOnly. The listener itself is the
// proxy's (package proxy), which calls Lookup for every connection.
type Outbound struct {
	opts     OutboundOptions
	log      hclog.Logger
	table    atomic.Pointer[Table]
	meshOnly atomic.Bool
	max      int

	mu        sync.Mutex
	upstreams map[string]*running
	dropped   int // implicit upstreams beyond max

	rebuild chan struct{}
	names   chan []string
	// ready is closed once the implicit upstreams are known and each has
	// its first chain and endpoints (or after readyTimeout).
	ready     chan struct{}
	readyOnce sync.Once
	haveNames bool // under Run's goroutine only
}

// readyTimeout bounds how long Ready waits for the first answers: an
// agent that does not answer must not hold connections forever.
const readyTimeout = 10 * time.Second

// Ready is closed once the routing table has every implicit upstream the
// intentions allow, each with its first discovery chain and endpoints, or
// readyTimeout after Run started. A connection accepted before waits for
// it (bounded by its own timeout) rather than being passed through for
// want of a route.
func (o *Outbound) Ready() <-chan struct{} { return o.ready }

// running is one implicit upstream and how to stop it.
type running struct {
	up   *upstream.Upstream
	stop context.CancelFunc
	done chan struct{}
}

// NewOutbound returns an Outbound; Run starts it.
func NewOutbound(o OutboundOptions) *Outbound {
	if o.Logger == nil {
		o.Logger = hclog.NewNullLogger()
	}
	max := o.MaxUpstreams
	if max <= 0 {
		max = DefaultMaxImplicitUpstreams
	}
	return &Outbound{opts: o, log: o.Logger.Named("outbound"), max: max, upstreams: map[string]*running{},
		rebuild: make(chan struct{}, 1), names: make(chan []string, 1), ready: make(chan struct{})}
}

// Lookup returns the route of a destination IP.
func (o *Outbound) Lookup(ip netip.Addr) (Route, bool) { return o.table.Load().Lookup(ip) }

// MeshDestinationsOnly reports the mesh entry's
// TransparentProxy.MeshDestinationsOnly: a destination outside the mesh is
// refused rather than passed through.
func (o *Outbound) MeshDestinationsOnly() bool { return o.meshOnly.Load() }

// Routes lists the routing table, for the admin listener.
func (o *Outbound) Routes() []RouteStatus { return o.table.Load().Routes() }

// Counts reports the implicit upstreams followed, those left out by the
// limit, and the addresses routed.
func (o *Outbound) Counts() (upstreams, dropped, routes int) {
	o.mu.Lock()
	upstreams, dropped = len(o.upstreams), o.dropped
	o.mu.Unlock()
	return upstreams, dropped, o.table.Load().Len()
}

// Run follows the implicit upstreams until ctx is done, then stops them.
func (o *Outbound) Run(ctx context.Context) {
	cat := upstream.NewCatalog(ctx, o.opts.Client, o.log)
	defer cat.Close()
	im := NewImplicit(ImplicitOptions{
		Client: o.opts.Client, Service: o.opts.Service, Namespace: o.opts.Namespace, Partition: o.opts.Partition,
		Self: o.opts.Self, Logger: o.log,
		OnChange: func(names []string) {
			select {
			case <-o.names: // drop a list not taken yet
			default:
			}
			o.names <- names
		},
	})
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() { im.Run(ctx) })
	wg.Go(func() { o.watchMesh(ctx) })
	defer o.stopAll()
	giveUp := time.NewTimer(readyTimeout)
	defer giveUp.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case names := <-o.names:
			o.haveNames = true
			o.follow(ctx, cat, names)
		case <-o.rebuild:
		case <-giveUp.C:
			o.readyOnce.Do(func() {
				o.log.Warn("routing without every implicit upstream's first answer", "waited", readyTimeout)
				close(o.ready)
			})
		}
		o.build()
	}
}

// follow starts an upstream for every new name and stops those no longer
// wanted.
func (o *Outbound) follow(ctx context.Context, cat *upstream.Catalog, names []string) {
	dropped := 0
	if len(names) > o.max {
		dropped = len(names) - o.max
		o.log.Warn("more implicit upstreams than the limit; the rest are not reachable by virtual IP",
			"upstreams", len(names), "limit", o.max, "left_out_from", names[o.max])
		names = names[:o.max]
	}
	o.mu.Lock()
	o.dropped = dropped
	var stop []*running
	for name, r := range o.upstreams {
		if !slices.Contains(names, name) {
			stop = append(stop, r)
			delete(o.upstreams, name)
			o.log.Info("implicit upstream removed", "upstream", name)
		}
	}
	var start []string
	for _, name := range names {
		if _, ok := o.upstreams[name]; !ok {
			start = append(start, name)
		}
	}
	o.mu.Unlock()
	for _, r := range stop {
		r.stop()
		<-r.done
	}
	for _, name := range start {
		uo := o.opts.Upstream()
		uo.Catalog = cat
		uo.OnAddresses = o.kick
		if uo.Logger != nil {
			uo.Logger = uo.Logger.With("upstream", name, "implicit", true)
		}
		cfg := config.Upstream{DestinationName: name, Implicit: true,
			DestinationNamespace: o.opts.Namespace, DestinationPartition: o.opts.Partition}
		up, err := upstream.New(cfg, uo)
		if err != nil {
			o.log.Error("implicit upstream not started", "upstream", name, "error", err)
			continue
		}
		uctx, cancel := context.WithCancel(ctx)
		r := &running{up: up, stop: cancel, done: make(chan struct{})}
		go func() {
			defer close(r.done)
			up.Run(uctx)
		}()
		o.mu.Lock()
		o.upstreams[name] = r
		o.mu.Unlock()
		o.log.Debug("implicit upstream started", "upstream", name)
	}
}

func (o *Outbound) kick() {
	select {
	case o.rebuild <- struct{}{}:
	default:
	}
}

// build replaces the table with one of the running upstreams' addresses.
func (o *Outbound) build() {
	o.mu.Lock()
	claims := make([]Claim, 0, len(o.upstreams))
	for name, r := range o.upstreams {
		claims = append(claims, Claim{Name: name, Dialer: r.up, Addresses: r.up.Addresses()})
	}
	o.mu.Unlock()
	allReady := o.haveNames
	for _, c := range claims {
		select {
		case <-c.Dialer.Ready():
		default:
			allReady = false
		}
	}
	t, conflicts := NewTable(claims)
	for _, c := range conflicts {
		o.log.Warn("two upstreams claim one address; routing it to one of them", "addr", c.Addr, "routed_to", c.Kept, "not", c.Dropped)
	}
	if old := o.table.Swap(t); old.Len() != t.Len() {
		o.log.Debug("outbound routes", "addresses", t.Len(), "upstreams", len(claims))
	}
	if allReady {
		o.readyOnce.Do(func() { close(o.ready) })
	}
}

// stopAll stops every implicit upstream and waits for them.
func (o *Outbound) stopAll() {
	o.mu.Lock()
	rs := o.upstreams
	o.upstreams = map[string]*running{}
	o.mu.Unlock()
	for _, r := range rs {
		r.stop()
	}
	for _, r := range rs {
		<-r.done
	}
}

// watchMesh follows the mesh entry's MeshDestinationsOnly (a blocking list
// of mesh entries, which answers, and blocks, even when none exists).
func (o *Outbound) watchMesh(ctx context.Context) {
	watch.Loop(ctx, o.log, "config/"+api.MeshConfig, watch.Backoff{}, func(ctx context.Context, index uint64) (uint64, error) {
		q := &api.QueryOptions{WaitIndex: index, Partition: o.opts.Partition}
		es, meta, err := o.opts.Client.ConfigEntries().List(api.MeshConfig, q.WithContext(ctx))
		if err != nil {
			return 0, fmt.Errorf("outbound: list mesh config entries: %w", err)
		}
		only := false
		for _, e := range es {
			if me, ok := e.(*api.MeshConfigEntry); ok {
				only = me.TransparentProxy.MeshDestinationsOnly
			}
		}
		if o.meshOnly.Swap(only) != only {
			o.log.Info("mesh destinations only", "enabled", only)
		}
		return meta.LastIndex, nil
	})
}
