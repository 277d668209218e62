package integration

import (
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// TestMaxInboundConnectionsFromServiceDefaults: service-defaults
// MaxInboundConnections 50 for the destination reaches strait through the
// agent's merged registration (Proxy.Config max_inbound_connections). 300
// silent connections to strait's public listener leave at most 50 open
// (waiting in their handshake); the rest are closed at once and counted in
// inbound_conns_refused_total{reason="max_inbound_connections"}. Once the flood
// ends, a real client gets through the strait pair. Lowering the entry to
// 20 applies without a restart.
func TestMaxInboundConnectionsFromServiceDefaults(t *testing.T) {
	t.Parallel()
	a := startAgent(t)
	const key = 0x4d
	app := startApp(t, modeEcho, key)
	dst, src := uniq("db"), uniq("web")
	setMax := func(n int) {
		t.Helper()
		if _, _, err := a.client.ConfigEntries().Set(&api.ServiceConfigEntry{
			Kind: api.ServiceDefaults, Name: dst, Protocol: "tcp", MaxInboundConnections: n,
		}, nil); err != nil {
			t.Fatalf("service-defaults for %s: %v", dst, err)
		}
	}
	setMax(50)
	ports := freePorts(t, 2)
	pub, up := hostPort(ports[0]), hostPort(ports[1])
	id := uniq("db-proxy")
	err := a.client.Agent().ServiceRegister(&api.AgentServiceRegistration{
		Kind: api.ServiceKindConnectProxy, ID: id, Name: dst + "-proxy", Address: "127.0.0.1", Port: ports[0],
		Proxy: &api.AgentServiceConnectProxyConfig{
			DestinationServiceName: dst, LocalServiceAddress: "127.0.0.1", LocalServicePort: app.Port(),
			// Long enough that only strait's limit closes the flood
			// while the test looks at it.
			Config: map[string]any{"handshake_timeout_ms": 60000},
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	registered := func(want int) error {
		svc, _, err := a.client.Agent().Service(id, nil)
		if err != nil {
			return err
		}
		if got := fmt.Sprint(svc.Proxy.Config["max_inbound_connections"]); got != fmt.Sprint(want) {
			return fmt.Errorf("registration's max_inbound_connections is %s, want %d", got, want)
		}
		return nil
	}
	eventually(t, 30*time.Second, func() error { return registered(50) })
	server := startStrait(t, a, "-proxy-id", id)
	startStrait(t, a, "-service", src, "-upstream", dst+":"+portOf(up))
	eventually(t, 30*time.Second, func() error { return echoVia("tcp", up, 1024, key) })
	base := app.Accepts()

	refusedMetric := func() float64 {
		if !straitHasAdmin {
			return -1
		}
		series, err := promSeries(server, "inbound_conns_refused_total")
		if err != nil {
			t.Fatal(err)
		}
		var n float64
		for labels, v := range series {
			if promLabel(labels, "dst") == dst && promLabel(labels, "reason") == "max_inbound_connections" {
				n += v
			}
		}
		return n
	}

	// floodAndCount makes n silent connections and returns them with the
	// number strait left open.
	floodAndCount := func(n int) ([]net.Conn, int) {
		t.Helper()
		conns := make([]net.Conn, 0, n)
		t.Cleanup(func() {
			for _, c := range conns {
				c.Close()
			}
		})
		for range n {
			c, err := net.DialTimeout("tcp", pub, 10*time.Second)
			if err != nil {
				t.Fatalf("silent connect %d: %v", len(conns), err)
			}
			conns = append(conns, c)
		}
		return conns, stillOpen(conns, 2*time.Second)
	}

	const n, limit = 300, 50
	before := refusedMetric()
	conns, open := floodAndCount(n)
	t.Logf("%d silent connections, max_inbound_connections %d: %d left open", n, limit, open)
	if open > limit {
		t.Fatalf("%d of %d silent connections still open with max_inbound_connections %d", open, n, limit)
	}
	if open < limit-5 {
		t.Errorf("only %d silent connections left open, want about %d (the limit)", open, limit)
	}
	if straitHasAdmin {
		eventually(t, 10*time.Second, func() error {
			if d := refusedMetric() - before; d != float64(n-open) {
				return fmt.Errorf("inbound_conns_refused_total{reason=max_inbound_connections} grew by %v, %d connections were closed", d, n-open)
			}
			return nil
		})
	}
	if server.exited() {
		t.Fatalf("strait exited during the flood: %v", server.waitErr)
	}

	// The flood ends: a real client gets through the pair again.
	for _, c := range conns {
		c.Close()
	}
	eventually(t, 30*time.Second, func() error { return echoVia("tcp", up, 1024, key) })
	if got := app.Accepts() - base; got < 1 {
		t.Fatalf("the app saw %d connections after the flood", got)
	}

	// Reload: the limit follows the service-defaults entry, same process.
	pid := server.Pid()
	setMax(20)
	eventually(t, 30*time.Second, func() error { return registered(20) })
	eventually(t, 30*time.Second, func() error {
		if !strings.Contains(server.Output(), "max_inbound_connections=20") {
			return errors.New("strait has not logged the new limit")
		}
		return nil
	})
	conns, open = floodAndCount(100)
	t.Logf("after lowering the entry to 20: %d of 100 silent connections left open", open)
	if open > 20 || open < 15 {
		t.Fatalf("%d of 100 silent connections still open with max_inbound_connections 20", open)
	}
	if server.exited() || server.Pid() != pid || strings.Count(server.Output(), "proxy ready") != 1 {
		t.Fatal("strait restarted to apply the new limit")
	}
	for _, c := range conns {
		c.Close()
	}
	eventually(t, 30*time.Second, func() error { return echoVia("tcp", up, 1024, key) })
}

// stillOpen counts the connections the peer has not closed within wait.
func stillOpen(conns []net.Conn, wait time.Duration) int {
	var mu sync.Mutex
	open := 0
	var wg sync.WaitGroup
	for _, c := range conns {
		wg.Go(func() {
			_ = c.SetReadDeadline(time.Now().Add(wait))
			_, err := c.Read(make([]byte, 1))
			_ = c.SetReadDeadline(time.Time{})
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				mu.Lock()
				open++
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return open
}
