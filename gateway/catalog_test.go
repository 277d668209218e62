package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/straitproxy/strait/internal/testutil"
)

// fakeAgent answers the agent endpoints the Catalog watches, with
// blocking queries: a request whose index is current waits for a change.
// It is a unit-test fake; the integration tests run the real agent.
type fakeAgent struct {
	mu        sync.Mutex
	index     uint64
	changed   chan struct{}
	services  map[string][]string
	resolvers []*api.ServiceResolverConfigEntry
	// health answers /v1/health/connect/<svc>, per service.
	health map[string][]*api.ServiceEntry
	// gateways answers dc2's mesh gateway queries.
	gateways []*api.ServiceEntry
	// healthReqs records "<service>|<filter>" of every health/connect
	// request.
	healthReqs []string
}

func newFakeAgent(t *testing.T) (*fakeAgent, *api.Client) {
	f := &fakeAgent{index: 10, changed: make(chan struct{}), services: map[string][]string{}, health: map[string][]*api.ServiceEntry{}}
	srv := httptest.NewServer(http.HandlerFunc(f.serve))
	t.Cleanup(srv.Close)
	client, err := api.NewClient(&api.Config{Address: strings.TrimPrefix(srv.URL, "http://")})
	if err != nil {
		t.Fatal(err)
	}
	return f, client
}

func (f *fakeAgent) update(fn func()) {
	f.mu.Lock()
	fn()
	f.index++
	close(f.changed)
	f.changed = make(chan struct{})
	f.mu.Unlock()
}

func (f *fakeAgent) serve(w http.ResponseWriter, r *http.Request) {
	idx, _ := strconv.ParseUint(r.URL.Query().Get("index"), 10, 64)
	f.mu.Lock()
	if idx >= f.index {
		ch := f.changed
		f.mu.Unlock()
		select {
		case <-ch:
		case <-r.Context().Done():
			return
		case <-time.After(30 * time.Second): // as a blocking query's wait
		}
		f.mu.Lock()
	}
	defer f.mu.Unlock()
	w.Header().Set("X-Consul-Index", strconv.FormatUint(f.index, 10))
	q := r.URL.Query()
	var v any
	switch p := r.URL.Path; {
	case p == "/v1/agent/self":
		v = map[string]any{"Config": map[string]any{"Datacenter": "dc1"}}
	case p == "/v1/agent/connect/ca/roots":
		v = map[string]any{"TrustDomain": testTD, "Roots": []any{}}
	case p == "/v1/catalog/datacenters":
		v = []string{"dc1", "dc2"}
	case p == "/v1/catalog/services" && q.Get("dc") == "dc2":
		v = map[string][]string{"mesh-gateway": {}}
	case p == "/v1/catalog/services":
		v = f.services
	case p == "/v1/config/service-resolver":
		v = f.resolvers
	case p == "/v1/health/service/mesh-gateway" && q.Get("dc") == "dc2":
		v = f.gateways
	case strings.HasPrefix(p, "/v1/health/connect/"):
		svc := strings.TrimPrefix(p, "/v1/health/connect/")
		f.healthReqs = append(f.healthReqs, svc+"|"+q.Get("filter"))
		eps := f.health[svc]
		if eps == nil {
			eps = []*api.ServiceEntry{}
		}
		v = eps
	default:
		http.NotFound(w, r)
		return
	}
	json.NewEncoder(w).Encode(v)
}

func (f *fakeAgent) requests() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.healthReqs...)
}

func instance(addr string, port int) *api.ServiceEntry {
	return &api.ServiceEntry{
		Node:    &api.Node{Node: "n1", Address: "10.0.0.1"},
		Service: &api.AgentService{ID: "p-" + addr, Kind: api.ServiceKindConnectProxy, Address: addr, Port: port},
	}
}

