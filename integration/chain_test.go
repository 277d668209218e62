package integration

import (
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// Discovery chains with real agents: every test writes config entries to
// a dev agent and checks which instance answers through a strait upstream.
// Instances are echo apps with distinct keys, so one byte through the
// upstream says which one served it.

// setEntry writes a config entry.
func (a *agent) setEntry(t testing.TB, e api.ConfigEntry) {
	t.Helper()
	if _, _, err := a.client.ConfigEntries().Set(e, nil); err != nil {
		t.Fatalf("writing %s %s: %v", e.GetKind(), e.GetName(), err)
	}
}

// subsets are the v1 and v2 subsets by Service.Meta.version.
func subsets() map[string]api.ServiceResolverSubset {
	return map[string]api.ServiceResolverSubset{
		"v1": {Filter: `Service.Meta.version == "v1"`},
		"v2": {Filter: `Service.Meta.version == "v2"`},
	}
}

// startChainInstance runs one Connect-native instance of svc with meta and
// a TTL check (passing), answering the echo protocol XOR key. It returns
// the check's ID.
func startChainInstance(t testing.TB, a *agent, svc string, meta map[string]string, key byte) string {
	t.Helper()
	sdk := nativeService(t, a, svc)
	ln, err := tls.Listen("tcp", "127.0.0.1:0", sdk.ServerTLSConfig())
	if err != nil {
		t.Fatal(err)
	}
	srv := serveApp(t, ln, modeEcho, key)
	id := fmt.Sprintf("%s-%d", svc, srv.Port())
	check := id + "-ttl"
	err = a.client.Agent().ServiceRegister(&api.AgentServiceRegistration{
		ID: id, Name: svc, Address: "127.0.0.1", Port: srv.Port(), Meta: meta,
		Connect: &api.AgentServiceConnect{Native: true},
		Checks:  api.AgentServiceChecks{{CheckID: check, TTL: "1h", Status: api.HealthPassing}},
	})
	if err != nil {
		t.Fatalf("register %s: %v", id, err)
	}
	return check
}

// answeredBy sends one zero byte through addr (from src when not empty)
// and returns the answer: the key of the instance that served it.
func answeredBy(addr, src string) (byte, error) {
	d := net.Dialer{Timeout: 5 * time.Second}
	if src != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(src)}
	}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte{0}); err != nil {
		return 0, err
	}
	b := make([]byte, 1)
	if _, err := io.ReadFull(c, b); err != nil {
		return 0, fmt.Errorf("reading the answer: %w", err)
	}
	return b[0], nil
}

// allAnsweredBy checks that n connections through addr are all served by
// the instance with key want.
func allAnsweredBy(addr string, n int, want byte) error {
	for i := range n {
		got, err := answeredBy(addr, "")
		if err != nil {
			return fmt.Errorf("connection %d: %w", i, err)
		}
		if got != want {
			return fmt.Errorf("connection %d answered by %#x, want %#x", i, got, want)
		}
	}
	return nil
}

// startChainClient runs a flags-mode strait with one upstream to dst and
// returns it with the upstream's address.
func startChainClient(t testing.TB, a *agent, dst string, extra ...string) (*proc, string) {
	t.Helper()
	port := freePort(t)
	args := append([]string{"-service", uniq("web"), "-upstream", fmt.Sprintf("%s:%d", dst, port)}, extra...)
	return startStrait(t, a, args...), hostPort(port)
}

// adminChain is an upstream's chain as /upstreams shows it.
type adminChain struct {
	Protocol string `json:"protocol"`
	Legs     []struct {
		Weight  float64  `json:"weight"`
		Targets []string `json:"targets"`
		Active  string   `json:"active"`
	} `json:"legs"`
	Targets []struct {
		ID        string `json:"id"`
		SNI       string `json:"sni"`
		Active    bool   `json:"active"`
		Via       string `json:"via"`
		Endpoints []struct {
			Addr    string `json:"addr"`
			Gateway string `json:"gateway"`
		} `json:"endpoints"`
	} `json:"targets"`
}

// upstreamChains returns the chains in p's /upstreams by listen address.
func upstreamChains(p *proc) (map[string]*adminChain, error) {
	var out struct {
		Upstreams []struct {
			Listen string      `json:"listen"`
			Chain  *adminChain `json:"chain"`
		} `json:"upstreams"`
	}
	if code, err := adminGetJSON(p, "/upstreams", &out); err != nil || code != 200 {
		return nil, fmt.Errorf("/upstreams: %d %v", code, err)
	}
	m := map[string]*adminChain{}
	for _, u := range out.Upstreams {
		if u.Chain != nil {
			m[u.Listen] = u.Chain
		}
	}
	return m, nil
}

