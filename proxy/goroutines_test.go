package proxy

import (
	"context"
	"errors"
	"io"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/straitproxy/strait/config"
	"github.com/straitproxy/strait/internal/testagent"
	"github.com/straitproxy/strait/internal/testutil"
	"github.com/straitproxy/strait/metrics"
	"github.com/straitproxy/strait/tunnel"
)

// TestShutdownLeavesNoGoroutine: two proxies of "web" against a fake
// agent, one with tunnels and one without, carry classic connections and
// tunnel streams through their upstreams and public listener, reconfigure
// an upstream while a connection on it is live (a background drain), and
// are shut down with a connection still open; afterwards no goroutine of
// strait is left. It is not parallel: goroutines of other tests would
// count.
func TestShutdownLeavesNoGoroutine(t *testing.T) {
	before := testutil.Goroutines()
	agent := testagent.Start(t)
	agent.SetIntentions(testagent.Intention("web", "web", api.IntentionActionAllow))

	// The app echoes; its goroutines are the test's, joined before the
	// check.
	appLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var app sync.WaitGroup
	app.Go(func() {
		for {
			c, err := appLn.Accept()
			if err != nil {
				return
			}
			app.Go(func() {
				defer c.Close()
				io.Copy(c, c)
			})
		}
	})

	dir := t.TempDir()
	type running struct {
		p    *Proxy
		cfgs chan *config.Config
		done chan error
		sock string
	}
	start := func(name string, tunnels bool) *running {
		r := &running{cfgs: make(chan *config.Config, 1), done: make(chan error, 1), sock: filepath.Join(dir, name+".sock")}
		var pool *tunnel.Pool
		if tunnels {
			pool = &tunnel.Pool{}
		}
		r.p = New(Options{
			Parts: testParts(agent, nil, pool), Metrics: metrics.New(metrics.Options{}),
			DrainTimeout: 5 * time.Second, FlushInterval: 10 * time.Millisecond, Tunnels: pool,
		})
		r.cfgs <- &config.Config{Service: "web",
			Public:    &config.Public{BindAddress: "127.0.0.1", LocalServiceAddress: appLn.Addr().String()},
			Upstreams: []config.Upstream{{DestinationName: "web", LocalBindSocketPath: r.sock, ConnectTimeout: 5 * time.Second}},
		}
		go func() { r.done <- r.p.Run(context.Background(), r.cfgs) }()
		testutil.EventuallyNil(t, func() error {
			if !r.p.Ready() {
				return errors.New(name + " not ready: " + r.p.Readiness().Reason)
			}
			return nil
		})
		return r
	}
	tun, classic := start("tunnels", true), start("classic", false)
	agent.SetEndpoints("web", tun.p.PublicAddr().String())
	for _, r := range []*running{tun, classic} {
		testutil.EventuallyNil(t, func() error {
			for _, u := range r.p.Upstreams() {
				if u.HealthyEndpoints == 1 {
					return nil
				}
			}
			return errors.New("upstream web has not seen its endpoint")
		})
	}

	// classic: a TLS connection upstream; tun: a tunnel stream upstream and
	// inbound.
	for _, r := range []*running{tun, classic} {
		for range 3 {
			c, err := net.Dial("unix", r.sock)
			if err != nil {
				t.Fatal(err)
			}
			roundTrip(t, c, "hello")
		}
	}
	if ts := tun.p.Tunnels(); ts.InboundTunnels != 1 || ts.OutboundTunnels != 1 {
		t.Fatalf("tunnels %+v, want one each way", ts)
	}

	// A live stream on the tunnel upstream, whose listener is then moved:
	// the old one drains in the background.
	live, err := net.Dial("unix", tun.sock)
	if err != nil {
		t.Fatal(err)
	}
	defer live.Close()
	live.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := live.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(live, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	tun.cfgs <- &config.Config{Service: "web",
		Public:    &config.Public{BindAddress: "127.0.0.1", LocalServiceAddress: appLn.Addr().String()},
		Upstreams: []config.Upstream{{DestinationName: "web", LocalBindSocketPath: tun.sock + "2", ConnectTimeout: 5 * time.Second}},
	}
	testutil.EventuallyNil(t, func() error {
		for _, l := range tun.p.Listeners() {
			if l.Kind == kindUpstream && l.Draining && l.Active == 1 {
				return nil
			}
		}
		return errors.New("the moved upstream is not draining its live connection")
	})

	// Stop: the live connection is forced closed at the end of the grace.
	for _, r := range []*running{classic, tun} {
		close(r.cfgs)
		if err := <-r.done; err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		r.p.Shutdown(ctx)
		cancel()
		r.p.metrics.Close()
	}
	agent.Stop()
	appLn.Close()
	app.Wait()
	testutil.NoNewGoroutines(t, before)
}
