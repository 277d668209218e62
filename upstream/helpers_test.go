package upstream

import (
	"cmp"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"

	"github.com/straitproxy/strait/config"
	"github.com/straitproxy/strait/internal/testutil"
	"github.com/straitproxy/strait/tlsutil"
)

const testTD = "11111111-2222-3333-4444-555555555555.consul"

// testTLS implements TLS: it presents a "web" leaf and accepts a server only
// if its chain verifies against the CA and its URI SAN is exactly expected.
type testTLS struct {
	ca   *testutil.CA
	leaf tls.Certificate
	td   string

	mu      sync.Mutex
	resumer map[string]*tls.Config // by ResumeKey, as tlsutil shares them
}

func newTestTLS(t testing.TB, ca *testutil.CA) *testTLS {
	return &testTLS{ca: ca, leaf: ca.Leaf(t, "web", testutil.LeafOptions{}).Cert, td: ca.TrustDomain}
}

func (c *testTLS) TrustDomain() string { return c.td }

func (c *testTLS) Generation() string { return "1" }

// ClientConfig honours opts as tlsutil does: ALPNStrait offered unless
// NoALPN, a session cache shared per ResumeKey.
func (c *testTLS) ClientConfig(expected tlsutil.Identity, sni string, opts tlsutil.ClientOptions) *tls.Config {
	if opts.ResumeKey != "" {
		c.mu.Lock()
		defer c.mu.Unlock()
		if cfg, ok := c.resumer[opts.ResumeKey]; ok {
			return cfg
		}
		cfg := c.newClientConfig(expected, sni, opts)
		cfg.ClientSessionCache = tls.NewLRUClientSessionCache(4)
		if c.resumer == nil {
			c.resumer = map[string]*tls.Config{}
		}
		c.resumer[opts.ResumeKey] = cfg
		return cfg
	}
	return c.newClientConfig(expected, sni, opts)
}

// PeerClientConfig accepts a server chaining to p's roots whose URI SAN is
// one of accept.
func (c *testTLS) PeerClientConfig(p *tlsutil.PeerRoots, accept []string, sni string, opts tlsutil.ClientOptions) (*tls.Config, error) {
	cfg := c.newClientConfig(tlsutil.Identity{}, sni, opts)
	cfg.VerifyConnection = func(cs tls.ConnectionState) error {
		if len(cs.PeerCertificates) == 0 {
			return errors.New("no server certificate")
		}
		leaf := cs.PeerCertificates[0]
		if _, err := leaf.Verify(x509.VerifyOptions{Roots: p.Roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
			return err
		}
		for _, a := range accept {
			if len(leaf.URIs) == 1 && leaf.URIs[0].String() == a {
				return nil
			}
		}
		return fmt.Errorf("server identity %v, want one of %v", leaf.URIs, accept)
	}
	return cfg, nil
}

func (c *testTLS) newClientConfig(expected tlsutil.Identity, sni string, opts tlsutil.ClientOptions) *tls.Config {
	want := expected.String()
	var protos []string
	if !opts.NoALPN {
		protos = []string{tlsutil.ALPNStrait}
	}
	return &tls.Config{
		NextProtos:   protos,
		Certificates: []tls.Certificate{c.leaf},
		ServerName:   sni,
		MinVersion:   tls.VersionTLS12,
		// Hostname verification does not apply; VerifyConnection checks
		// the chain and the SPIFFE ID.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("no server certificate")
			}
			inter := x509.NewCertPool()
			for _, c := range cs.PeerCertificates[1:] {
				inter.AddCert(c)
			}
			leaf := cs.PeerCertificates[0]
			if _, err := leaf.Verify(x509.VerifyOptions{
				Roots: c.ca.Pool(), Intermediates: inter,
				KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
			}); err != nil {
				return err
			}
			if len(leaf.URIs) != 1 || leaf.URIs[0].String() != want {
				return fmt.Errorf("server identity %v, want %s", leaf.URIs, want)
			}
			return nil
		},
	}
}