// upstreamChain returns the chain of p's only upstream.
func upstreamChain(p *proc) (*adminChain, error) {
	m, err := upstreamChains(p)
	if err != nil {
		return nil, err
	}
	if len(m) != 1 {
		return nil, fmt.Errorf("/upstreams has %d chains, want 1", len(m))
	}
	for _, c := range m {
		return c, nil
	}
	return nil, nil
}

// TestChainDefaultSubsetOfSidecars: a service-resolver's DefaultSubset
// selects instances by Service.Meta, which sidecars registered with
// sidecar_service (strait -sidecar-for, agent mode) inherit from their
// service; changing the DefaultSubset moves new connections.
func TestChainDefaultSubsetOfSidecars(t *testing.T) {
	t.Parallel()
	a := startAgent(t)
	db := uniq("db")
	const key1, key2 = 0x31, 0x32
	for _, inst := range []struct {
		version string
		key     byte
	}{{"v1", key1}, {"v2", key2}} {
		app := startApp(t, modeEcho, inst.key)
		id := db + "-" + inst.version
		err := a.client.Agent().ServiceRegister(&api.AgentServiceRegistration{
			ID: id, Name: db, Address: "127.0.0.1", Port: app.Port(), Meta: map[string]string{"version": inst.version},
			Connect: &api.AgentServiceConnect{SidecarService: &api.AgentServiceRegistration{
				Address: "127.0.0.1", Port: freePort(t),
			}},
		})
		if err != nil {
			t.Fatalf("register %s: %v", id, err)
		}
		startStrait(t, a, "-sidecar-for", id)
	}
	a.setEntry(t, &api.ServiceResolverConfigEntry{Kind: api.ServiceResolver, Name: db, DefaultSubset: "v1", Subsets: subsets()})
	client, addr := startChainClient(t, a, db)
	eventually(t, 30*time.Second, func() error { return allAnsweredBy(addr, 10, key1) })

	a.setEntry(t, &api.ServiceResolverConfigEntry{Kind: api.ServiceResolver, Name: db, DefaultSubset: "v2", Subsets: subsets()})
	eventually(t, 30*time.Second, func() error { return allAnsweredBy(addr, 10, key2) })
	if err := allAnsweredBy(addr, 20, key2); err != nil {
		t.Fatal(err)
	}
	c, err := upstreamChain(client)
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Legs) != 1 || !strings.HasPrefix(c.Legs[0].Active, "v2."+db+".") {
		t.Errorf("chain on /upstreams: %+v", c)
	}
}

// TestChainRedirect: an upstream to a name whose resolver redirects to
// another service reaches that service (strait checks the redirected
// service's SPIFFE ID, so this only works with the right identity), here
// from a strait in agent mode.
func TestChainRedirect(t *testing.T) {
	t.Parallel()
	a := startAgent(t)
	legacy, db := uniq("legacy"), uniq("db")
	const key = 0x41
	startChainInstance(t, a, db, nil, key)
	a.setEntry(t, &api.ServiceResolverConfigEntry{Kind: api.ServiceResolver, Name: legacy, Redirect: &api.ServiceResolverRedirect{Service: db}})

	web := uniq("web")
	port := freePort(t)
	err := a.client.Agent().ServiceRegister(&api.AgentServiceRegistration{
		ID: web, Name: web, Address: "127.0.0.1", Port: freePort(t),
		Connect: &api.AgentServiceConnect{SidecarService: &api.AgentServiceRegistration{
			Address: "127.0.0.1", Port: freePort(t),
			Proxy: &api.AgentServiceConnectProxyConfig{Upstreams: []api.Upstream{
				{DestinationName: legacy, LocalBindAddress: "127.0.0.1", LocalBindPort: port},
			}},
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
	s := startStrait(t, a, "-sidecar-for", web)
	eventually(t, 30*time.Second, func() error { return allAnsweredBy(hostPort(port), 5, key) })
	c, err := upstreamChain(s)
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Targets) != 1 || c.Targets[0].ID != db+".default.default."+a.dc || !strings.HasPrefix(c.Targets[0].SNI, db+".default."+a.dc+".internal.") {
		t.Errorf("redirected chain on /upstreams: %+v", c)
	}
}

// TestChainFailoverToSubset: new connections fail over to the v2 subset
// when v1's instances turn critical, and return to v1 when they pass.
func TestChainFailoverToSubset(t *testing.T) {
	t.Parallel()
	a := startAgent(t)
	db := uniq("db")
	const key1, key2 = 0x51, 0x52
	check1 := startChainInstance(t, a, db, map[string]string{"version": "v1"}, key1)
	startChainInstance(t, a, db, map[string]string{"version": "v2"}, key2)
	a.setEntry(t, &api.ServiceResolverConfigEntry{
		Kind: api.ServiceResolver, Name: db, DefaultSubset: "v1", Subsets: subsets(),
		Failover: map[string]api.ServiceResolverFailover{"v1": {ServiceSubset: "v2"}},
	})
	client, addr := startChainClient(t, a, db, "-access-log", "on")
	eventually(t, 30*time.Second, func() error { return allAnsweredBy(addr, 10, key1) })

	if err := a.client.Agent().UpdateTTL(check1, "down", api.HealthCritical); err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, func() error { return allAnsweredBy(addr, 10, key2) })
	c, err := upstreamChain(client)
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Legs) != 1 || len(c.Legs[0].Targets) != 2 || !strings.HasPrefix(c.Legs[0].Active, "v2.") {
		t.Errorf("chain during failover: %+v", c)
	}

	if err := a.client.Agent().UpdateTTL(check1, "up", api.HealthPassing); err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, func() error { return allAnsweredBy(addr, 10, key1) })
	if out := client.Output(); !strings.Contains(out, "target=v2."+db) && !strings.Contains(out, `"target":"v2.`+db) {
		t.Errorf("no access log line names the failover target")
	}
}

