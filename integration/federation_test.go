package integration

// Mesh gateways (strait -gateway mesh) against real agents: one dev agent,
// and two WAN-federated ones (dc1 primary, dc2 secondary with its CA an
// intermediate of dc1's root).

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/agent/connect"
	"github.com/hashicorp/consul/api"
)

// startAgentArgs starts a dev agent like startAgent, with extra arguments,
// and does not install a test CA (a secondary datacenter gets its
// intermediate from the primary's CA).
func startAgentArgs(t testing.TB, extra ...string) *agent {
	t.Helper()
	requireConsul(t)
	var lastErr error
	for attempt := 1; attempt <= 3; attempt++ {
		ports := freePorts(t, 6)
		args := []string{
			"agent", "-dev",
			"-log-level", "info",
			"-node", uniq("strait-it"),
			"-bind", "127.0.0.1",
			"-client", "127.0.0.1",
			"-data-dir", t.TempDir(),
			"-http-port", strconv.Itoa(ports[0]),
			"-grpc-port", strconv.Itoa(ports[1]),
			"-grpc-tls-port", "-1",
			"-dns-port", "-1",
			"-serf-lan-port", strconv.Itoa(ports[2]),
			"-serf-wan-port", strconv.Itoa(ports[3]),
			"-server-port", strconv.Itoa(ports[4]),
		}
		a := &agent{args: append(args, extra...), httpAddr: hostPort(ports[0])}
		client, err := api.NewClient(&api.Config{Address: a.httpAddr, Scheme: "http"})
		if err != nil {
			t.Fatal(err)
		}
		a.client = client
		if lastErr = a.launch(t); lastErr == nil {
			return a
		}
		t.Logf("agent start attempt %d failed: %v", attempt, lastErr)
	}
	t.Fatalf("could not start consul agent: %v", lastErr)
	return nil
}

// argValue is the value following flag in args.
func argValue(t testing.TB, args []string, flag string) string {
	t.Helper()
	for i, a := range args {
		if a == flag && i+1 < len(args) {
			return args[i+1]
		}
	}
	t.Fatalf("%s not in %v", flag, args)
	return ""
}

// startFederation starts dc1 (primary, with the test CA) and dc2
// (primary_datacenter dc1, joined over the WAN to dc1's serf WAN port),
// and waits until they see each other and dc2 issues leaves chained to
// dc1's root.
func startFederation(t testing.TB) (dc1, dc2 *agent) {
	t.Helper()
	dc1 = startAgent(t)
	if dc1.dc != "dc1" {
		t.Fatalf("primary datacenter %q, want dc1", dc1.dc)
	}
	wan := argValue(t, dc1.args, "-serf-wan-port")
	dc2 = startAgentArgs(t, "-datacenter", "dc2", "-hcl", `primary_datacenter = "dc1"`,
		"-retry-join-wan", "127.0.0.1:"+wan)
	for _, a := range []*agent{dc1, dc2} {
		eventually(t, 60*time.Second, func() error {
			dcs, err := a.client.Catalog().Datacenters()
			if err != nil {
				return err
			}
			if len(dcs) != 2 {
				return fmt.Errorf("%s sees datacenters %v, want dc1 and dc2", a.dc, dcs)
			}
			return nil
		})
	}
	want := connect.CalculateCertFingerprint(dc1.ca.cert.Raw)
	eventually(t, 60*time.Second, func() error {
		roots, _, err := dc2.client.Agent().ConnectCARoots(nil)
		if err != nil {
			return err
		}
		if roots.ActiveRootID != want {
			return fmt.Errorf("dc2's active root %s, want dc1's test CA %s", roots.ActiveRootID, want)
		}
		if roots.TrustDomain != dc1.trustDomain {
			return fmt.Errorf("dc2's trust domain %s, want dc1's %s", roots.TrustDomain, dc1.trustDomain)
		}
		return nil
	})
	dc2.trustDomain = dc1.trustDomain
	// dc2's leaves are signed by its intermediate and verify against dc1's
	// root.
	leaf := dc2.leaf(t, "probe")
	if err := verifyMeshServer(certsOf(t, leaf), dc1.roots(t), ""); err != nil {
		t.Fatalf("dc2 leaf against dc1's roots: %v", err)
	}
	return dc1, dc2
}

func certsOf(t testing.TB, c tls.Certificate) []*x509.Certificate {
	t.Helper()
	var out []*x509.Certificate
	for _, der := range c.Certificate {
		x, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, x)
	}
	return out
}