// tlsServer is a peer's public listener: it handshakes (requiring a client
// certificate from the CA), writes its service name and closes.
type tlsServer struct {
	addr    string
	port    int
	mu      sync.Mutex
	snis    []string
	conns   atomic.Int64 // completed handshakes
	resumed atomic.Int64 // of which resumed sessions
	alpn    atomic.Int64 // of which negotiated an ALPN protocol
}

func startTLSServer(t testing.TB, ca *testutil.CA, service string) *tlsServer {
	return startTLSServerProtos(t, ca, service, nil)
}

// startTLSServerProtos is startTLSServer with the server advertising protos
// by ALPN (nil: none, like the built-in proxy; {"h2"}: a Connect-native
// service; {tlsutil.ALPNStrait}: a strait proxy).
func startTLSServerProtos(t testing.TB, ca *testutil.CA, service string, protos []string) *tlsServer {
	t.Helper()
	return startTLSServerOpts(t, ca, service, protos, testutil.LeafOptions{})
}

// startTLSServerOpts is startTLSServerProtos with a leaf made with lo (a
// service in another datacenter).
func startTLSServerOpts(t testing.TB, ca *testutil.CA, service string, protos []string, lo testutil.LeafOptions) *tlsServer {
	t.Helper()
	ln := listen(t)
	s := &tlsServer{addr: ln.Addr().String(), port: ln.Addr().(*net.TCPAddr).Port}
	cert := ca.Leaf(t, service, lo).Cert
	cfg := &tls.Config{
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    ca.Pool(),
		MinVersion:   tls.VersionTLS12,
		NextProtos:   protos,
		GetConfigForClient: func(hi *tls.ClientHelloInfo) (*tls.Config, error) {
			s.mu.Lock()
			s.snis = append(s.snis, hi.ServerName)
			s.mu.Unlock()
			return nil, nil
		},
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(10 * time.Second))
				tc := tls.Server(c, cfg)
				if tc.Handshake() != nil {
					return
				}
				s.conns.Add(1)
				if tc.ConnectionState().DidResume {
					s.resumed.Add(1)
				}
				if tc.ConnectionState().NegotiatedProtocol != "" {
					s.alpn.Add(1)
				}
				_, _ = tc.Write([]byte(service))
				_ = tc.Close()
			}()
		}
	}()
	return s
}

func (s *tlsServer) sawSNIs() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.snis...)
}

// startBlackHole accepts TCP connections and never answers on them.
func startBlackHole(t testing.TB) (addr string, port int) {
	t.Helper()
	ln := listen(t)
	var mu sync.Mutex
	var held []net.Conn
	t.Cleanup(func() {
		mu.Lock()
		defer mu.Unlock()
		for _, c := range held {
			c.Close()
		}
	})
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			held = append(held, c)
			mu.Unlock()
		}
	}()
	return ln.Addr().String(), ln.Addr().(*net.TCPAddr).Port
}

// closedPort returns a loopback port with nothing listening on it.
func closedPort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	return port
}

func listen(t testing.TB) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// proxyEntry is what /v1/health/connect returns for a sidecar of service on
// 127.0.0.1:port with the given check status.
func proxyEntry(node, service string, port int, status string) *api.ServiceEntry {
	return &api.ServiceEntry{
		Node: &api.Node{Node: node, Address: "127.0.0.1", Datacenter: "dc1"},
		Service: &api.AgentService{
			Kind: api.ServiceKindConnectProxy, ID: service + "-sidecar-proxy-" + node,
			Service: service + "-sidecar-proxy", Port: port,
			Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceName: service},
		},
		Checks: api.HealthChecks{{Node: node, CheckID: "c-" + node, Status: status}},
	}
}

// fakeAgent serves the two endpoints the package calls, with blocking
// queries for health and an outage switch.
type fakeAgent struct {
	t   testing.TB
	srv *httptest.Server

	mu        sync.Mutex
	index     uint64
	entries   []*api.ServiceEntry
	chains    map[string]*api.CompiledDiscoveryChain // by name; absent: a default chain
	vips      map[string][]string                    // a chain's AutoVirtualIPs, by name
	gateways  map[string][]*api.ServiceEntry         // mesh gateway instances by datacenter
	changed   chan struct{}                          // closed and replaced on every change
	failing   bool
	pq        *api.PreparedQueryExecuteResponse
	pqGate    chan struct{} // when set, executes after the first wait on it
	queries   []url.Values  // every request's query, in order
	chainReqs []chainReq

	healthCalls   atomic.Int64
	failedCalls   atomic.Int64
	pqCalls       atomic.Int64
	pqInflight    atomic.Int64
	pqMaxInflight atomic.Int64
}