// TestChainSplitter: a 90/10 service-splitter (the service is http by
// service-defaults) sends 90% of 1,000 connections to v1, within ±5%.
func TestChainSplitter(t *testing.T) {
	t.Parallel()
	a := startAgent(t)
	db := uniq("db")
	const key1, key2 = 0x61, 0x62
	startChainInstance(t, a, db, map[string]string{"version": "v1"}, key1)
	startChainInstance(t, a, db, map[string]string{"version": "v2"}, key2)
	a.setEntry(t, &api.ServiceConfigEntry{Kind: api.ServiceDefaults, Name: db, Protocol: "http"})
	a.setEntry(t, &api.ServiceResolverConfigEntry{Kind: api.ServiceResolver, Name: db, Subsets: subsets()})
	a.setEntry(t, &api.ServiceSplitterConfigEntry{Kind: api.ServiceSplitter, Name: db, Splits: []api.ServiceSplit{
		{Weight: 90, ServiceSubset: "v1"}, {Weight: 10, ServiceSubset: "v2"},
	}})
	client, addr := startChainClient(t, a, db)
	eventually(t, 30*time.Second, func() error {
		c, err := upstreamChain(client)
		if err != nil {
			return err
		}
		if len(c.Legs) != 2 {
			return fmt.Errorf("%d legs", len(c.Legs))
		}
		for _, tg := range c.Targets {
			if len(tg.Endpoints) != 1 {
				return fmt.Errorf("target %s has %d endpoints", tg.ID, len(tg.Endpoints))
			}
		}
		return nil
	})
	const n = 1000
	counts := map[byte]int{}
	for i := range n {
		k, err := answeredBy(addr, "")
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		counts[k]++
	}
	if counts[key1]+counts[key2] != n {
		t.Fatalf("answers %v", counts)
	}
	if share := float64(counts[key1]) / n; share < 0.85 || share > 0.95 {
		t.Errorf("v1 served %d of %d connections (%.1f%%), want 90%% ± 5%%", counts[key1], n, share*100)
	}
	t.Logf("v1 %d, v2 %d of %d", counts[key1], counts[key2], n)
}

// TestChainSourceIPHash: with ring_hash on SourceIP, connections from one
// client address always reach one instance, and different addresses are
// spread over the instances.
func TestChainSourceIPHash(t *testing.T) {
	t.Parallel()
	a := startAgent(t)
	db := uniq("db")
	keys := []byte{0x71, 0x72, 0x73}
	for _, k := range keys {
		startChainInstance(t, a, db, nil, k)
	}
	a.setEntry(t, &api.ServiceResolverConfigEntry{Kind: api.ServiceResolver, Name: db, LoadBalancer: &api.LoadBalancer{
		Policy: "ring_hash", HashPolicies: []api.HashPolicy{{SourceIP: true}},
	}})
	client, addr := startChainClient(t, a, db)
	eventually(t, 30*time.Second, func() error {
		c, err := upstreamChain(client)
		if err != nil {
			return err
		}
		if len(c.Targets) != 1 || len(c.Targets[0].Endpoints) != len(keys) {
			return fmt.Errorf("chain %+v", c)
		}
		return nil
	})
	used := map[byte]int{}
	for i := 2; i < 18; i++ {
		src := fmt.Sprintf("127.0.0.%d", i)
		first, err := answeredBy(addr, src)
		if err != nil {
			t.Fatalf("from %s: %v", src, err)
		}
		used[first]++
		for range 5 {
			k, err := answeredBy(addr, src)
			if err != nil {
				t.Fatalf("from %s: %v", src, err)
			}
			if k != first {
				t.Fatalf("from %s: answered by %#x, then %#x", src, first, k)
			}
		}
	}
	if len(used) < 2 {
		t.Errorf("16 source addresses all went to one instance: %v", used)
	}
	t.Logf("sources per instance: %v", used)
}