// sni is Consul's server name of a service in the default namespace and
// partition.
func sni(service, dc, td string) string {
	return fmt.Sprintf("%s.default.%s.internal.%s", service, dc, td)
}

// startGateway starts strait -gateway mesh against a and waits until it
// logs "gateway ready".
func startGateway(t testing.TB, a *agent, args ...string) *proc {
	t.Helper()
	return startGatewayKind(t, a, "mesh", args...)
}

// startGatewayKind starts strait -gateway <kind> against a and waits until
// it logs "gateway ready".
func startGatewayKind(t testing.TB, a *agent, kind string, args ...string) *proc {
	t.Helper()
	requireStrait(t)
	args, admin := withAdmin(t, append([]string{"-gateway", kind, "-http-addr", a.httpAddr}, args...))
	p := startProc(t, "strait-gateway", straitBin, args, cleanEnv(), true)
	p.adminAddr = admin
	err := poll(30*time.Second, func() error {
		if strings.Contains(p.Output(), "gateway ready") || p.exited() {
			return nil
		}
		return errors.New(`no "gateway ready" log line`)
	})
	if p.exited() {
		t.Fatalf("gateway (pid %d) exited before becoming ready: %v", p.Pid(), p.waitErr)
	}
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// metricValue reads one series (name and rendered labels, as exposed:
// `name{a="b"}`) from strait's /metrics; -1 when it is absent.
func metricValue(t testing.TB, p *proc, series string) float64 {
	t.Helper()
	name, labels, _ := strings.Cut(series, "{")
	if labels != "" {
		labels = "{" + labels
	}
	all, err := promSeries(p, name)
	if err != nil {
		t.Fatalf("reading /metrics: %v", err)
	}
	v, ok := all[labels]
	if !ok {
		return -1
	}
	return v
}

// meshVia dials the gateway at addr with server name serverName as client
// (a leaf from a), expects the server to be wantURI, and round-trips
// payloads XORed by key.
func meshVia(addr, serverName string, cert tls.Certificate, roots *x509.CertPool, wantURI string, key byte) error {
	cfg := meshClientConfig(&cert, roots, wantURI)
	cfg.ServerName = serverName
	c, err := dialMesh(addr, cfg)
	if err != nil {
		return err
	}
	defer c.Close()
	for _, size := range []int{7, 64 << 10} {
		payload := make([]byte, size)
		for i := range payload {
			payload[i] = byte(i * 7)
		}
		if err := roundTrip(c, payload, key, 10*time.Second); err != nil {
			return fmt.Errorf("%d bytes: %w", size, err)
		}
	}
	return nil
}

// refusedAtGateway dials the gateway with serverName and expects the
// connection closed before any TLS answer.
func refusedAtGateway(addr, serverName string) error {
	cfg := &tls.Config{ServerName: serverName, InsecureSkipVerify: true}
	raw, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return err
	}
	defer raw.Close()
	c := tls.Client(raw, cfg)
	c.SetDeadline(time.Now().Add(10 * time.Second))
	err = c.Handshake()
	if err == nil {
		return errors.New("handshake completed through the gateway")
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return fmt.Errorf("neither refused nor answered: %w", err)
	}
	if !errors.Is(err, io.EOF) && !strings.Contains(err.Error(), "reset") {
		return fmt.Errorf("handshake failed otherwise than by a close: %w", err)
	}
	return nil
}