func newFakeAgent(t testing.TB) *fakeAgent {
	a := &fakeAgent{t: t, index: 10, changed: make(chan struct{}), chains: map[string]*api.CompiledDiscoveryChain{}, gateways: map[string][]*api.ServiceEntry{}}
	a.srv = httptest.NewServer(http.HandlerFunc(a.serve))
	t.Cleanup(a.srv.Close)
	return a
}

func (a *fakeAgent) client(t testing.TB) *api.Client {
	c, err := api.NewClient(&api.Config{Address: a.srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func (a *fakeAgent) setEntries(es ...*api.ServiceEntry) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.entries = es
	a.index++
	close(a.changed)
	a.changed = make(chan struct{})
}

// setChain makes name's discovery chain c (nil: the default chain).
func (a *fakeAgent) setChain(name string, c *api.CompiledDiscoveryChain) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if c == nil {
		delete(a.chains, name)
	} else {
		a.chains[name] = c
	}
	a.index++
	close(a.changed)
	a.changed = make(chan struct{})
}

// setGateways makes es the mesh gateway instances of dc.
func (a *fakeAgent) setGateways(dc string, es ...*api.ServiceEntry) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.gateways[dc] = es
	a.index++
	close(a.changed)
	a.changed = make(chan struct{})
}

func (a *fakeAgent) setQuery(r *api.PreparedQueryExecuteResponse, gate chan struct{}) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.pq, a.pqGate = r, gate
}

func (a *fakeAgent) setFailing(f bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.failing = f
	close(a.changed)
	a.changed = make(chan struct{})
}

func (a *fakeAgent) requests() []url.Values {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]url.Values(nil), a.queries...)
}

func (a *fakeAgent) serve(w http.ResponseWriter, r *http.Request) {
	a.mu.Lock()
	a.queries = append(a.queries, r.URL.Query())
	a.mu.Unlock()
	switch {
	case strings.HasPrefix(r.URL.Path, "/v1/health/connect/"):
		a.serveHealth(w, r)
	case strings.HasPrefix(r.URL.Path, "/v1/discovery-chain/"):
		a.serveChain(w, r)
	case r.URL.Path == "/v1/catalog/services":
		a.serveGatewayNames(w, r)
	case strings.HasPrefix(r.URL.Path, "/v1/health/service/"):
		a.serveGateways(w, r)
	case r.URL.Path == "/v1/agent/self":
		writeJSON(w, map[string]any{"Config": map[string]any{"Datacenter": "dc1"}})
	case strings.HasPrefix(r.URL.Path, "/v1/query/") && strings.HasSuffix(r.URL.Path, "/execute"):
		a.serveQuery(w, r)
	default:
		http.NotFound(w, r)
	}
}

// block answers r like a Consul blocking query: at once when the client's
// index is stale, else when something changes (or after a short wait).
func (a *fakeAgent) block(w http.ResponseWriter, r *http.Request, answer func() (any, int)) {
	want, _ := strconv.ParseUint(r.URL.Query().Get("index"), 10, 64)
	// The real agent waits up to 5 minutes; a short wait keeps the test snappy.
	timeout := time.NewTimer(2 * time.Second)
	defer timeout.Stop()
	for {
		a.mu.Lock()
		idx, failing, changed := a.index, a.failing, a.changed
		a.mu.Unlock()
		if failing {
			a.failedCalls.Add(1)
			http.Error(w, "agent unavailable", http.StatusInternalServerError)
			return
		}
		if want == 0 || want < idx {
			v, code := answer()
			if code != http.StatusOK {
				http.Error(w, fmt.Sprint(v), code)
				return
			}
			w.Header().Set("X-Consul-Index", strconv.FormatUint(idx, 10))
			writeJSON(w, v)
			return
		}
		select {
		case <-changed:
		case <-timeout.C:
			want = 0
		case <-r.Context().Done():
			return
		}
	}
}

