package upstream

import (
	"context"
	"encoding/json"
	"math"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/straitproxy/strait/config"
	"github.com/straitproxy/strait/internal/testutil"
)

// TestCompileChain: the chain as Consul's HTTP API returns it (JSON, with
// durations as text) decodes into legs of resolvers with their targets in
// failover order; nested splitters multiply their weights; a router
// contributes its last (default) route only and counts the others;
// partition and peer come from the target IDs.
func TestCompileChain(t *testing.T) {
	t.Parallel()
	roundTrip := func(t *testing.T, c *api.CompiledDiscoveryChain) *api.CompiledDiscoveryChain {
		t.Helper()
		b, err := json.Marshal(api.DiscoveryChainResponse{Chain: c})
		if err != nil {
			t.Fatal(err)
		}
		var out api.DiscoveryChainResponse
		if err := json.Unmarshal(b, &out); err != nil {
			t.Fatal(err)
		}
		return out.Chain
	}

	t.Run("resolver with failover", func(t *testing.T) {
		v1, v2, dc2 := tgt("db", "v1", "dc1"), tgt("db", "v2", "dc1"), tgt("db", "v1", "dc2")
		v1.ConnectTimeout = 7 * time.Second
		v1.Subset = api.ServiceResolverSubset{Filter: `Service.Meta.version == "v1"`, OnlyPassing: true}
		v1.MeshGateway.Mode = api.MeshGatewayModeLocal
		b := newChain("db")
		c := b.resolve(v1, &api.LoadBalancer{Policy: "ring_hash", HashPolicies: []api.HashPolicy{{SourceIP: true}, {Field: "header", FieldValue: "x-user"}}}, v2, dc2)
		c.Nodes[c.StartNode].Resolver.ConnectTimeout = 7 * time.Second
		p, err := compile(roundTrip(t, c))
		if err != nil {
			t.Fatal(err)
		}
		if len(p.legs) != 1 || p.legs[0].weight != 1 {
			t.Fatalf("legs = %+v, want one of weight 1", p.legs)
		}
		r := p.legs[0].res
		if want := []string{v1.ID, v2.ID, dc2.ID}; !slices.Equal(r.targets, want) {
			t.Errorf("targets = %v, want %v (primary, then failover in order)", r.targets, want)
		}
		if r.connectTimeout != 7*time.Second {
			t.Errorf("connect timeout %v, want 7s", r.connectTimeout)
		}
		if r.lb.Policy != PolicyRingHash || !r.lb.SourceIP || r.lb.RingSize != defaultMinRingSize || len(p.lbIgnored) != 1 {
			t.Errorf("balancer %+v, ignored %v", r.lb, p.lbIgnored)
		}
		got := p.targets[v1.ID]
		want := Target{
			ID: v1.ID, Service: "db", ServiceSubset: "v1", Namespace: "default", Partition: "default", Datacenter: "dc1",
			MeshGateway: "local", Filter: `Service.Meta.version == "v1"`, OnlyPassing: true,
			ConnectTimeout: 7 * time.Second, SNI: v1.SNI,
		}
		if got != want {
			t.Errorf("target\n got %+v\nwant %+v", got, want)
		}
		if p.targets[dc2.ID].Datacenter != "dc2" {
			t.Errorf("failover target %+v", p.targets[dc2.ID])
		}
	})

	t.Run("router and nested splitters", func(t *testing.T) {
		b := newChain("web")
		rv1 := b.resolver(tgt("web", "v1", "dc1"), nil)
		rv2 := b.resolver(tgt("web", "v2", "dc1"), nil)
		rv3 := b.resolver(tgt("web", "v3", "dc1"), nil)
		inner := b.splitter("canary", &api.DiscoverySplit{Weight: 50, NextNode: rv2}, &api.DiscoverySplit{Weight: 50, NextNode: rv3})
		outer := b.splitter("web", &api.DiscoverySplit{Weight: 90, NextNode: rv1}, &api.DiscoverySplit{Weight: 10, NextNode: inner},
			&api.DiscoverySplit{Weight: 0, NextNode: "missing-but-unused"})
		other := b.resolver(tgt("admin", "", "dc1"), nil)
		c := b.start(b.router("web", other, other, outer))
		p, err := compile(roundTrip(t, c))
		if err != nil {
			t.Fatal(err)
		}
		if p.routerMatches != 2 || p.protocol != "http" {
			t.Errorf("router matches %d, protocol %q", p.routerMatches, p.protocol)
		}
		got := map[string]float64{}
		for _, l := range p.legs {
			got[l.res.targets[0]] += l.weight
		}
		want := map[string]float64{"v1.web.default.default.dc1": 0.9, "v2.web.default.default.dc1": 0.05, "v3.web.default.default.dc1": 0.05}
		if len(got) != len(want) {
			t.Fatalf("legs %v, want %v", got, want)
		}
		for id, w := range want {
			if math.Abs(got[id]-w) > 1e-9 {
				t.Errorf("leg %s weight %v, want %v", id, got[id], w)
			}
		}
		if _, ok := p.targets["admin.default.default.dc1"]; ok {
			t.Error("a route with matches contributed a target")
		}
	})

	t.Run("peer target", func(t *testing.T) {
		pt := &api.DiscoveryTarget{ID: "db.default.default.external.other", Service: "db", Namespace: "default", SNI: "x"}
		got, err := targetOf(pt)
		if err != nil || got.Peer != "other" || got.Partition != "default" || got.ConnectTimeout != DefaultChainConnectTimeout {
			t.Errorf("peer target = %+v, %v", got, err)
		}
	})

	t.Run("malformed", func(t *testing.T) {
		ok := newChain("db").resolve(tgt("db", "", "dc1"), nil)
		for name, mutate := range map[string]func(c *api.CompiledDiscoveryChain){
			"missing start":  func(c *api.CompiledDiscoveryChain) { c.StartNode = "nope" },
			"missing target": func(c *api.CompiledDiscoveryChain) { clear(c.Targets) },
			"bad target ID":  func(c *api.CompiledDiscoveryChain) { c.Targets["db.default.default.dc1"].ID = "x.y" },
			"unknown type":   func(c *api.CompiledDiscoveryChain) { c.Nodes[c.StartNode].Type = "teleporter" },
			"cycle": func(c *api.CompiledDiscoveryChain) {
				c.Nodes["splitter:a"] = &api.DiscoveryGraphNode{Type: "splitter", Splits: []*api.DiscoverySplit{{Weight: 100, NextNode: "splitter:a"}}}
				c.StartNode = "splitter:a"
			},
		} {
			c := roundTrip(t, ok)
			mutate(c)
			if _, err := compile(c); err == nil {
				t.Errorf("%s: compiled", name)
			}
		}
	})
}