func startCatalog(t *testing.T, client *api.Client, opts CatalogOptions) *Catalog {
	opts.Client = client
	c := NewCatalog(opts)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { c.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	select {
	case <-c.Ready():
	case <-time.After(testutil.Timeout):
		t.Fatal("catalog not ready")
	}
	return c
}

func route(t *testing.T, c *Catalog, sni string) (*Target, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return c.Route(ctx, sni)
}

func routeResult(err error) string {
	var re *RouteError
	if errors.As(err, &re) {
		return re.Result + "/" + re.Reason
	}
	return ""
}

// TestCatalogWatchesLazilyAndBounded: a name not in the catalog starts no
// watch; names in it start one each on their first connection, at most
// MaxWatches: the least recently used idle one makes room, and with every
// watched target busy a new one is refused.
func TestCatalogWatchesLazilyAndBounded(t *testing.T) {
	t.Parallel()
	f, client := newFakeAgent(t)
	f.update(func() {
		for i, s := range []string{"a", "b", "c"} {
			f.services[s] = nil
			f.health[s] = []*api.ServiceEntry{instance("10.0.1.1", 20000+i)}
		}
	})
	c := startCatalog(t, client, CatalogOptions{MaxWatches: 2})
	if _, err := route(t, c, sniOf("zzz")); routeResult(err) != ResultUnknownSNI+"/"+UnknownService {
		t.Fatalf("unknown service: %v", err)
	}
	if reqs := f.requests(); len(reqs) != 0 {
		t.Fatalf("an unknown name queried Consul: %v", reqs)
	}
	ta, err := route(t, c, sniOf("a"))
	if err != nil || len(ta.snapshot()) != 1 {
		t.Fatalf("a: %v", err)
	}
	// Connections cost no Consul request: the watch answers them all.
	before := len(f.requests())
	for range 50 {
		if _, err := route(t, c, sniOf("a")); err != nil {
			t.Fatal(err)
		}
	}
	if n := len(f.requests()) - before; n > 0 {
		t.Fatalf("50 routes of a watched name made %d health requests", n)
	}
	tb, err := route(t, c, sniOf("b"))
	if err != nil {
		t.Fatal(err)
	}
	if n := len(c.Routes().Local); n != 2 {
		t.Fatalf("%d local watches, want 2", n)
	}
	tb.touch() // b used more recently than a
	if _, err := route(t, c, sniOf("c")); err != nil {
		t.Fatalf("c, with a idle: %v", err)
	}
	names := map[string]bool{}
	for _, l := range c.Routes().Local {
		names[l.Target] = true
	}
	if !names["b"] || !names["c"] || names["a"] {
		t.Fatalf("watched %v, want b and c (a evicted as least recently used)", names)
	}
	// b and c busy: no room for a.
	for _, l := range []string{"b", "c"} {
		tgt, _ := route(t, c, sniOf(l))
		tgt.conns.Add(1)
		defer tgt.conns.Add(-1)
	}
	if _, err := route(t, c, sniOf("a")); routeResult(err) != ResultWatchLimit+"/" {
		t.Fatalf("a with every watch busy: %v, want watch_limit", err)
	}
}

// TestCatalogFollowsResolversAndCatalog: a subset's watch filters with
// the resolver's expression; a changed filter restarts it; a service that
// leaves the catalog is refused and its watch stopped.
func TestCatalogFollowsResolversAndCatalog(t *testing.T) {
	t.Parallel()
	f, client := newFakeAgent(t)
	f.update(func() {
		f.services["api"] = nil
		f.health["api"] = []*api.ServiceEntry{instance("10.0.1.1", 21000)}
		f.resolvers = []*api.ServiceResolverConfigEntry{{Kind: api.ServiceResolver, Name: "api",
			Subsets: map[string]api.ServiceResolverSubset{"v1": {Filter: `Service.Meta.version == "v1"`}}}}
	})
	c := startCatalog(t, client, CatalogOptions{})
	if _, err := route(t, c, "v1."+sniOf("api")); err != nil {
		t.Fatal(err)
	}
	if _, err := route(t, c, "v9."+sniOf("api")); routeResult(err) != ResultUnknownSNI+"/"+UnknownSubset {
		t.Fatalf("undefined subset: %v", err)
	}
	if reqs := f.requests(); len(reqs) == 0 || reqs[0] != `api|Service.Meta.version == "v1"` {
		t.Fatalf("health requests %v: want the subset's filter", reqs)
	}
	f.update(func() {
		f.resolvers[0].Subsets["v1"] = api.ServiceResolverSubset{Filter: `Service.Meta.version == "one"`}
	})
	testutil.Eventually(t, "the old subset watch stopped", func() bool { return len(c.Routes().Local) == 0 })
	if _, err := route(t, c, "v1."+sniOf("api")); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, "a watch with the new filter", func() bool {
		for _, r := range f.requests() {
			if r == `api|Service.Meta.version == "one"` {
				return true
			}
		}
		return false
	})
	f.update(func() { delete(f.services, "api") })
	testutil.Eventually(t, "the watch of a deregistered service stopped", func() bool { return len(c.Routes().Local) == 0 })
	if _, err := route(t, c, sniOf("api")); routeResult(err) != ResultUnknownSNI+"/"+UnknownService {
		t.Fatalf("deregistered service: %v", err)
	}
}

// TestCatalogRemoteGateways: another datacenter's names route to its mesh
// gateways' WAN addresses, healthy ones only; an unknown datacenter is
// refused.
func TestCatalogRemoteGateways(t *testing.T) {
	t.Parallel()
	f, client := newFakeAgent(t)
	gw := func(wan string, status string) *api.ServiceEntry {
		return &api.ServiceEntry{
			Node: &api.Node{Node: "g", Address: "10.2.0.1"},
			Service: &api.AgentService{ID: "gw-" + wan, Kind: api.ServiceKindMeshGateway, Address: "10.2.0.1", Port: 8443,
				TaggedAddresses: map[string]api.ServiceAddress{"wan": {Address: wan, Port: 443}}},
			Checks: api.HealthChecks{{Status: status}},
		}
	}
	f.update(func() {
		f.gateways = []*api.ServiceEntry{gw("198.51.100.1", api.HealthPassing), gw("198.51.100.2", api.HealthCritical)}
	})
	c := startCatalog(t, client, CatalogOptions{})
	var tgt *Target
	testutil.EventuallyNil(t, func() error {
		var err error
		tgt, err = route(t, c, "web.default.dc2.internal."+testTD)
		return err
	})
	eps := tgt.snapshot()
	if len(eps) != 1 || eps[0].Addr != "198.51.100.1:443" {
		t.Fatalf("dc2 endpoints %v, want the passing gateway's WAN address only", eps)
	}
	if _, err := route(t, c, "web.default.dc3.internal."+testTD); routeResult(err) != ResultUnknownSNI+"/"+UnknownDatacenter {
		t.Fatalf("dc3: %v", err)
	}
}

func sniOf(service string) string { return service + ".default.dc1.internal." + testTD }