// servedService is the service an entry serves.
func servedService(e *api.ServiceEntry) string {
	if e.Service.Kind == api.ServiceKindTerminatingGateway {
		return e.Service.Meta["test-linked-service"] // as Consul lists a linked gateway
	}
	if e.Service.Proxy != nil && e.Service.Proxy.DestinationServiceName != "" {
		return e.Service.Proxy.DestinationServiceName
	}
	return e.Service.Service
}

// matchFilter evaluates the one bexpr form the tests use:
// Service.Meta.<key> == "<value>" (or !=).
func matchFilter(filter string, e *api.ServiceEntry) (bool, error) {
	if filter == "" {
		return true, nil
	}
	for _, op := range []string{"==", "!="} {
		lhs, rhs, ok := strings.Cut(filter, " "+op+" ")
		if !ok {
			continue
		}
		key, ok := strings.CutPrefix(strings.TrimSpace(lhs), "Service.Meta.")
		if !ok {
			break
		}
		val, err := strconv.Unquote(strings.TrimSpace(rhs))
		if err != nil {
			break
		}
		eq := e.Service.Meta[key] == val
		return eq == (op == "=="), nil
	}
	return false, fmt.Errorf("filter %q not understood by the fake agent", filter)
}

func (a *fakeAgent) serveHealth(w http.ResponseWriter, r *http.Request) {
	a.healthCalls.Add(1)
	q := r.URL.Query()
	name := strings.TrimPrefix(r.URL.Path, "/v1/health/connect/")
	dc := cmp.Or(q.Get("dc"), "dc1")
	a.block(w, r, func() (any, int) {
		a.mu.Lock()
		entries := a.entries
		a.mu.Unlock()
		out := []*api.ServiceEntry{}
		for _, e := range entries {
			if servedService(e) != name || cmp.Or(e.Node.Datacenter, "dc1") != dc {
				continue
			}
			if q.Has("passing") && e.Checks.AggregatedStatus() != api.HealthPassing {
				continue
			}
			ok, err := matchFilter(q.Get("filter"), e)
			if err != nil {
				return err.Error(), http.StatusBadRequest
			}
			if ok {
				out = append(out, e)
			}
		}
		return out, http.StatusOK
	})
}

func (a *fakeAgent) serveChain(w http.ResponseWriter, r *http.Request) {
	name := strings.TrimPrefix(r.URL.Path, "/v1/discovery-chain/")
	q := r.URL.Query()
	var body []byte
	if r.Method == http.MethodPost {
		body, _ = io.ReadAll(r.Body)
	}
	a.mu.Lock()
	a.chainReqs = append(a.chainReqs, chainReq{method: r.Method, query: q, body: string(body)})
	a.mu.Unlock()
	a.block(w, r, func() (any, int) {
		a.mu.Lock()
		c := a.chains[name]
		a.mu.Unlock()
		if c == nil {
			c = newChain(name).resolve(tgt(name, "", cmp.Or(q.Get("compile-dc"), "dc1")), nil)
		}
		a.mu.Lock()
		vips := a.vips[name]
		a.mu.Unlock()
		return map[string]any{"Chain": struct {
			*api.CompiledDiscoveryChain
			AutoVirtualIPs []string `json:",omitempty"`
		}{c, vips}}, http.StatusOK
	})
}

func (a *fakeAgent) serveGatewayNames(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	dc := cmp.Or(q.Get("dc"), "dc1")
	if q.Get("filter") != `ServiceKind == "mesh-gateway"` {
		http.Error(w, "unexpected filter "+q.Get("filter"), http.StatusBadRequest)
		return
	}
	a.block(w, r, func() (any, int) {
		a.mu.Lock()
		defer a.mu.Unlock()
		out := map[string][]string{}
		for _, e := range a.gateways[dc] {
			out[e.Service.Service] = nil
		}
		return out, http.StatusOK
	})
}