func TestBalancerOf(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		in   *api.LoadBalancer
		want Balancer
	}{
		{nil, Balancer{Policy: PolicyLeastRequest, ChoiceCount: 2}},
		{&api.LoadBalancer{Policy: "least_request", LeastRequestConfig: &api.LeastRequestConfig{ChoiceCount: 5}}, Balancer{Policy: PolicyLeastRequest, ChoiceCount: 5}},
		{&api.LoadBalancer{Policy: "round_robin"}, Balancer{Policy: PolicyRoundRobin}},
		{&api.LoadBalancer{Policy: "maglev", HashPolicies: []api.HashPolicy{{SourceIP: true}}}, Balancer{Policy: PolicyMaglev, SourceIP: true}},
		{&api.LoadBalancer{Policy: "ring_hash", RingHashConfig: &api.RingHashConfig{MinimumRingSize: 1 << 20}}, Balancer{Policy: PolicyRingHash, RingSize: capRingSize}},
	} {
		got := balancerOf(tc.in)
		if got.Policy != tc.want.Policy || got.ChoiceCount != tc.want.ChoiceCount || got.SourceIP != tc.want.SourceIP || got.RingSize != tc.want.RingSize {
			t.Errorf("balancerOf(%+v) = %+v, want %+v", tc.in, got, tc.want)
		}
	}
}