// TestGatewayToBuiltinSidecar: a Go mTLS client with a leaf from the
// agent reaches a service whose sidecar is a real `consul connect proxy`
// through a strait mesh gateway, by the service's server name; unknown
// names are refused and counted; the gateway registers as a mesh-gateway
// and deregisters on exit.
func TestGatewayToBuiltinSidecar(t *testing.T) {
	t.Parallel()
	a := startAgent(t)
	const key = 0x3c
	app := startApp(t, modeEcho, key)
	web := uniq("web")
	sidecarPort := freePort(t)
	err := a.client.Agent().ServiceRegister(&api.AgentServiceRegistration{
		ID: web, Name: web, Address: "127.0.0.1", Port: app.Port(),
		Connect: &api.AgentServiceConnect{SidecarService: &api.AgentServiceRegistration{Port: sidecarPort}},
	})
	if err != nil {
		t.Fatal(err)
	}
	startBuiltin(t, a, "-sidecar-for", web)

	gwName := uniq("mgw")
	gwAddr := hostPort(freePort(t))
	gw := startGateway(t, a, "-register", "-service", gwName, "-address", gwAddr, "-access-log", "on")
	var reg *api.AgentService
	eventually(t, 10*time.Second, func() error {
		var err error
		reg, _, err = a.client.Agent().Service(gwName, nil)
		return err
	})
	if reg.Kind != api.ServiceKindMeshGateway || reg.TaggedAddresses["lan"].Address != "127.0.0.1" ||
		strconv.Itoa(reg.Port) != portOf(gwAddr) {
		t.Errorf("registration %+v: want Kind mesh-gateway, lan tagged 127.0.0.1 and the -address port", reg)
	}

	leaf := a.leaf(t, "client")
	name := sni(web, a.dc, a.trustDomain)
	eventually(t, 30*time.Second, func() error {
		return meshVia(gwAddr, name, leaf, a.roots(t), a.spiffeID(web), key)
	})
	if !strings.Contains(gw.Output(), "sni="+name) || !strings.Contains(gw.Output(), "route=local") {
		t.Errorf("no access log line for the routed connection")
	}

	for _, tc := range []struct{ sni, reason string }{
		{sni(uniq("nope"), a.dc, a.trustDomain), "unknown_service"},
		{sni(web, a.dc, "00000000-0000-0000-0000-000000000000.consul"), "wrong_trust_domain"},
	} {
		if err := refusedAtGateway(gwAddr, tc.sni); err != nil {
			t.Errorf("%s: %v", tc.sni, err)
		}
		series := `gateway_unknown_sni_total{reason="` + tc.reason + `"}`
		if v := metricValue(t, gw, series); v != 1 {
			t.Errorf("%s = %v, want 1", series, v)
		}
	}
	if v := metricValue(t, gw, `gateway_connections_total{result="unknown_sni"}`); v != 2 {
		t.Errorf("unknown_sni connections %v, want 2", v)
	}

	gw.stop(t)
	if _, _, err := a.client.Agent().Service(gwName, nil); err == nil {
		t.Errorf("gateway %s still registered after it stopped", gwName)
	}
}