func (a *fakeAgent) serveGateways(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	dc := cmp.Or(q.Get("dc"), "dc1")
	name := strings.TrimPrefix(r.URL.Path, "/v1/health/service/")
	a.block(w, r, func() (any, int) {
		a.mu.Lock()
		defer a.mu.Unlock()
		out := []*api.ServiceEntry{}
		for _, e := range a.gateways[dc] {
			if e.Service.Service == name && (!q.Has("passing") || e.Checks.AggregatedStatus() == api.HealthPassing) {
				out = append(out, e)
			}
		}
		return out, http.StatusOK
	})
}

type chainReq struct {
	method string
	query  url.Values
	body   string
}

func (a *fakeAgent) chainRequests() []chainReq {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]chainReq(nil), a.chainReqs...)
}

// tgt is a chain target as Consul compiles it (default namespace and
// partition).
func tgt(svc, subset, dc string) *api.DiscoveryTarget {
	id := svc + ".default.default." + dc
	sni := svc + ".default." + dc + ".internal." + testTD
	if subset != "" {
		id, sni = subset+"."+id, subset+"."+sni
	}
	return &api.DiscoveryTarget{
		ID: id, Service: svc, ServiceSubset: subset, Namespace: "default", Datacenter: dc,
		SNI: sni, Name: sni, ConnectTimeout: 5 * time.Second,
	}
}

// chainBuilder assembles a compiled chain node by node.
type chainBuilder struct{ c *api.CompiledDiscoveryChain }

func newChain(name string) *chainBuilder {
	return &chainBuilder{&api.CompiledDiscoveryChain{
		ServiceName: name, Namespace: "default", Datacenter: "dc1", Protocol: "tcp",
		Nodes: map[string]*api.DiscoveryGraphNode{}, Targets: map[string]*api.DiscoveryTarget{},
	}}
}

// resolver adds a resolver node for primary with failover targets and
// returns its key.
func (b *chainBuilder) resolver(primary *api.DiscoveryTarget, lb *api.LoadBalancer, failover ...*api.DiscoveryTarget) string {
	key := "resolver:" + primary.ID
	r := &api.DiscoveryResolver{Target: primary.ID, ConnectTimeout: primary.ConnectTimeout}
	b.c.Targets[primary.ID] = primary
	if len(failover) > 0 {
		r.Failover = &api.DiscoveryFailover{}
		for _, f := range failover {
			b.c.Targets[f.ID] = f
			r.Failover.Targets = append(r.Failover.Targets, f.ID)
		}
	}
	b.c.Nodes[key] = &api.DiscoveryGraphNode{Type: api.DiscoveryGraphNodeTypeResolver, Name: primary.ID, Resolver: r, LoadBalancer: lb}
	return key
}

// resolve makes a resolver the start node and returns the chain.
func (b *chainBuilder) resolve(primary *api.DiscoveryTarget, lb *api.LoadBalancer, failover ...*api.DiscoveryTarget) *api.CompiledDiscoveryChain {
	return b.start(b.resolver(primary, lb, failover...))
}

func (b *chainBuilder) splitter(name string, splits ...*api.DiscoverySplit) string {
	key := "splitter:" + name
	b.c.Nodes[key] = &api.DiscoveryGraphNode{Type: api.DiscoveryGraphNodeTypeSplitter, Name: name, Splits: splits}
	b.c.Protocol = "http"
	return key
}

func (b *chainBuilder) router(name string, next ...string) string {
	key := "router:" + name
	n := &api.DiscoveryGraphNode{Type: api.DiscoveryGraphNodeTypeRouter, Name: name}
	for _, nx := range next {
		n.Routes = append(n.Routes, &api.DiscoveryRoute{NextNode: nx})
	}
	b.c.Nodes[key] = n
	b.c.Protocol = "http"
	return key
}

func (b *chainBuilder) start(key string) *api.CompiledDiscoveryChain {
	b.c.StartNode = key
	return b.c
}

