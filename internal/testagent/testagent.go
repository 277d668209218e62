// Package testagent is a fake local Consul agent for unit tests of the
// proxy and admin packages: a throwaway Connect CA issuing SPIFFE leaves,
// and the agent endpoints strait calls (CA roots, leaf, intention match,
// authorize, health/connect, discovery-chain: always the default chain of
// one target) with Consul's blocking-query behaviour. It is
// imported by tests only and never linked into the binary. It is not
// evidence that strait works against a real agent: the integration suite
// is.
package testagent

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/straitproxy/strait/internal/testutil"
	"github.com/straitproxy/strait/tlsutil"
)

// TrustDomain of the fake CA.
const TrustDomain = "11111111-2222-3333-4444-555555555555.consul"

// Datacenter of every identity the fake agent issues.
const Datacenter = "dc1"

// Agent is a fake local agent. Its zero value is not usable; call Start.
type Agent struct {
	t   testing.TB
	srv *httptest.Server

	ca *testutil.CA

	mu           sync.Mutex
	index        uint64
	changed      chan struct{} // closed and replaced on every change
	ixns         []*api.Intention
	defaultAllow bool
	endpoints    map[string][]*api.ServiceEntry
	leafHold     chan struct{} // when non-nil, leaf requests wait for it
	leaves       map[string]*api.LeafCert
	failing      bool
	down         chan struct{}
	once         sync.Once
}

// Start starts a fake agent; it stops at the end of the test.
func Start(t testing.TB) *Agent {
	t.Helper()
	a := &Agent{
		t: t, index: 10, changed: make(chan struct{}), defaultAllow: true,
		endpoints: map[string][]*api.ServiceEntry{}, leaves: map[string]*api.LeafCert{},
		down: make(chan struct{}),
	}
	a.ca = testutil.NewCA(t, TrustDomain)
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/agent/connect/ca/roots", a.roots)
	mux.HandleFunc("GET /v1/agent/connect/ca/leaf/{service}", a.leaf)
	mux.HandleFunc("GET /v1/connect/intentions/match", a.match)
	mux.HandleFunc("POST /v1/agent/connect/authorize", a.authorize)
	mux.HandleFunc("GET /v1/health/connect/{service}", a.health)
	mux.HandleFunc("GET /v1/discovery-chain/{service}", a.chain)
	mux.HandleFunc("POST /v1/discovery-chain/{service}", a.chain)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "fake agent: not implemented", http.StatusNotFound)
	})
	a.srv = httptest.NewServer(mux)
	t.Cleanup(a.Stop)
	return a
}

// Stop makes the agent go away: blocked queries return and new
// connections are refused, as when the agent process dies.
func (a *Agent) Stop() {
	a.once.Do(func() {
		close(a.down)
		a.srv.Listener.Close()
		a.srv.CloseClientConnections()
		a.srv.Close()
	})
}

// Config is an API config pointing at the agent.
func (a *Agent) Config() *api.Config {
	return &api.Config{Address: a.srv.Listener.Addr().String()}
}

// Client is an API client for the agent.
func (a *Agent) Client() *api.Client {
	c, err := api.NewClient(a.Config())
	if err != nil {
		a.t.Fatal(err)
	}
	return c
}

// ServiceID is the SPIFFE ID the agent's CA gives service.
func ServiceID(service string) string {
	return tlsutil.ServiceID(TrustDomain, "", "", Datacenter, service).String()
}

func (a *Agent) bump() {
	a.index++
	close(a.changed)
	a.changed = make(chan struct{})
}

// SetIntentions replaces the intentions (every destination sees them all).
func (a *Agent) SetIntentions(ixns ...*api.Intention) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.ixns = ixns
	a.bump()
}

// Intention builds an L4 intention src => dst.
func Intention(src, dst string, action api.IntentionAction) *api.Intention {
	return &api.Intention{
		ID: src + "-" + dst, SourceName: src, DestinationName: dst, SourceNS: "default", DestinationNS: "default",
		SourceType: api.IntentionSourceConsul, Action: action, Precedence: 9,
	}
}

// SetDefaultAllow sets the authorize endpoint's answer when no intention
// matches (the ACL default policy).
func (a *Agent) SetDefaultAllow(allow bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.defaultAllow = allow
}

// SetEndpoints lists connect proxies of service at the given host:port
// addresses, all passing.
func (a *Agent) SetEndpoints(service string, addrs ...string) {
	var es []*api.ServiceEntry
	for i, addr := range addrs {
		host, port, err := net.SplitHostPort(addr)
		if err != nil {
			a.t.Fatal(err)
		}
		p, _ := strconv.Atoi(port)
		node := "node" + strconv.Itoa(i)
		es = append(es, &api.ServiceEntry{
			Node: &api.Node{Node: node, Address: host, Datacenter: Datacenter},
			Service: &api.AgentService{
				Kind: api.ServiceKindConnectProxy, ID: service + "-sidecar-proxy-" + node,
				Service: service + "-sidecar-proxy", Address: host, Port: p,
				Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceName: service},
			},
			Checks: api.HealthChecks{{Node: node, CheckID: "c-" + node, Status: api.HealthPassing}},
		})
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	a.endpoints[service] = es
	a.bump()
}

// HoldLeaves makes leaf requests wait until the returned func is called.
func (a *Agent) HoldLeaves() (release func()) {
	ch := make(chan struct{})
	a.mu.Lock()
	a.leafHold = ch
	a.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			a.mu.Lock()
			a.leafHold = nil
			a.mu.Unlock()
			close(ch)
		})
	}
}