// TestChainRequestCarriesOverrides: the chain is asked for by POST with the
// upstream's protocol, connect timeout and mesh gateway mode, compiled in
// the upstream's datacenter, and watched with blocking queries.
func TestChainRequestCarriesOverrides(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	cfg := serviceUpstream("db")
	cfg.Datacenter, cfg.Protocol, cfg.MeshGatewayMode, cfg.ConnectTimeout = "dc2", "http", config.MeshGatewayRemote, 1500*time.Millisecond
	u := newUpstream(t, cfg, f.options(t))
	run(t, u)
	waitReady(t, u)
	f.agent.setChain("other", nil) // a change: the watch's next query returns
	testutil.Eventually(t, "a blocking chain query", func() bool {
		for _, r := range f.agent.chainRequests() {
			if r.query.Get("index") != "" {
				return true
			}
		}
		return false
	})
	r := f.agent.chainRequests()[0]
	if r.method != "POST" || r.query.Get("compile-dc") != "dc2" || r.query.Get("dc") != "" {
		t.Errorf("chain request %s %v", r.method, r.query)
	}
	var body map[string]any
	if err := json.Unmarshal([]byte(r.body), &body); err != nil {
		t.Fatalf("body %q: %v", r.body, err)
	}
	mg, _ := body["OverrideMeshGateway"].(map[string]any)
	if body["OverrideProtocol"] != "http" || body["OverrideConnectTimeout"] != float64(1500*time.Millisecond) || mg["Mode"] != "remote" {
		t.Errorf("overrides %v", body)
	}

	// Without overrides: a GET, no body.
	g := newFixture(t)
	plain := newUpstream(t, config.Upstream{DestinationName: "db", LocalBindPort: 9191}, g.options(t))
	run(t, plain)
	waitReady(t, plain)
	if r := g.agent.chainRequests()[0]; r.method != "GET" {
		t.Errorf("chain request without overrides: %s %q", r.method, r.body)
	}
}

// TestFailoverToNextTarget: new connections use the primary target while
// it has healthy instances, the failover target while it has none, and the
// primary again once it recovers; a dial that fails on every endpoint of
// the primary goes on to the failover target within the same Dial.
func TestFailoverToNextTarget(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	v1 := startTLSServer(t, f.ca, "db")
	v2 := startTLSServer(t, f.ca, "db")
	entry := func(node string, port int, version, status string) *api.ServiceEntry {
		e := proxyEntry(node, "db", port, status)
		e.Service.Meta = map[string]string{"version": version}
		return e
	}
	t1, t2 := tgt("db", "v1", "dc1"), tgt("db", "v2", "dc1")
	t1.Subset.Filter, t2.Subset.Filter = `Service.Meta.version == "v1"`, `Service.Meta.version == "v2"`
	f.agent.setChain("db", newChain("db").resolve(t1, nil, t2))
	f.agent.setEntries(entry("n1", v1.port, "v1", api.HealthPassing), entry("n2", v2.port, "v2", api.HealthPassing))
	u := newUpstream(t, serviceUpstream("db"), f.options(t))
	run(t, u)
	waitReady(t, u)

	active := func() string {
		c := u.Chain()
		if c == nil || len(c.Legs) != 1 {
			return ""
		}
		return c.Legs[0].Active
	}
	for range 5 {
		if r := dialOK(t, u, "db"); r.Addr != v1.addr || r.Target != t1.ID {
			t.Fatalf("dialed %s (%s), want the primary %s", r.Addr, r.Target, v1.addr)
		}
	}
	if got, _ := targetStatus(u, t1.ID); !got.Active || got.SNI != t1.SNI || len(got.Endpoints) != 1 {
		t.Errorf("status of the primary: %+v", got)
	}

	// The primary's instance turns critical: failover.
	f.agent.setEntries(entry("n1", v1.port, "v1", api.HealthCritical), entry("n2", v2.port, "v2", api.HealthPassing))
	testutil.Eventually(t, "the failover target to be active", func() bool { return active() == t2.ID })
	for range 5 {
		if r := dialOK(t, u, "db"); r.Addr != v2.addr || r.Target != t2.ID {
			t.Fatalf("dialed %s (%s), want the failover %s", r.Addr, r.Target, v2.addr)
		}
	}
	// And back.
	f.agent.setEntries(entry("n1", v1.port, "v1", api.HealthPassing), entry("n2", v2.port, "v2", api.HealthPassing))
	testutil.Eventually(t, "the primary to be active again", func() bool { return active() == t1.ID })
	if r := dialOK(t, u, "db"); r.Addr != v1.addr {
		t.Fatalf("dialed %s after recovery, want %s", r.Addr, v1.addr)
	}
	if got := v1.sawSNIs(); got[len(got)-1] != t1.SNI {
		t.Errorf("SNI %q, want the subset's %q", got[len(got)-1], t1.SNI)
	}

	// The primary's endpoint refuses: the same Dial goes on to v2.
	dead := closedPort(t)
	f.agent.setEntries(entry("n1", dead, "v1", api.HealthPassing), entry("n2", v2.port, "v2", api.HealthPassing))
	testutil.Eventually(t, "the dead primary endpoint", func() bool {
		st, _ := targetStatus(u, t1.ID)
		return len(st.Endpoints) == 1 && strings.HasSuffix(st.Endpoints[0].Addr, ":"+strconv.Itoa(dead))
	})
	r := dialOK(t, u, "db")
	if r.Addr != v2.addr || r.Attempts < 2 {
		t.Errorf("dial with a dead primary: %+v, want v2 after the primary's attempts", r)
	}
	// The primary's only endpoint is ejected now: the next connection
	// starts with v2 at once.
	if active() != t2.ID {
		t.Errorf("active = %q with the primary ejected", active())
	}
	if r := dialOK(t, u, "db"); r.Attempts != 1 || r.Addr != v2.addr {
		t.Errorf("dial after ejection: %+v", r)
	}
}

