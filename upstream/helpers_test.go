package upstream

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
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
	ln := listen(t)
	s := &tlsServer{addr: ln.Addr().String(), port: ln.Addr().(*net.TCPAddr).Port}
	cert := ca.Leaf(t, service, testutil.LeafOptions{}).Cert
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

	mu      sync.Mutex
	index   uint64
	entries []*api.ServiceEntry
	changed chan struct{} // closed and replaced on every change
	failing bool
	pq      *api.PreparedQueryExecuteResponse
	pqGate  chan struct{} // when set, executes after the first wait on it
	queries []url.Values  // every request's query, in order

	healthCalls   atomic.Int64
	failedCalls   atomic.Int64
	pqCalls       atomic.Int64
	pqInflight    atomic.Int64
	pqMaxInflight atomic.Int64
}

func newFakeAgent(t testing.TB) *fakeAgent {
	a := &fakeAgent{t: t, index: 10, changed: make(chan struct{})}
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
	case strings.HasPrefix(r.URL.Path, "/v1/query/") && strings.HasSuffix(r.URL.Path, "/execute"):
		a.serveQuery(w, r)
	default:
		http.NotFound(w, r)
	}
}

func (a *fakeAgent) serveHealth(w http.ResponseWriter, r *http.Request) {
	a.healthCalls.Add(1)
	q := r.URL.Query()
	want, _ := strconv.ParseUint(q.Get("index"), 10, 64)
	// Block like Consul while the client's index is current. The real
	// agent waits up to 5 minutes; a short wait keeps the test snappy.
	timeout := time.NewTimer(2 * time.Second)
	defer timeout.Stop()
	for {
		a.mu.Lock()
		idx, failing, changed := a.index, a.failing, a.changed
		entries := a.entries
		a.mu.Unlock()
		if failing {
			a.failedCalls.Add(1)
			http.Error(w, "agent unavailable", http.StatusInternalServerError)
			return
		}
		if want == 0 || want < idx {
			var out []*api.ServiceEntry
			for _, e := range entries {
				if q.Has("passing") && e.Checks.AggregatedStatus() != api.HealthPassing {
					continue
				}
				out = append(out, e)
			}
			w.Header().Set("X-Consul-Index", strconv.FormatUint(idx, 10))
			writeJSON(w, out)
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
	for _, e := range u.set.Load().eps {
		if e.Addr == addr {
			e.st.active.Add(n)
			return
		}
	}
	t.Fatalf("no endpoint %s", addr)
}

// dialOK dials and checks the peer is the service named want.
func dialOK(t testing.TB, u *Upstream, want string) DialResult {
	t.Helper()
	conn, res, release, err := u.Dial(context.Background())
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
