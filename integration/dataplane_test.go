package integration

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// jwtIssuer is a test-generated key behind a Consul `jwt` auth method: it
// mints the bearer tokens that stand in for pods' service-account tokens.
type jwtIssuer struct {
	key    *ecdsa.PrivateKey
	method string
	iss    string
}

// newJWTAuthMethod creates a jwt auth method trusting a fresh key, and a
// binding rule that makes a login a service identity for the token's
// "service" claim (as consul-k8s's kubernetes auth method does for the
// service account's name).
func newJWTAuthMethod(t *testing.T, a *agent) *jwtIssuer {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	j := &jwtIssuer{key: key, method: uniq("test-jwt"), iss: "strait-integration"}
	pub := string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))
	_, _, err = a.client.ACL().AuthMethodCreate(&api.ACLAuthMethod{
		Name: j.method, Type: "jwt",
		Config: map[string]any{
			"JWTValidationPubKeys": []string{pub},
			"BoundIssuer":          j.iss,
			"BoundAudiences":       []string{"consul"},
			"JWTSupportedAlgs":     []string{"ES256"},
			"ClaimMappings":        map[string]string{"service": "service"},
		},
	}, nil)
	if err != nil {
		t.Fatalf("create jwt auth method: %v", err)
	}
	_, _, err = a.client.ACL().BindingRuleCreate(&api.ACLBindingRule{
		AuthMethod: j.method, BindType: api.BindingRuleBindTypeService, BindName: "${value.service}",
	}, nil)
	if err != nil {
		t.Fatalf("create binding rule: %v", err)
	}
	return j
}