// TestSplitterWeights: a 90/10 splitter sends about 90% of connections to
// its first leg.
func TestSplitterWeights(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	v1 := startTLSServer(t, f.ca, "db")
	v2 := startTLSServer(t, f.ca, "db")
	entry := func(node string, port int, version string) *api.ServiceEntry {
		e := proxyEntry(node, "db", port, api.HealthPassing)
		e.Service.Meta = map[string]string{"version": version}
		return e
	}
	t1, t2 := tgt("db", "v1", "dc1"), tgt("db", "v2", "dc1")
	t1.Subset.Filter, t2.Subset.Filter = `Service.Meta.version == "v1"`, `Service.Meta.version == "v2"`
	b := newChain("db")
	r1, r2 := b.resolver(t1, nil), b.resolver(t2, nil)
	f.agent.setChain("db", b.start(b.splitter("db", &api.DiscoverySplit{Weight: 90, NextNode: r1}, &api.DiscoverySplit{Weight: 10, NextNode: r2})))
	f.agent.setEntries(entry("n1", v1.port, "v1"), entry("n2", v2.port, "v2"))
	u := newUpstream(t, serviceUpstream("db"), f.options(t))
	run(t, u)
	waitReady(t, u)

	// The draw, many times.
	const n = 20000
	counts := map[string]int{}
	snap := u.snap.Load()
	for range n {
		counts[snap.pickLeg().targets[0].ID]++
	}
	if got := float64(counts[t1.ID]) / n; math.Abs(got-0.9) > 0.015 {
		t.Errorf("first leg drawn %.3f of the time, want 0.9", got)
	}
	// Real connections.
	dialed := map[string]int{}
	for range 200 {
		r := dialOK(t, u, "db")
		dialed[r.Addr]++
	}
	if dialed[v2.addr] == 0 || dialed[v1.addr] < 150 {
		t.Errorf("connections per endpoint %v, want about 180/20", dialed)
	}
}

// targetStatus is the status of target id in u's chain.
func targetStatus(u *Upstream, id string) (TargetStatus, bool) {
	c := u.Chain()
	if c == nil {
		return TargetStatus{}, false
	}
	for _, t := range c.Targets {
		if t.ID == id {
			return t, true
		}
	}
	return TargetStatus{}, false
}

// gatewayEntry is a mesh gateway instance in dc whose LAN and WAN addresses
// are 127.0.0.1 with the given ports.
func gatewayEntry(dc string, lanPort, wanPort int) *api.ServiceEntry {
	return &api.ServiceEntry{
		Node: &api.Node{Node: "gw-" + dc, Address: "127.0.0.1", Datacenter: dc},
		Service: &api.AgentService{
			Kind: api.ServiceKindMeshGateway, ID: "mesh-gateway", Service: "mesh-gateway", Address: "127.0.0.1", Port: lanPort,
			TaggedAddresses: map[string]api.ServiceAddress{"lan": {Address: "127.0.0.1", Port: lanPort}, "wan": {Address: "127.0.0.1", Port: wanPort}},
		},
		Checks: api.HealthChecks{{Node: "gw-" + dc, CheckID: "gw", Status: api.HealthPassing}},
	}
}

