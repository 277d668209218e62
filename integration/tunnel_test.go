package integration

import (
	"errors"
	"net"
	"syscall"
	"testing"
	"time"
)

type tunnelStats struct {
	Tunnels *struct {
		InboundTunnels  int64 `json:"inbound_tunnels"`
		InboundStreams  int64 `json:"inbound_streams"`
		OutboundTunnels int64 `json:"outbound_tunnels"`
		OutboundStreams int64 `json:"outbound_streams"`
	} `json:"tunnels"`
}

func getTunnelStats(t *testing.T, p *proc) tunnelStats {
	t.Helper()
	var st tunnelStats
	if code, err := adminGetJSON(p, "/stats", &st); err != nil || code != 200 {
		t.Fatalf("/stats: %d %v", code, err)
	}
	if st.Tunnels == nil {
		t.Fatal("/stats has no tunnels")
	}
	return st
}

// TestStraitPairTunnels: strait<->strait connections ride as streams of
// strait-mux/2 tunnels (visible in /stats); 1,000 concurrent connections
// are byte-exact over the pool; killing the server side mid-stream ends
// the app's connection at once, and a restarted server works again.
func TestStraitPairTunnels(t *testing.T) {
	t.Parallel()
	if !straitHasAdmin {
		t.Skip("strait binary has no admin endpoint")
	}
	a := startAgent(t)
	const key = 0x5a
	on := []string{"-tunnels", "on"}
	p := startStraitPairArgs(t, a, modeEcho, key, on, on)
	for i := 0; i < 3; i++ {
		if err := echoVia("tcp", p.upstreamAddr, 64*1024, key); err != nil {
			t.Fatal(err)
		}
	}
	if st := getTunnelStats(t, p.client); st.Tunnels.OutboundTunnels < 1 {
		t.Fatalf("client: no outbound tunnel: %+v", *st.Tunnels)
	}
	if st := getTunnelStats(t, p.server); st.Tunnels.InboundTunnels < 1 {
		t.Fatalf("server: no inbound tunnel: %+v", *st.Tunnels)
	}

	// 1,000 streams open at the same time, each carrying data before and
	// after all are open.
	const n = 1000
	if errs := concurrentRoundTrips(p.upstreamAddr, n, key, func(i int) int { return 8*1024 + i }, func(i int) int { return 1024 + i }); len(errs) > 0 {
		for _, err := range errs[:min(5, len(errs))] {
			t.Error(err)
		}
		t.Fatalf("%d of %d concurrent connections failed", len(errs), n)
	}
	st := getTunnelStats(t, p.client)
	t.Logf("client after %d concurrent: %+v", n, *st.Tunnels)
	if st.Tunnels.OutboundTunnels < 1 || st.Tunnels.OutboundTunnels > 4 {
		t.Errorf("outbound tunnels %d, want 1..4", st.Tunnels.OutboundTunnels)
	}

	// Kill the server side mid-stream.
	c, err := net.Dial("tcp", p.upstreamAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := roundTrip(c, randomBytes(t, 1024), key, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	p.server.cmd.Process.Kill()
	<-p.server.done
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	// The app sees a reset, as it would if its own TCP connection died,
	// not a clean EOF it could take for the end of the reply.
	nr, err := c.Read(make([]byte, 1))
	if nr != 0 || !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("app connection after its tunnel died: read %d, %v; want ECONNRESET", nr, err)
	}

	startStrait(t, a, "-service", p.dst, "-listen", p.publicAddr, "-service-addr", p.app.Addr())
	eventually(t, 30*time.Second, func() error { return echoVia("tcp", p.upstreamAddr, 16*1024, key) })
	for i := 0; i < 3; i++ {
		if err := echoVia("tcp", p.upstreamAddr, 16*1024, key); err != nil {
			t.Fatal(err)
		}
	}
}