// bearerFile writes a signed JWT for service into a file, as the kubelet
// projects a service-account token, and returns its path.
func (j *jwtIssuer) bearerFile(t *testing.T, service string) string {
	t.Helper()
	enc := base64.RawURLEncoding
	hdr, _ := json.Marshal(map[string]string{"alg": "ES256", "typ": "JWT"})
	now := time.Now()
	claims, _ := json.Marshal(map[string]any{
		"iss": j.iss, "aud": []string{"consul"}, "sub": "system:serviceaccount:default:" + service,
		"service": service, "iat": now.Unix(), "nbf": now.Add(-time.Minute).Unix(), "exp": now.Add(time.Hour).Unix(),
	})
	signing := enc.EncodeToString(hdr) + "." + enc.EncodeToString(claims)
	sum := sha256.Sum256([]byte(signing))
	r, s, err := ecdsa.Sign(rand.Reader, j.key, sum[:])
	if err != nil {
		t.Fatal(err)
	}
	sig := make([]byte, 64)
	r.FillBytes(sig[:32])
	s.FillBytes(sig[32:])
	path := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(path, []byte(signing+"."+enc.EncodeToString(sig)), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// k8sPod is one pod's catalog registrations, shaped as consul-k8s's
// endpoints controller writes them: a virtual node per Kubernetes node, the
// service instance and its connect-proxy (ID <pod>-<svc>-sidecar-proxy,
// port 20000 in a real pod), each with the "Kubernetes Readiness Check".
type k8sPod struct {
	name, service string
	node          string
	proxyID       string
	proxyPort     int
}

func registerK8sPod(t *testing.T, a *agent, service string, appPort, proxyPort int, upstreams []api.Upstream) k8sPod {
	t.Helper()
	p := k8sPod{name: uniq(service), service: service, node: uniq("k8s-node") + "-virtual", proxyPort: proxyPort}
	svcID := p.name + "-" + service
	p.proxyID = svcID + "-sidecar-proxy"
	meta := map[string]string{
		"k8s-namespace": "default", "k8s-service-name": service, "pod-name": p.name,
		"managed-by": "consul-k8s-endpoints-controller", "synthetic-node": "true", "pod-uid": randomUUID(t),
	}
	reg := func(svc *api.AgentService, checkID string) {
		_, err := a.client.Catalog().Register(&api.CatalogRegistration{
			Node: p.node, Address: "127.0.0.1", NodeMeta: map[string]string{"synthetic-node": "true"},
			Service: svc,
			Check: &api.AgentCheck{
				Node: p.node, CheckID: checkID, Name: "Kubernetes Readiness Check", Type: "kubernetes-readiness",
				Status: api.HealthPassing, ServiceID: svc.ID, Output: "Kubernetes health checks passing",
			},
			SkipNodeUpdate: true,
		}, nil)
		if err != nil {
			t.Fatalf("catalog register %s: %v", svc.ID, err)
		}
	}
	reg(&api.AgentService{ID: svcID, Service: service, Address: "127.0.0.1", Port: appPort, Meta: meta}, "default/"+p.name+"-"+service)
	reg(&api.AgentService{
		Kind: api.ServiceKindConnectProxy, ID: p.proxyID, Service: service + "-sidecar-proxy",
		Address: "127.0.0.1", Port: proxyPort, Meta: meta,
		Proxy: &api.AgentServiceConnectProxyConfig{
			DestinationServiceName: service, DestinationServiceID: svcID,
			LocalServiceAddress: "127.0.0.1", LocalServicePort: appPort, Upstreams: upstreams,
		},
	}, "default/"+p.name+"-"+service+"-sidecar-proxy")
	return p
}

// startDataplane runs `strait dataplane` for pod with the login flags, as
// consul-k8s passes them (node name from DP_SERVICE_NODE_NAME, the service
// ID from a file, an Envoy-only flag that must be accepted).
func startDataplane(t *testing.T, a *agent, j *jwtIssuer, pod k8sPod, addresses string, extra ...string) *proc {
	t.Helper()
	idFile := filepath.Join(t.TempDir(), "proxyid")
	if err := os.WriteFile(idFile, []byte(pod.proxyID), 0o644); err != nil {
		t.Fatal(err)
	}
	_, httpPort, _ := strings.Cut(a.httpAddr, ":")
	args := append([]string{"dataplane",
		"-addresses", addresses, "-http-port", httpPort, "-grpc-port", strconv.Itoa(a.grpcPort), "-tls-disabled",
		"-proxy-service-id-path", idFile,
		"-credential-type", "login", "-login-auth-method", j.method, "-login-bearer-token-path", j.bearerFile(t, pod.service),
		"-login-check-interval", "1s", "-envoy-concurrency=2", "-graceful-port", "0",
	}, extra...)
	env := []string{"DP_SERVICE_NODE_NAME=" + pod.node, "DP_CREDENTIAL_LOGIN_META=pod=default/" + pod.name}
	return startStraitEnv(t, env, args...)
}

// loginTokens lists the tokens the auth method made for pod (by the
// login metadata in their description).
func loginTokens(t *testing.T, a *agent, j *jwtIssuer, pod k8sPod) []*api.ACLTokenListEntry {
	t.Helper()
	list, _, err := a.client.ACL().TokenListFiltered(api.ACLTokenFilterOptions{AuthMethod: j.method}, nil)
	if err != nil {
		t.Fatalf("list tokens: %v", err)
	}
	var out []*api.ACLTokenListEntry
	for _, e := range list {
		if strings.Contains(e.Description, pod.name) {
			out = append(out, e)
		}
	}
	return out
}

// TestDataplane runs strait dataplane on both ends of web -> db against a
// dev server with ACLs on and default deny, no agent registration at all:
// login through a jwt auth method, registrations as consul-k8s writes them,
// leaf certificates signed by the server from CSRs made in strait.
func TestDataplane(t *testing.T) {
	t.Parallel()
	a := startAgentOpts(t, agentOpts{aclDeny: true})
	j := newJWTAuthMethod(t, a)

	const key = 0x5d
	db := startApp(t, modeEcho, key)
	dbPort, webPort, upPort := freePort(t), freePort(t), freePort(t)
	dbPod := registerK8sPod(t, a, "db", db.Port(), dbPort, nil)
	webApp := startApp(t, modeEcho, 0x11)
	webPod := registerK8sPod(t, a, "web", webApp.Port(), webPort, []api.Upstream{
		{DestinationType: api.UpstreamDestTypeService, DestinationName: "db", LocalBindAddress: "127.0.0.1", LocalBindPort: upPort},
	})
	// proxy-defaults, merged by the server into the registration: strait
	// must see max_inbound_connections from service-defaults.
	if _, _, err := a.client.ConfigEntries().Set(&api.ServiceConfigEntry{Kind: api.ServiceDefaults, Name: "db", Protocol: "tcp", MaxInboundConnections: 77}, nil); err != nil {
		t.Fatalf("service-defaults: %v", err)
	}
	a.setIntention(t, "web", "db", api.IntentionActionAllow)

	dbProxy := startDataplane(t, a, j, dbPod, "127.0.0.1", "-startup-grace-period-seconds=30")
	// consul-k8s's graceful startup hook: 200 once strait is ready.
	if code, err := adminGet(dbProxy, "/graceful_startup"); err != nil || code != 200 {
		t.Errorf("/graceful_startup on a ready strait: %d %v", code, err)
	}
	// The first address is down: strait must move on to the live one.
	down := "127.0.0.3"
	webProxy := startDataplane(t, a, j, webPod, down+","+"127.0.0.1")
	if !strings.Contains(webProxy.Output(), "server unreachable; moving to the next") || !strings.Contains(webProxy.Output(), down) {
		t.Errorf("web's strait did not report skipping the down server %s", down)
	}
	if !strings.Contains(webProxy.Output(), "envoy-concurrency") {
		t.Errorf("no warning about the ignored Envoy-only flag")
	}
	up := hostPort(upPort)
	eventually(t, 30*time.Second, func() error { return echoVia("tcp", up, 4096, key) })

	// The merged service-defaults reached db's strait (its /config).
	eventually(t, 15*time.Second, func() error {
		var doc struct {
			Proxy *struct {
				Public *struct {
					MaxInboundConnections int `json:"max_inbound_connections"`
				} `json:"public"`
			} `json:"proxy"`
		}
		if code, err := adminGetJSON(dbProxy, "/config", &doc); err != nil || code != 200 {
			return fmt.Errorf("/config: %d %v", code, err)
		}
		if doc.Proxy == nil || doc.Proxy.Public == nil || doc.Proxy.Public.MaxInboundConnections != 77 {
			return fmt.Errorf("/config does not show service-defaults' MaxInboundConnections 77: %+v", doc.Proxy)
		}
		return nil
	})

	// The leaf's key was made in strait: the server has no leaf cached
	// for it, and the certificate names web in this datacenter.
	if !strings.Contains(webProxy.Output(), "certificates ready") {
		t.Errorf("web's strait logged no certificates")
	}

	// Deleting web's login token on the server: strait logs in again and
	// traffic goes on.
	toks := loginTokens(t, a, j, webPod)
	if len(toks) != 1 {
		t.Fatalf("want 1 login token for web's pod, have %d", len(toks))
	}
	old := toks[0].AccessorID
	if _, err := a.client.ACL().TokenDelete(old, nil); err != nil {
		t.Fatalf("delete web's token: %v", err)
	}
	eventually(t, 30*time.Second, func() error {
		toks := loginTokens(t, a, j, webPod)
		if len(toks) != 1 || toks[0].AccessorID == old {
			return fmt.Errorf("web's pod has %d login tokens, want a new one", len(toks))
		}
		return nil
	})
	if n := strings.Count(webProxy.Output(), "logged in"); n < 2 {
		t.Errorf("web's strait logged in %d times, want 2", n)
	}
	eventually(t, 30*time.Second, func() error { return echoVia("tcp", up, 4096, key) })
	for series, want := range map[string]float64{
		`dataplane_logins_total{result="ok"}`:     2,
		`dataplane_server_switches_total`:         1,
		`dataplane_leaf_signs_total{result="ok"}`: 1,
	} {
		if got := metricValue(t, webProxy, series); got != want {
			t.Errorf("web's %s = %v, want %v", series, got, want)
		}
	}

	// A deny intention refuses new connections.
	a.setIntention(t, "web", "db", api.IntentionActionDeny)
	eventually(t, 30*time.Second, func() error { return refusedVia("tcp", up) })

	// SIGTERM: web's strait drains, exits 0 and logs out (its token is
	// gone from the server).
	if err := webProxy.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-webProxy.done:
	case <-time.After(stopTimeout):
		t.Fatalf("web's strait still running %s after SIGTERM", stopTimeout)
	}
	if webProxy.waitErr != nil {
		t.Errorf("web's strait exited with %v", webProxy.waitErr)
	}
	if !strings.Contains(webProxy.Output(), "logged out") {
		t.Errorf("web's strait did not log out")
	}
	if toks := loginTokens(t, a, j, webPod); len(toks) != 0 {
		t.Errorf("web's login token still on the server after SIGTERM: %s", toks[0].AccessorID)
	}
	// db's own token is still there: logout touched only web's.
	if toks := loginTokens(t, a, j, dbPod); len(toks) != 1 {
		t.Errorf("db's pod has %d login tokens, want 1", len(toks))
	}

	// consul-k8s's graceful shutdown hook: db's strait drains and exits
	// as on SIGTERM, and logs out.
	if code, err := adminGet(dbProxy, "/graceful_shutdown"); err != nil || code != 200 {
		t.Fatalf("/graceful_shutdown: %d %v", code, err)
	}
	select {
	case <-dbProxy.done:
	case <-time.After(stopTimeout):
		t.Fatalf("db's strait still running %s after /graceful_shutdown", stopTimeout)
	}
	if dbProxy.waitErr != nil {
		t.Errorf("db's strait exited with %v", dbProxy.waitErr)
	}
	if toks := loginTokens(t, a, j, dbPod); len(toks) != 0 {
		t.Errorf("db's login token still on the server after the graceful shutdown")
	}
}

// adminGet GETs path from p's admin listener and returns the status code.
func adminGet(p *proc, path string) (int, error) {
	resp, err := adminClient.Get("http://" + p.adminAddr + path)
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	return resp.StatusCode, nil
}

// TestDataplaneCARotation: without an agent nobody renews strait's leaf but
// strait itself. After the CA is rotated, strait dataplane has a new leaf
// signed (from a CSR of its own) at once, and serves it: a client that
// trusts only the new root completes a handshake with its public listener.
func TestDataplaneCARotation(t *testing.T) {
	t.Parallel()
	a := startAgentOpts(t, agentOpts{aclDeny: true})
	j := newJWTAuthMethod(t, a)
	const key = 0x3c
	db := startApp(t, modeEcho, key)
	dbPort := freePort(t)
	dbPod := registerK8sPod(t, a, "db", db.Port(), dbPort, nil)
	a.setIntention(t, "*", "db", api.IntentionActionAllow)
	dbProxy := startDataplane(t, a, j, dbPod, "127.0.0.1")

	oldOnly := x509.NewCertPool()
	oldOnly.AddCert(a.ca.cert)
	probe := a.leaf(t, uniq("probe"))
	eventually(t, 30*time.Second, func() error {
		c, err := dialMesh(hostPort(dbPort), meshClientConfig(&probe, oldOnly, a.spiffeID("db")))
		if err != nil {
			return err
		}
		defer c.Close()
		return roundTrip(c, []byte("old root"), key, 10*time.Second)
	})

	rotated := time.Now()
	newCA := newTestCA(t, a.trustDomain)
	a.installCA(t, newCA)
	newOnly := x509.NewCertPool()
	newOnly.AddCert(newCA.cert)
	probe = a.leaf(t, uniq("probe"))
	if err := probe.Leaf.CheckSignatureFrom(newCA.cert); err != nil {
		t.Fatalf("post-rotation probe leaf not from the new root: %v", err)
	}
	eventually(t, 30*time.Second, func() error {
		c, err := dialMesh(hostPort(dbPort), meshClientConfig(&probe, newOnly, a.spiffeID("db")))
		if err != nil {
			return fmt.Errorf("db's strait with new-root-only trust: %w", err)
		}
		defer c.Close()
		return roundTrip(c, []byte("new root"), key, 10*time.Second)
	})
	t.Logf("strait dataplane serves a new-root leaf %s after the rotation", time.Since(rotated).Round(time.Millisecond))
	if !strings.Contains(dbProxy.Output(), "active CA root changed; renewing the leaf") {
		t.Errorf("db's strait did not log the renewal on the root change")
	}
}

// tcpForwarder relays every connection to listen to target, until Close,
// which also cuts the connections it carries: a server that goes away.
type tcpForwarder struct {
	ln    net.Listener
	mu    sync.Mutex
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
	n     atomic.Int64
}

func startForwarder(t *testing.T, listen, target string) *tcpForwarder {
	t.Helper()
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		t.Fatalf("forwarder on %s: %v", listen, err)
	}
	f := &tcpForwarder{ln: ln, conns: map[net.Conn]struct{}{}}
	f.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			f.n.Add(1)
			f.mu.Lock()
			f.conns[c], f.conns[up] = struct{}{}, struct{}{}
			f.mu.Unlock()
			f.wg.Go(func() { io.Copy(up, c); up.Close() })
			f.wg.Go(func() { io.Copy(c, up); c.Close() })
		}
	})
	t.Cleanup(f.Close)
	return f
}