// TestDialThroughMeshGateways: a target in dc2 is dialed through dc1's
// gateways on their LAN address (mode local) or dc2's on their WAN address
// (mode remote), found through the catalog, with the target's SNI and the
// final service's identity; the target's own instance (unreachable from
// here) is never dialed. The fake "gateway" is a TLS server with db's
// certificate, as the real path ends at db's proxy.
func TestDialThroughMeshGateways(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{config.MeshGatewayLocal, config.MeshGatewayRemote} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			f := newFixture(t)
			gw := startTLSServerOpts(t, f.ca, "db", nil, testutil.LeafOptions{Datacenter: "dc2"})
			dead := closedPort(t)
			inst := proxyEntry("n-dc2", "db", closedPort(t), api.HealthPassing)
			inst.Node.Datacenter = "dc2"
			f.agent.setEntries(inst)
			if mode == config.MeshGatewayLocal {
				f.agent.setGateways("dc1", gatewayEntry("dc1", gw.port, dead))
				f.agent.setGateways("dc2", gatewayEntry("dc2", dead, dead))
			} else {
				f.agent.setGateways("dc1", gatewayEntry("dc1", dead, dead))
				f.agent.setGateways("dc2", gatewayEntry("dc2", dead, gw.port))
			}
			target := tgt("db", "", "dc2")
			target.MeshGateway.Mode = api.MeshGatewayMode(mode)
			f.agent.setChain("db", newChain("db").resolve(target, nil))
			u := newUpstream(t, serviceUpstream("db"), f.options(t))
			run(t, u)
			waitReady(t, u)

			r := dialOK(t, u, "db")
			if r.Addr != gw.addr || r.Gateway != mode || r.Target != target.ID || r.Attempts != 1 {
				t.Errorf("dialed %+v, want the %s gateway %s", r, mode, gw.addr)
			}
			if got := gw.sawSNIs(); len(got) != 1 || got[0] != target.SNI {
				t.Errorf("SNI %q, want the target's %q", got, target.SNI)
			}
			st, _ := targetStatus(u, target.ID)
			if st.Via != mode || !st.Active {
				t.Errorf("target status %+v", st)
			}

			// The target's instance goes critical: no endpoint, though the
			// gateway is up.
			inst.Checks[0].Status = api.HealthCritical
			f.agent.setEntries(inst)
			testutil.Eventually(t, "the target to lose its endpoints", func() bool {
				st, _ := targetStatus(u, target.ID)
				return len(st.Endpoints) == 0
			})
		})
	}
}

// TestTargetConnectTimeout: an attempt on a target takes at most the
// target's own resolver timeout, so a primary that black-holes its dials
// hands over to the failover target long before the chain's timeout.
func TestTargetConnectTimeout(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	_, holePort := startBlackHole(t)
	backup := startTLSServer(t, f.ca, "backup")
	t1, t2 := tgt("db", "", "dc1"), tgt("backup", "", "dc1")
	t1.ConnectTimeout = 300 * time.Millisecond
	c := newChain("db").resolve(t1, nil, t2)
	c.Nodes[c.StartNode].Resolver.ConnectTimeout = 10 * time.Second
	f.agent.setChain("db", c)
	f.agent.setEntries(proxyEntry("n1", "db", holePort, api.HealthPassing), proxyEntry("n2", "backup", backup.port, api.HealthPassing))
	u := newUpstream(t, serviceUpstream("db"), f.options(t))
	run(t, u)
	waitReady(t, u)

	start := time.Now()
	r := dialOK(t, u, "backup")
	if elapsed := time.Since(start); elapsed > 2*time.Second {
		t.Errorf("failover after %v; the primary's timeout is 300ms (the chain's 10s halved would be 5s)", elapsed)
	}
	if r.Target != t2.ID || r.Attempts != 2 {
		t.Errorf("dial %+v, want the failover target on attempt 2", r)
	}
}

