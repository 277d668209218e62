package integration

import (
	"errors"
	"fmt"
	"net"
	"os/exec"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// TestPermissiveMTLSInNetns: a transparent strait sidecar inside a
// namespace of the test's own, its traffic redirected by strait
// redirect-traffic, the service permissive through service-defaults. A
// plaintext client dialing the application's address reaches it through
// strait (counted); a mesh client reaches it over mTLS on any port; the
// switch to strict closes the open plaintext connection and refuses new
// ones, while mTLS keeps working.
func TestPermissiveMTLSInNetns(t *testing.T) {
	t.Parallel()
	requireNetns(t)
	a := startAgent(t)
	ns := newNetns(t)
	ns.forwardInto(t, "127.0.0.1:8500", a.httpAddr)

	svc := uniq("legacy")
	const appPort, pubPort, adminPort, key = 9090, 21000, 19000, 0x5c
	setEntry := func(e api.ConfigEntry) {
		t.Helper()
		if _, _, err := a.client.ConfigEntries().Set(e, nil); err != nil {
			t.Fatalf("config entry %s/%s: %v", e.GetKind(), e.GetName(), err)
		}
	}
	setEntry(&api.MeshConfigEntry{AllowEnablingPermissiveMutualTLS: true})
	setEntry(&api.ServiceConfigEntry{Kind: api.ServiceDefaults, Name: svc, Protocol: "tcp", MutualTLSMode: api.MutualTLSModePermissive})

	proxyID := svc + "-sidecar-proxy"
	err := a.client.Agent().ServiceRegister(&api.AgentServiceRegistration{
		Name: svc, Port: appPort, Address: ns.inner,
		Connect: &api.AgentServiceConnect{SidecarService: &api.AgentServiceRegistration{
			Port: pubPort, Address: ns.inner,
			Proxy:  &api.AgentServiceConnectProxyConfig{Mode: api.ProxyModeTransparent, LocalServicePort: appPort, LocalServiceAddress: "127.0.0.1"},
			Checks: api.AgentServiceChecks{{Name: "alias", AliasService: svc}},
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
	ns.startEchoIn(t, "app", fmt.Sprintf("0.0.0.0:%d", appPort), key)

	admin := net.JoinHostPort(ns.inner, fmt.Sprint(adminPort))
	sp := startProc(t, "strait", "ip", []string{"netns", "exec", ns.name, straitBin,
		"-proxy-id", proxyID, "-http-addr", "127.0.0.1:8500", "-admin-bind", admin}, cleanEnv(), true)
	sp.adminAddr = admin
	waitReady(t, sp)
	out, err := exec.Command(straitBin, "redirect-traffic", "-netns", ns.path(), "-http-addr", a.httpAddr,
		"-proxy-uid", "0", "-proxy-id", proxyID, "-exclude-inbound-port", fmt.Sprint(adminPort)).CombinedOutput()
	if err != nil {
		t.Fatalf("strait redirect-traffic: %v\n%s", err, out)
	}

	appAddr := net.JoinHostPort(ns.inner, fmt.Sprint(appPort))
	eventually(t, 30*time.Second, func() error { return echoVia("tcp", appAddr, 256, key) })
	plain, err := net.Dial("tcp", appAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	if err := roundTrip(plain, randomBytes(t, 4096), key, 10*time.Second); err != nil {
		t.Fatalf("plaintext to the application's address while permissive: %v", err)
	}
	series, err := promSeries(sp, "inbound_plaintext_total")
	if err != nil {
		t.Fatal(err)
	}
	if n := sumSeries(series); n < 2 {
		t.Errorf("inbound_plaintext_total = %v after two plaintext connections", n)
	}

	// A mesh client (any port of the workload: redirected to strait).
	cert := a.leaf(t, uniq("web"))
	meshEcho := func() error {
		c, err := dialMesh(net.JoinHostPort(ns.inner, "443"), meshClientConfig(&cert, a.roots(t), a.spiffeID(svc)))
		if err != nil {
			return err
		}
		defer c.Close()
		return roundTrip(c, randomBytes(t, 4096), key, 10*time.Second)
	}
	if err := meshEcho(); err != nil {
		t.Fatalf("mTLS while permissive: %v", err)
	}

	start := time.Now()
	setEntry(&api.ServiceConfigEntry{Kind: api.ServiceDefaults, Name: svc, Protocol: "tcp", MutualTLSMode: api.MutualTLSModeStrict})
	if err := closedWithin(plain, 10*time.Second); err != nil {
		t.Fatalf("open plaintext connection after the switch to strict: %v", err)
	}
	took := time.Since(start)
	t.Logf("open plaintext connection closed %s after the switch to strict", took)
	if budget := revocationBudget(); took > budget {
		t.Errorf("closed after %s, want within %s", took, budget)
	}
	if err := plaintextRefused(appAddr); err != nil {
		t.Errorf("new plaintext connection while strict: %v", err)
	}
	eventually(t, 10*time.Second, func() error {
		s, err := promSeries(sp, "inbound_plaintext_refused_total")
		if err != nil {
			return err
		}
		if sumSeries(s) < 1 {
			return errors.New("inbound_plaintext_refused_total not counted")
		}
		return nil
	})
	if err := meshEcho(); err != nil {
		t.Fatalf("mTLS while strict: %v", err)
	}
}

func sumSeries(m map[string]float64) float64 {
	var n float64
	for _, v := range m {
		n += v
	}
	return n
}

// plaintextRefused dials addr, writes and expects the connection to end
// without a byte back (reset or EOF), possibly already at the dial.
func plaintextRefused(addr string) error {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		if errors.Is(err, syscall.ECONNRESET) {
			return nil
		}
		return err
	}
	defer c.Close()
	c.Write([]byte("hello"))
	return closedWithin(c, 10*time.Second)
}