// TestGatewaySubsets: a subset's server name reaches only the instances
// its resolver filter selects, healthy ones only (a critical instance
// never, a warning one unless the subset is OnlyPassing); the plain name
// reaches the DefaultSubset's; an undefined subset is refused. Each
// instance echoes with its own key, so every connection shows where it
// went.
func TestGatewaySubsets(t *testing.T) {
	t.Parallel()
	a := startAgent(t)
	svc := uniq("api")
	native := nativeService(t, a, svc)
	for _, in := range []struct {
		id, version, status string
		key                 byte
	}{
		{"v1", "v1", api.HealthPassing, 0x11},
		{"v1-warning", "v1", api.HealthWarning, 0x44},
		{"v2", "v2", api.HealthPassing, 0x22},
		{"v2-critical", "v2", api.HealthCritical, 0x33},
	} {
		ln, err := tls.Listen("tcp", "127.0.0.1:0", native.ServerTLSConfig())
		if err != nil {
			t.Fatal(err)
		}
		srv := serveApp(t, ln, modeEcho, in.key)
		err = a.client.Agent().ServiceRegister(&api.AgentServiceRegistration{
			ID: svc + "-" + in.id, Name: svc, Address: "127.0.0.1", Port: srv.Port(),
			Meta:    map[string]string{"version": in.version},
			Connect: &api.AgentServiceConnect{Native: true},
			Check:   &api.AgentServiceCheck{TTL: "10m", Status: in.status},
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	_, _, err := a.client.ConfigEntries().Set(&api.ServiceResolverConfigEntry{
		Kind: api.ServiceResolver, Name: svc, DefaultSubset: "v1",
		Subsets: map[string]api.ServiceResolverSubset{
			"v1":       {Filter: `Service.Meta.version == "v1"`},
			"v1strict": {Filter: `Service.Meta.version == "v1"`, OnlyPassing: true},
			"v2":       {Filter: `Service.Meta.version == "v2"`},
		},
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	gwAddr := hostPort(freePort(t))
	gw := startGateway(t, a, "-address", gwAddr)
	leaf := a.leaf(t, "client")
	cfg := meshClientConfig(&leaf, a.roots(t), a.spiffeID(svc))
	for _, tc := range []struct {
		name string
		keys []byte // every one seen, no other
	}{
		{"v2." + sni(svc, a.dc, a.trustDomain), []byte{0x22}},
		{"v1strict." + sni(svc, a.dc, a.trustDomain), []byte{0x11}},
		{"v1." + sni(svc, a.dc, a.trustDomain), []byte{0x11, 0x44}},
		{sni(svc, a.dc, a.trustDomain), []byte{0x11, 0x44}}, // DefaultSubset
	} {
		cfg.ServerName = tc.name
		eventually(t, 30*time.Second, func() error { _, err := echoKey(gwAddr, cfg); return err })
		seen := map[byte]int{}
		for i := range 16 {
			k, err := echoKey(gwAddr, cfg)
			if err != nil {
				t.Fatalf("%s, connection %d: %v", tc.name, i, err)
			}
			seen[k]++
		}
		for k := range seen {
			if !bytes.Contains(tc.keys, []byte{k}) {
				t.Errorf("%s reached the instance with key %#x (seen %v), want only %#v", tc.name, k, seen, tc.keys)
			}
		}
		for _, k := range tc.keys {
			if seen[k] == 0 {
				t.Errorf("%s never reached the instance with key %#x in 16 connections (seen %v)", tc.name, k, seen)
			}
		}
	}
	if err := refusedAtGateway(gwAddr, "v3."+sni(svc, a.dc, a.trustDomain)); err != nil {
		t.Errorf("undefined subset: %v", err)
	}
	if v := metricValue(t, gw, `gateway_unknown_sni_total{reason="unknown_subset"}`); v != 1 {
		t.Errorf("unknown_subset %v, want 1", v)
	}
}

// echoKey connects through the gateway with cfg, sends one byte and
// returns the key the echo instance XORed it with.
func echoKey(addr string, cfg *tls.Config) (byte, error) {
	c, err := dialMesh(addr, cfg)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte{0x80}); err != nil {
		return 0, err
	}
	b := make([]byte, 1)
	if _, err := io.ReadFull(c, b); err != nil {
		return 0, err
	}
	return b[0] ^ 0x80, nil
}

// TestGatewayAcrossDatacenters: a client in dc1 reaches a service in dc2
// (behind a strait sidecar) through dc1's strait gateway and dc2's strait
// gateway, by the dc2 service's server name; TLS runs end to end (the
// client checks dc2's SPIFFE ID). dc1's gateway dials dc2's gateway at its
// WAN address, which differs from its LAN one and is listened on too.
func TestGatewayAcrossDatacenters(t *testing.T) {
	t.Parallel()
	dc1, dc2 := startFederation(t)
	const key = 0x5a
	app := startApp(t, modeEcho, key)
	db := uniq("db")
	pub := hostPort(freePort(t))
	startStrait(t, dc2, "-service", db, "-listen", pub, "-service-addr", app.Addr(), "-register")
	// The service itself is registered too: like Consul's, the gateway
	// routes only names in the catalog, and -register registers only the
	// proxy (db-proxy).
	if err := dc2.client.Agent().ServiceRegister(&api.AgentServiceRegistration{
		ID: db, Name: db, Address: "127.0.0.1", Port: app.Port(),
	}); err != nil {
		t.Fatal(err)
	}

	ports := freePorts(t, 3)
	gw2LAN, gw2WAN, gw1Addr := hostPort(ports[0]), hostPort(ports[1]), hostPort(ports[2])
	gw2 := startGateway(t, dc2, "-register", "-address", gw2LAN, "-wan-address", gw2WAN, "-access-log", "on")
	gw1 := startGateway(t, dc1, "-register", "-address", gw1Addr, "-access-log", "on")

	leaf := dc1.leaf(t, uniq("web"))
	name := sni(db, "dc2", dc1.trustDomain)
	want := fmt.Sprintf("spiffe://%s/ns/default/dc/dc2/svc/%s", dc1.trustDomain, db)
	eventually(t, 60*time.Second, func() error { return meshVia(gw1Addr, name, leaf, dc1.roots(t), want, key) })

	// The path: dc1's gateway sent it to dc2's gateway's WAN address,
	// which sent it to the sidecar.
	eventually(t, 10*time.Second, func() error {
		if !strings.Contains(gw1.Output(), "route=remote target=dc2 upstream="+gw2WAN) {
			return errors.New("dc1 gateway logged no remote route to dc2's WAN address")
		}
		if !strings.Contains(gw2.Output(), "route=local target="+db+" upstream="+pub) {
			return errors.New("dc2 gateway logged no local route to the sidecar")
		}
		return nil
	})
	if v := metricValue(t, gw1, `gateway_connections_total{result="routed"}`); v < 1 {
		t.Errorf("dc1 gateway routed %v", v)
	}

	if err := refusedAtGateway(gw1Addr, sni(db, "dc9", dc1.trustDomain)); err != nil {
		t.Errorf("unknown datacenter: %v", err)
	}
	if v := metricValue(t, gw1, `gateway_unknown_sni_total{reason="unknown_datacenter"}`); v != 1 {
		t.Errorf("unknown_datacenter %v, want 1", v)
	}
}

// TestGatewayHostileClients: on the real binary, idle connections fill
// -max-pending and the next one is closed at once; garbage and a slow
// hello are closed and counted; once the idle ones time out, a real
// client is routed again.
func TestGatewayHostileClients(t *testing.T) {
	t.Parallel()
	a := startAgent(t)
	const key = 0x6b
	svc := uniq("echo")
	startNativeServer(t, a, svc, key)
	gwAddr := hostPort(freePort(t))
	gw := startGateway(t, a, "-address", gwAddr, "-max-pending", "8", "-hello-timeout", "2s")
	leaf := a.leaf(t, "client")
	roots := a.roots(t)
	name := sni(svc, a.dc, a.trustDomain)
	eventually(t, 30*time.Second, func() error { return meshVia(gwAddr, name, leaf, roots, a.spiffeID(svc), key) })

	var idle []net.Conn
	for range 8 {
		c, err := net.Dial("tcp", gwAddr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		idle = append(idle, c)
	}
	eventually(t, 10*time.Second, func() error {
		if v := metricValue(t, gw, "gateway_pending_hellos"); v != 8 {
			return fmt.Errorf("pending hellos %v, want 8", v)
		}
		return nil
	})
	if err := refusedVia("tcp", gwAddr); err != nil {
		t.Fatalf("the connection beyond -max-pending: %v", err)
	}
	if v := metricValue(t, gw, `gateway_connections_total{result="max_pending"}`); v < 1 {
		t.Errorf("max_pending %v, want at least 1", v)
	}
	// The idle ones time out; slots come back.
	eventually(t, 10*time.Second, func() error {
		if v := metricValue(t, gw, `gateway_connections_total{result="hello_timeout"}`); v != 8 {
			return fmt.Errorf("hello timeouts %v, want 8", v)
		}
		return nil
	})
	if err := refusedVia("tcp", gwAddr); err != nil { // sends plain text: not TLS
		t.Errorf("garbage: %v", err)
	}
	eventually(t, 10*time.Second, func() error {
		if v := metricValue(t, gw, `gateway_connections_total{result="bad_hello"}`); v != 1 {
			return fmt.Errorf("bad hellos %v, want 1", v)
		}
		return nil
	})
	if err := meshVia(gwAddr, name, leaf, roots, a.spiffeID(svc), key); err != nil {
		t.Fatalf("a real client after the flood: %v", err)
	}
	_ = idle
}

// TestGatewayDrainsOnSigterm: SIGTERM deregisters the gateway and stops
// accepting; a live connection keeps working until it ends, and then the
// gateway exits 0.
func TestGatewayDrainsOnSigterm(t *testing.T) {
	t.Parallel()
	a := startAgent(t)
	const key = 0x19
	svc := uniq("echo")
	startNativeServer(t, a, svc, key)
	gwName := uniq("mgw")
	gwAddr := hostPort(freePort(t))
	gw := startGateway(t, a, "-register", "-service", gwName, "-address", gwAddr, "-shutdown-grace", "30s")
	leaf := a.leaf(t, "client")
	cfg := meshClientConfig(&leaf, a.roots(t), a.spiffeID(svc))
	cfg.ServerName = sni(svc, a.dc, a.trustDomain)
	var live *tls.Conn
	eventually(t, 30*time.Second, func() error {
		c, err := dialMesh(gwAddr, cfg)
		if err != nil {
			return err
		}
		if err := roundTrip(c, []byte("before"), key, 10*time.Second); err != nil {
			c.Close()
			return err
		}
		live = c
		return nil
	})
	defer live.Close()

	if err := gw.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, func() error { return dialFails(gwAddr) })
	eventually(t, 10*time.Second, func() error {
		if _, _, err := a.client.Agent().Service(gwName, nil); err == nil {
			return errors.New("gateway still registered while draining")
		}
		return nil
	})
	if err := roundTrip(live, randomBytes(t, 256<<10), key, 10*time.Second); err != nil {
		t.Fatalf("live connection while draining: %v", err)
	}
	if gw.exited() {
		t.Fatal("gateway exited with a live connection")
	}
	live.Close()
	select {
	case <-gw.done:
		if gw.waitErr != nil {
			t.Fatalf("gateway exit: %v", gw.waitErr)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("gateway still running 20s after its last connection ended")
	}
}
