package integration

import (
	"errors"
	"fmt"
	"net"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// workloadUID is the user the test's client connections are made as
// inside the namespace: not strait's (root, -proxy-uid 0), so iptables
// redirects them to the outbound listener.
const workloadUID = 65534

// TestTransparentOutboundInNetns: a transparent strait sidecar for web
// inside a namespace of the test's own, its traffic redirected by strait
// redirect-traffic, and no upstream configured. A client in the namespace
// reaches db1 and db2 (strait sidecars in the root namespace) by their
// virtual IPs on arbitrary ports; db2 is registered after web's strait is
// ready. A deny web -> db1 closes the open connection to db1 within 1s
// while the one to db2 keeps flowing. A destination outside the mesh is
// passed through, then refused once the mesh entry sets
// MeshDestinationsOnly.
func TestTransparentOutboundInNetns(t *testing.T) {
	t.Parallel()
	testTransparentOutbound(t, "strait")
}

// TestTransparentOutboundConsulRulesInNetns is the same with the rules
// installed by Consul's own `consul connect redirect-traffic`: strait
// works behind the rules Consul and consul-k8s install.
func TestTransparentOutboundConsulRulesInNetns(t *testing.T) {
	t.Parallel()
	testTransparentOutbound(t, "consul")
}

// testTransparentOutbound runs the scenario with the iptables rules of
// rules: "strait" (strait redirect-traffic) or "consul" (consul connect
// redirect-traffic), same flags.
func testTransparentOutbound(t *testing.T, rules string) {
	requireNetns(t)
	a := startAgent(t)
	ns := newNetns(t)
	ns.forwardInto(t, "127.0.0.1:8500", a.httpAddr)
	// Virtual IPs (240.0.0.0/4) need a route to be dialed at all. It is
	// loopback: the workload's connections are redirected to strait
	// before they would use it, and anything else (strait's own dial of
	// a virtual IP it does not know yet, passed through) stays inside the
	// namespace and goes nowhere.
	sh(t, "ip", "netns", "exec", ns.name, "ip", "route", "add", "240.0.0.0/4", "dev", "lo")

	// db1 and db2: echo apps behind strait sidecars in the root
	// namespace, on the veth's outer address that the namespace reaches.
	type dest struct {
		name string
		key  byte
		srv  *proc
	}
	startDest := func(key byte) *dest {
		t.Helper()
		d := &dest{name: uniq("db"), key: key}
		app := startApp(t, modeEcho, key)
		pubPort := freePort(t)
		err := a.client.Agent().ServiceRegister(&api.AgentServiceRegistration{
			Name: d.name, Port: app.Port(), Address: "127.0.0.1",
			Connect: &api.AgentServiceConnect{SidecarService: &api.AgentServiceRegistration{
				Port: pubPort, Address: ns.outer,
				Proxy:  &api.AgentServiceConnectProxyConfig{LocalServicePort: app.Port()},
				Checks: api.AgentServiceChecks{{Name: "alias", AliasService: d.name}},
			}},
		})
		if err != nil {
			t.Fatal(err)
		}
		d.srv = startStrait(t, a, "-proxy-id", d.name+"-sidecar-proxy")
		return d
	}
	vipOf := func(svc string) string {
		t.Helper()
		var vip string
		eventually(t, 30*time.Second, func() error {
			ss, _, err := a.client.Catalog().Service(svc+"-sidecar-proxy", "", nil)
			if err != nil {
				return err
			}
			for _, s := range ss {
				if v := s.ServiceTaggedAddresses["consul-virtual"]; v.Address != "" {
					vip = v.Address
					return nil
				}
			}
			return fmt.Errorf("%s has no virtual IP yet", svc)
		})
		return vip
	}
	db1 := startDest(0x31)
	waitReady(t, db1.srv)

	// web: a transparent sidecar with no upstream (until the end).
	web := uniq("web")
	const webApp, webPub, adminPort, explicitPort = 9090, 21000, 19000, 9191
	registerWeb := func(ups ...api.Upstream) {
		t.Helper()
		err := a.client.Agent().ServiceRegister(&api.AgentServiceRegistration{
			Name: web, Port: webApp, Address: ns.inner,
			Connect: &api.AgentServiceConnect{SidecarService: &api.AgentServiceRegistration{
				Port: webPub, Address: ns.inner,
				Proxy:  &api.AgentServiceConnectProxyConfig{Mode: api.ProxyModeTransparent, LocalServicePort: webApp, Upstreams: ups},
				Checks: api.AgentServiceChecks{{Name: "alias", AliasService: web}},
			}},
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	registerWeb()
	proxyID := web + "-sidecar-proxy"
	var err error
	admin := net.JoinHostPort(ns.inner, fmt.Sprint(adminPort))
	sp := startProc(t, "strait-web", "ip", []string{"netns", "exec", ns.name, straitBin,
		"-proxy-id", proxyID, "-http-addr", "127.0.0.1:8500", "-admin-bind", admin, "-access-log", "on"}, cleanEnv(), true)
	sp.adminAddr = admin
	waitReady(t, sp)
	redirect := []string{"redirect-traffic", "-netns", ns.path(), "-http-addr", a.httpAddr,
		"-proxy-uid", "0", "-proxy-id", proxyID, "-exclude-inbound-port", fmt.Sprint(adminPort)}
	bin := straitBin
	if rules == "consul" {
		bin, redirect = consulBin, append([]string{"connect"}, redirect...)
	}
	out, err := exec.Command(bin, redirect...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", rules, strings.Join(redirect, " "), err, out)
	}

	// dialVia opens a connection from the workload in the namespace to
	// addr and checks an echo on it.
	dialVia := func(addr string, key byte) (net.Conn, error) {
		c, err := ns.dialAs(addr, 5*time.Second, workloadUID)
		if err != nil {
			return nil, err
		}
		if err := roundTrip(c, randomBytes(t, 4096), key, 10*time.Second); err != nil {
			c.Close()
			return nil, err
		}
		return c, nil
	}
	var conn1 net.Conn
	vip1 := vipOf(db1.name)
	if err := poll(30*time.Second, func() error {
		c, err := dialVia(net.JoinHostPort(vip1, "5432"), db1.key)
		if err != nil {
			return fmt.Errorf("db1 by its virtual IP %s: %w", vip1, err)
		}
		conn1 = c
		return nil
	}); err != nil {
		nat, _ := exec.Command("ip", "netns", "exec", ns.name, "iptables-save", "-c", "-t", "nat").CombinedOutput()
		t.Fatalf("%v\nnat table (with counters) in %s:\n%s", err, ns.name, nat)
	}
	defer conn1.Close()
	t.Logf("db1 reached at %s:5432 without an upstream", vip1)

	// db2 appears after web's strait started: picked up without a restart.
	db2 := startDest(0x32)
	waitReady(t, db2.srv)
	vip2 := vipOf(db2.name)
	var conn2 net.Conn
	eventually(t, 30*time.Second, func() error {
		c, err := dialVia(net.JoinHostPort(vip2, "80"), db2.key)
		if err != nil {
			return fmt.Errorf("db2 by its virtual IP %s: %w", vip2, err)
		}
		conn2 = c
		return nil
	})
	defer conn2.Close()
	// Any port of a virtual IP is the service.
	if c, err := dialVia(net.JoinHostPort(vip2, "31337"), db2.key); err != nil {
		t.Fatalf("db2 on another port: %v", err)
	} else {
		c.Close()
	}

	// A deny closes the open connection to db1 within 1s; db2's flows.
	start := time.Now()
	a.setIntention(t, web, db1.name, api.IntentionActionDeny)
	if err := closedWithin(conn1, 10*time.Second); err != nil {
		t.Fatalf("open connection to db1 after the deny: %v", err)
	}
	took := time.Since(start)
	t.Logf("open connection to db1 closed %s after the deny", took)
	if budget := revocationBudget(); took > budget {
		t.Errorf("closed after %s, want within %s", took, budget)
	}
	if err := roundTrip(conn2, randomBytes(t, 4096), db2.key, 10*time.Second); err != nil {
		t.Fatalf("connection to db2 (still allowed) after the deny of db1: %v", err)
	}
	eventually(t, 10*time.Second, func() error {
		if !hasRevokedLine(db1.srv.Output(), web) {
			return errors.New("no access line with reason revoked on db1's strait")
		}
		return nil
	})
	series, err := promSeries(sp, "outbound_connections_total")
	if err != nil {
		t.Fatal(err)
	}
	if virtual := seriesWith(series, "route", "virtual"); virtual < 3 {
		t.Errorf("outbound_connections_total{route=virtual} = %v, want >= 3 (%v)", virtual, series)
	}

	// Outside the mesh: an echo server in the root namespace on the
	// veth's outer address, which no service has.
	ln, err := net.Listen("tcp", net.JoinHostPort(ns.outer, "0"))
	if err != nil {
		t.Fatal(err)
	}
	const plainKey = 0x77
	plain := serveApp(t, ln, modeEcho, plainKey)
	if c, err := dialVia(plain.Addr(), plainKey); err != nil {
		t.Fatalf("a destination outside the mesh while passthrough is allowed: %v", err)
	} else {
		c.Close()
	}
	if s, err := promSeries(sp, "outbound_connections_total"); err != nil {
		t.Fatal(err)
	} else if n := seriesWith(s, "route", "passthrough"); n < 1 {
		t.Errorf("outbound_connections_total{route=passthrough} = %v after a passthrough", n)
	}
	a.setEntry(t, &api.MeshConfigEntry{TransparentProxy: api.TransparentProxyMeshConfig{MeshDestinationsOnly: true}})
	eventually(t, 10*time.Second, func() error {
		s, err := promSeries(sp, "outbound_refused_total")
		if err != nil {
			return err
		}
		if seriesWith(s, "reason", "mesh_destinations_only") >= 1 {
			return nil
		}
		c, err := ns.dialAs(plain.Addr(), 5*time.Second, workloadUID)
		if err != nil {
			return err
		}
		defer c.Close()
		c.Write([]byte("hello"))
		return errors.New("not refused yet")
	})
	mark := plain.Accepts()
	if err := func() error {
		c, err := ns.dialAs(plain.Addr(), 5*time.Second, workloadUID)
		if err != nil {
			return nil // refused at once is fine too
		}
		defer c.Close()
		c.Write([]byte("hello"))
		return closedWithin(c, 10*time.Second)
	}(); err != nil {
		t.Errorf("a destination outside the mesh with MeshDestinationsOnly: %v", err)
	}
	// Mesh destinations still work.
	if err := roundTrip(conn2, randomBytes(t, 4096), db2.key, 10*time.Second); err != nil {
		t.Fatalf("db2 with MeshDestinationsOnly: %v", err)
	}
	eventually(t, 10*time.Second, func() error {
		if !strings.Contains(sp.Output(), "reason=mesh_destinations_only") {
			return errors.New("no access line with reason mesh_destinations_only")
		}
		return nil
	})
	if n := plain.Accepts(); n != mark {
		t.Errorf("the outside server accepted %d connections after MeshDestinationsOnly took effect", n-mark)
	}

	// An explicit upstream added to the registration works beside the
	// outbound listener (loopback is not redirected), and virtual IPs
	// still do.
	registerWeb(api.Upstream{DestinationName: db2.name, LocalBindPort: explicitPort})
	eventually(t, 30*time.Second, func() error {
		c, err := dialVia(net.JoinHostPort("127.0.0.1", fmt.Sprint(explicitPort)), db2.key)
		if err != nil {
			return fmt.Errorf("explicit upstream: %w", err)
		}
		c.Close()
		return nil
	})
	if c, err := dialVia(net.JoinHostPort(vip2, "443"), db2.key); err != nil {
		t.Errorf("db2 by its virtual IP beside an explicit upstream: %v", err)
	} else {
		c.Close()
	}
}

// seriesWith sums the series whose label name is value.
func seriesWith(m map[string]float64, name, value string) float64 {
	var n float64
	for labels, v := range m {
		if promLabel(labels, name) == value {
			n += v
		}
	}
	return n
}