// SetFailing makes every endpoint answer 500 (and wakes blocked queries),
// as an agent that lost its servers does.
func (a *Agent) SetFailing(f bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.failing = f
	a.bump()
}

// ClientCert issues a leaf for service, for a test that dials a public
// listener itself.
func (a *Agent) ClientCert(service string) tls.Certificate {
	return a.issue(service).Cert
}

// Roots is the CA pool.
func (a *Agent) Roots() *x509.CertPool {
	return a.ca.Pool()
}

func (a *Agent) issue(service string) *testutil.Leaf {
	return a.ca.Leaf(a.t, service, testutil.LeafOptions{URI: ServiceID(service)})
}

// block waits, as a blocking query does, while the client's index is
// current. It returns false if the request should not be answered.
func (a *Agent) block(w http.ResponseWriter, r *http.Request) bool {
	want, _ := strconv.ParseUint(r.URL.Query().Get("index"), 10, 64)
	timeout := time.NewTimer(5 * time.Second) // the agent's wait, shortened
	defer timeout.Stop()
	for {
		a.mu.Lock()
		idx, failing, changed := a.index, a.failing, a.changed
		a.mu.Unlock()
		if failing {
			http.Error(w, "rpc error: No cluster leader", http.StatusInternalServerError)
			return false
		}
		if want == 0 || want < idx {
			return true
		}
		select {
		case <-changed:
		case <-timeout.C:
			return true
		case <-r.Context().Done():
			return false
		case <-a.down:
			return false
		}
	}
}

func (a *Agent) reply(w http.ResponseWriter, v any) {
	a.mu.Lock()
	idx := a.index
	a.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Consul-Index", strconv.FormatUint(idx, 10))
	w.Header().Set("X-Consul-LastContact", "0")
	w.Header().Set("X-Consul-KnownLeader", "true")
	_ = json.NewEncoder(w).Encode(v)
}

func (a *Agent) roots(w http.ResponseWriter, r *http.Request) {
	if !a.block(w, r) {
		return
	}
	a.reply(w, testutil.RootList(TrustDomain, a.ca))
}

func (a *Agent) leaf(w http.ResponseWriter, r *http.Request) {
	a.mu.Lock()
	hold := a.leafHold
	a.mu.Unlock()
	if hold != nil {
		select {
		case <-hold:
		case <-r.Context().Done():
			return
		case <-a.down:
			return
		}
	}
	if !a.block(w, r) {
		return
	}
	svc := r.PathValue("service")
	a.mu.Lock()
	l := a.leaves[svc]
	if l == nil {
		i := a.issue(svc)
		l = &api.LeafCert{SerialNumber: i.Serial, CertPEM: i.CertPEM, PrivateKeyPEM: i.KeyPEM, Service: svc, ServiceURI: ServiceID(svc)}
		a.leaves[svc] = l
	}
	a.mu.Unlock()
	a.reply(w, l)
}

func (a *Agent) match(w http.ResponseWriter, r *http.Request) {
	if !a.block(w, r) {
		return
	}
	out := map[string][]*api.Intention{}
	a.mu.Lock()
	for _, name := range r.URL.Query()["name"] {
		for _, ixn := range a.ixns {
			if ixn.DestinationName == name || ixn.DestinationName == "*" {
				out[name] = append(out[name], ixn)
			}
		}
		if out[name] == nil {
			out[name] = []*api.Intention{}
		}
	}
	a.mu.Unlock()
	a.reply(w, out)
}

func (a *Agent) authorize(w http.ResponseWriter, r *http.Request) {
	var req api.AgentAuthorizeParams
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	a.mu.Lock()
	allow, failing := a.defaultAllow, a.failing
	a.mu.Unlock()
	if failing {
		http.Error(w, "rpc error: No cluster leader", http.StatusInternalServerError)
		return
	}
	reason := "Default behavior configured by ACLs"
	if !allow {
		reason = "Default behavior configured by ACLs (deny)"
	}
	a.reply(w, &api.AgentAuthorize{Authorized: allow, Reason: reason})
}

// chain answers the default discovery chain of a service: one resolver
// whose one target is the service in Datacenter (or compile-dc).
func (a *Agent) chain(w http.ResponseWriter, r *http.Request) {
	if !a.block(w, r) {
		return
	}
	svc := r.PathValue("service")
	dc := r.URL.Query().Get("compile-dc")
	if dc == "" {
		dc = Datacenter
	}
	id := svc + ".default.default." + dc
	a.reply(w, api.DiscoveryChainResponse{Chain: &api.CompiledDiscoveryChain{
		ServiceName: svc, Namespace: "default", Datacenter: dc, Protocol: "tcp", Default: true,
		StartNode: "resolver:" + id,
		Nodes: map[string]*api.DiscoveryGraphNode{"resolver:" + id: {
			Type: api.DiscoveryGraphNodeTypeResolver, Name: id,
			Resolver: &api.DiscoveryResolver{Default: true, ConnectTimeout: 5 * time.Second, Target: id},
		}},
		Targets: map[string]*api.DiscoveryTarget{id: {
			ID: id, Service: svc, Namespace: "default", Datacenter: dc, ConnectTimeout: 5 * time.Second,
			SNI: svc + ".default." + dc + ".internal." + TrustDomain, Name: svc + ".default." + dc + ".internal." + TrustDomain,
		}},
	}})
}

func (a *Agent) health(w http.ResponseWriter, r *http.Request) {
	if !a.block(w, r) {
		return
	}
	svc := r.PathValue("service")
	a.mu.Lock()
	es := a.endpoints[svc]
	a.mu.Unlock()
	if es == nil {
		es = []*api.ServiceEntry{}
	}
	a.reply(w, es)
}