func (f *tcpForwarder) Close() {
	f.ln.Close()
	f.mu.Lock()
	for c := range f.conns {
		c.Close()
	}
	f.mu.Unlock()
	f.wg.Wait()
}

// TestDataplaneServerFailover: both strait dataplanes use the first of two
// server addresses (a relay to the dev server on 127.0.0.5, HTTP and gRPC
// ports) until it goes away with their connections; they move to the
// second and keep following the servers: a new deny intention still
// reaches them, and new logins go there.
func TestDataplaneServerFailover(t *testing.T) {
	t.Parallel()
	a := startAgentOpts(t, agentOpts{aclDeny: true})
	j := newJWTAuthMethod(t, a)
	const relayIP = "127.0.0.5"
	_, httpPort, _ := strings.Cut(a.httpAddr, ":")
	relays := []*tcpForwarder{
		startForwarder(t, net.JoinHostPort(relayIP, httpPort), a.httpAddr),
		startForwarder(t, net.JoinHostPort(relayIP, strconv.Itoa(a.grpcPort)), hostPort(a.grpcPort)),
	}
	const key = 0x77
	db := startApp(t, modeEcho, key)
	dbPort, upPort := freePort(t), freePort(t)
	dbPod := registerK8sPod(t, a, "db", db.Port(), dbPort, nil)
	webPod := registerK8sPod(t, a, "web", startApp(t, modeEcho, 1).Port(), freePort(t), []api.Upstream{
		{DestinationName: "db", LocalBindAddress: "127.0.0.1", LocalBindPort: upPort},
	})
	a.setIntention(t, "web", "db", api.IntentionActionAllow)
	addrs := relayIP + " 127.0.0.1"
	dbProxy := startDataplane(t, a, j, dbPod, addrs)
	webProxy := startDataplane(t, a, j, webPod, addrs)
	up := hostPort(upPort)
	eventually(t, 30*time.Second, func() error { return echoVia("tcp", up, 2048, key) })
	if relays[0].n.Load() == 0 || relays[1].n.Load() == 0 {
		t.Fatalf("the first server address was not used (HTTP %d, gRPC %d connections)", relays[0].n.Load(), relays[1].n.Load())
	}

	for _, r := range relays {
		r.Close()
	}
	t.Logf("server %s gone", relayIP)
	a.setIntention(t, "web", "db", api.IntentionActionDeny)
	eventually(t, 30*time.Second, func() error { return refusedVia("tcp", up) })
	for _, p := range []*proc{dbProxy, webProxy} {
		out := p.Output()
		if !strings.Contains(out, "server unreachable; moving to the next: server="+relayIP) {
			t.Errorf("pid %d did not report moving away from %s", p.Pid(), relayIP)
		}
	}
	// A new login (the old token deleted) goes to the live server.
	toks := loginTokens(t, a, j, webPod)
	if len(toks) != 1 {
		t.Fatalf("web's pod has %d login tokens", len(toks))
	}
	old := toks[0].AccessorID
	if _, err := a.client.ACL().TokenDelete(old, nil); err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, func() error {
		if toks := loginTokens(t, a, j, webPod); len(toks) != 1 || toks[0].AccessorID == old {
			return fmt.Errorf("no new login for web yet")
		}
		return nil
	})
}