// TestRouterMatchesLoggedOnce: a router's routes with matches cannot apply
// at L4; strait says so once per chain, not on every answer, and uses the
// default route.
func TestRouterMatchesLoggedOnce(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	srv := startTLSServer(t, f.ca, "db")
	b := newChain("db")
	def := b.resolver(tgt("db", "", "dc1"), nil)
	admin := b.resolver(tgt("admin", "", "dc1"), nil)
	f.agent.setChain("db", b.start(b.router("db", admin, def)))
	f.agent.setEntries(proxyEntry("n1", "db", srv.port, api.HealthPassing))
	u := newUpstream(t, serviceUpstream("db"), f.options(t))
	run(t, u)
	waitReady(t, u)
	for range 3 {
		before := len(f.agent.chainRequests())
		f.agent.setChain("unrelated", nil) // wakes the blocking chain query
		testutil.Eventually(t, "another chain answer", func() bool { return len(f.agent.chainRequests()) > before })
	}
	if n := strings.Count(f.logs.String(), "strait uses only its default route"); n != 1 {
		t.Errorf("router warning logged %d times, want once:\n%s", n, f.logs.String())
	}
	if r := dialOK(t, u, "db"); r.Target != "db.default.default.dc1" {
		t.Errorf("dialed %+v, want the default route's target", r)
	}
	if c := u.Chain(); c.IgnoredRouterRoutes != 1 || len(c.Targets) != 1 {
		t.Errorf("chain status %+v", c)
	}
}

// TestTerminatingGatewayStandsForLinkedService: Consul lists the terminating
// gateways a service is linked to among its connect instances, under the
// gateway's own name; the upstream dials such an entry as the service (its
// SNI, its SPIFFE ID: the gateway presents the service's leaf).
func TestTerminatingGatewayStandsForLinkedService(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	srv := startTLSServer(t, f.ca, "db")
	f.agent.setEntries(&api.ServiceEntry{
		Node: &api.Node{Node: "n1", Address: "127.0.0.1", Datacenter: "dc1"},
		Service: &api.AgentService{
			Kind: api.ServiceKindTerminatingGateway, ID: "tgw", Service: "tgw", Port: srv.port,
			Meta: map[string]string{"test-linked-service": "db"},
		},
		Checks: api.HealthChecks{{Node: "n1", CheckID: "c-n1", Status: api.HealthPassing}},
	})
	u := newUpstream(t, serviceUpstream("db"), f.options(t))
	run(t, u)
	waitReady(t, u)
	if r := dialOK(t, u, "db"); r.Target != "db.default.default.dc1" {
		t.Errorf("dialed %+v, want db's target through its terminating gateway", r)
	}
}

// TestCatalogSharesWatches: upstreams (and targets) that need the same
// health query share one watch of a shared Catalog; the watch stops with
// its last user, and Close joins everything.
func TestCatalogSharesWatches(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	srv := startTLSServer(t, f.ca, "db")
	f.agent.setEntries(proxyEntry("n1", "db", srv.port, api.HealthPassing))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cat := NewCatalog(ctx, f.agent.client(t), nil)
	opts := f.options(t)
	opts.Catalog = cat
	var us []*Upstream
	stops := []func(){}
	for port := range 3 {
		cfg := serviceUpstream("db")
		cfg.LocalBindPort = 9000 + port
		u := newUpstream(t, cfg, opts)
		uctx, ucancel := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() {
			defer close(done)
			u.Run(uctx)
		}()
		stops = append(stops, func() { ucancel(); <-done })
		us = append(us, u)
	}
	for _, u := range us {
		waitReady(t, u)
		dialOK(t, u, "db")
	}
	cat.mu.Lock()
	n := len(cat.health)
	refs := 0
	for _, fd := range cat.health {
		refs = fd.refs
	}
	cat.mu.Unlock()
	if n != 1 || refs != 3 {
		t.Errorf("%d health watches with %d users, want 1 shared by 3", n, refs)
	}
	for _, stop := range stops {
		stop()
	}
	cat.mu.Lock()
	n = len(cat.health)
	cat.mu.Unlock()
	if n != 0 {
		t.Errorf("%d health watches left after every upstream stopped", n)
	}
	done := make(chan struct{})
	go func() {
		cat.Close()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Catalog.Close did not return")
	}
}