func (a *fakeAgent) serveQuery(w http.ResponseWriter, r *http.Request) {
	n := a.pqCalls.Add(1)
	in := a.pqInflight.Add(1)
	defer a.pqInflight.Add(-1)
	for {
		m := a.pqMaxInflight.Load()
		if in <= m || a.pqMaxInflight.CompareAndSwap(m, in) {
			break
		}
	}
	a.mu.Lock()
	gate := a.pqGate
	a.mu.Unlock()
	if gate != nil && n > 1 {
		select {
		case <-gate:
		case <-r.Context().Done():
			return
		}
	}
	a.mu.Lock()
	resp, failing := a.pq, a.failing
	a.mu.Unlock()
	if failing {
		http.Error(w, "agent unavailable", http.StatusInternalServerError)
		return
	}
	w.Header().Set("X-Consul-Index", "1")
	writeJSON(w, resp)
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(v)
}

type fixture struct {
	ca    *testutil.CA
	tls   *testTLS
	agent *fakeAgent
	logs  *testutil.Buffer
}

func newFixture(t testing.TB) *fixture {
	ca := testutil.NewCA(t, testTD)
	return &fixture{ca: ca, tls: newTestTLS(t, ca), agent: newFakeAgent(t), logs: new(testutil.Buffer)}
}

func (f *fixture) options(t testing.TB) Options {
	return Options{
		Client:          f.agent.client(t),
		TLS:             f.tls,
		LocalDatacenter: "dc1",
		Logger:          hclog.New(&hclog.LoggerOptions{Output: f.logs, Level: hclog.Debug}),
	}
}

func serviceUpstream(name string) config.Upstream {
	return config.Upstream{DestinationName: name, LocalBindPort: 9191, ConnectTimeout: 5 * time.Second}
}

// chainTimeout is a chain with one target whose resolver's connect timeout
// is d, as Consul compiles one for an upstream with connect_timeout_ms
// (the fake agent does not apply overrides itself).
func chainTimeout(name string, d time.Duration) *api.CompiledDiscoveryChain {
	t := tgt(name, "", "dc1")
	t.ConnectTimeout = d
	return newChain(name).resolve(t, nil)
}

func newUpstream(t testing.TB, cfg config.Upstream, opts Options) *Upstream {
	t.Helper()
	u, err := New(cfg, opts)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

// run starts u.Run and stops it at cleanup, before the fake agent closes.
func run(t testing.TB, u *Upstream) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		u.Run(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
}

func waitReady(t testing.TB, u *Upstream) {
	t.Helper()
	select {
	case <-u.Ready():
	case <-time.After(10 * time.Second):
		t.Fatal("upstream never became ready")
	}
}

func addrs(st []EndpointStatus) []string {
	var out []string
	for _, s := range st {
		out = append(out, s.Addr)
	}
	return out
}

func statusOf(t testing.TB, u *Upstream, addr string) EndpointStatus {
	t.Helper()
	for _, s := range u.Endpoints() {
		if s.Addr == addr {
			return s
		}
	}
	t.Fatalf("no endpoint %s in %v", addr, addrs(u.Endpoints()))
	return EndpointStatus{}
}

// load adds n to the active count of the endpoint at addr, to steer P2C.
func load(t testing.TB, u *Upstream, addr string, n int64) {
	t.Helper()
	sets := []*endpointSet{u.set.Load()}
	if snap := u.snap.Load(); snap != nil {
		for _, t := range snap.targets {
			sets = append(sets, t.set)
		}
	}
	for _, s := range sets {
		if s == nil {
			continue
		}
		for _, e := range s.eps {
			if e.Addr == addr {
				e.st.active.Add(n)
				return
			}
		}
	}
	t.Fatalf("no endpoint %s", addr)
}

// dialOK dials and checks the peer is the service named want.
func dialOK(t testing.TB, u *Upstream, want string) DialResult {
	t.Helper()
	conn, res, release, err := u.Dial(context.Background(), DialOptions{})
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	defer release()
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 64)
	n, err := conn.Read(buf)
	if err != nil {
		t.Fatalf("read from %s: %v", res.Addr, err)
	}
	if got := string(buf[:n]); got != want {
		t.Fatalf("peer said %q, want %q", got, want)
	}
	return res
}
