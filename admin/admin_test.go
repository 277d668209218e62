package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/straitproxy/strait/authz"
	"github.com/straitproxy/strait/config"
	"github.com/straitproxy/strait/internal/testagent"
	"github.com/straitproxy/strait/internal/testutil"
	"github.com/straitproxy/strait/metrics"
	"github.com/straitproxy/strait/proxy"
	"github.com/straitproxy/strait/tlsutil"
	"github.com/straitproxy/strait/tunnel"
	"github.com/straitproxy/strait/upstream"
)

type env struct {
	agent *testagent.Agent
	p     *proxy.Proxy
	m     *metrics.Metrics
	srv   *Server
	base  string
	cfgs  chan *config.Config
	cfg   *config.Config
	sock  string
	done  chan error
}

// start runs a proxy for "web" (public listener before an echo app, and an
// upstream "web" on a unix socket that leads back to it) against a fake
// agent, with the admin listener bound on a real loopback port. The
// configuration is only delivered by deliver.
func start(t *testing.T, settings Settings) *env {
	t.Helper()
	return startWith(t, settings, func(o *proxy.Options) { o.FlushInterval = 20 * time.Millisecond })
}

// startWith is start with the proxy's options adjusted by opt.
func startWith(t *testing.T, settings Settings, opt func(*proxy.Options)) *env {
	t.Helper()
	e := &env{agent: testagent.Start(t), m: metrics.Discard(), cfgs: make(chan *config.Config, 1), done: make(chan error, 1)}
	e.agent.SetIntentions(testagent.Intention("web", "web", api.IntentionActionAllow))
	e.sock = filepath.Join(t.TempDir(), "web.sock")
	e.cfg = &config.Config{Service: "web",
		Public:    &config.Public{BindAddress: "127.0.0.1", LocalServiceAddress: echoApp(t)},
		Upstreams: []config.Upstream{{DestinationName: "web", LocalBindSocketPath: e.sock}},
	}
	o := proxy.Options{Metrics: e.m, DrainTimeout: time.Second}
	opt(&o)
	o.Parts = parts(e.agent, o.Tunnels)
	e.p = proxy.New(o)
	var err error
	e.srv, err = Listen("127.0.0.1:0", Options{Proxy: e.p, Metrics: e.m, Settings: settings, Pprof: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.srv.Close() })
	e.base = "http://" + e.srv.Addr().String()
	ctx, cancel := context.WithCancel(context.Background())
	go func() { e.done <- e.p.Run(ctx, e.cfgs) }()
	t.Cleanup(func() {
		cancel()
		e.stop()
		<-e.done
	})
	return e
}

// parts is cmd/strait's wiring of the proxy's parts against the fake
// agent a; pool, when set, is the proxy's Options.Tunnels.
func parts(a *testagent.Agent, pool *tunnel.Pool) func(*config.Config) proxy.Parts {
	return func(c *config.Config) proxy.Parts {
		src := tlsutil.NewSource(a.Client(), c.Service, tlsutil.SourceOptions{Tunnels: pool != nil})
		az := authz.New(a.Client(), authz.Options{Target: c.Service, AgentConfig: a.Config()})
		return proxy.Parts{Source: src, Authorizer: az, Upstream: func(u config.Upstream) (*upstream.Upstream, error) {
			return upstream.New(u, upstream.Options{Client: a.Client(), TLS: src, Tunnels: pool,
				LocalDatacenter: src.Bundle().Identity.Datacenter})
		}}
	}
}

func (e *env) stop() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	e.p.Shutdown(ctx)
}

func (e *env) deliver() { e.cfgs <- e.cfg }

func (e *env) waitReady(t *testing.T) {
	t.Helper()
	testutil.EventuallyNil(t, func() error {
		code, body := get(t, e.base+"/ready")
		if code != 200 {
			return fmt.Errorf("/ready %d %s", code, body)
		}
		return nil
	})
}

func echoApp(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				io.Copy(c, c)
			}()
		}
	}()
	return ln.Addr().String()
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	c := &http.Client{Timeout: 10 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}

func getJSON(t *testing.T, url string, v any) int {
	t.Helper()
	code, body := get(t, url)
	if err := json.Unmarshal([]byte(body), v); err != nil {
		t.Fatalf("%s: %v\n%s", url, err, body)
	}
	return code
}

// TestReadyTransitions: /ready is 503 with the reason until certificates
// arrive, 200 once serving, still 200 with a degraded entry when the agent
// goes away, and 503 again once shutdown starts.
func TestReadyTransitions(t *testing.T) {
	t.Parallel()
	e := start(t, Settings{})
	var rd proxy.Readiness
	if code := getJSON(t, e.base+"/ready", &rd); code != 503 || rd.Ready || rd.Reason != "waiting for configuration" {
		t.Fatalf("before any configuration: %d %+v", code, rd)
	}
	release := e.agent.HoldLeaves()
	e.deliver()
	testutil.EventuallyNil(t, func() error {
		var rd proxy.Readiness
		if code := getJSON(t, e.base+"/ready", &rd); code != 503 || rd.Reason != "waiting for certificates" {
			return fmt.Errorf("while the leaf is held: %d %+v", code, rd)
		}
		return nil
	})
	if code, _ := get(t, e.base+"/certs"); code != 503 {
		t.Errorf("/certs before certificates: %d, want 503", code)
	}
	release()
	e.waitReady(t)
	code, body := get(t, e.base+"/ready")
	if code != 200 || strings.Contains(body, "degraded") {
		t.Fatalf("ready: %d %s", code, body)
	}

	e.agent.Stop()
	testutil.EventuallyNil(t, func() error {
		var rd proxy.Readiness
		code := getJSON(t, e.base+"/ready", &rd)
		if code != 200 || !rd.Ready {
			return fmt.Errorf("agent gone: %d %+v, want 200 and ready", code, rd)
		}
		for _, d := range rd.Degraded {
			if strings.HasPrefix(d, "agent unreachable: ") {
				return nil
			}
		}
		return fmt.Errorf("agent gone: degraded %q, want an agent unreachable entry", rd.Degraded)
	})

	e.stop()
	if code := getJSON(t, e.base+"/ready", &rd); code != 503 || rd.Reason != "shutting down" {
		t.Fatalf("after shutdown: %d %+v", code, rd)
	}
}

// TestMetricsBuiltinNames: after one connection through the upstream
// listener (which leads to our own public listener), /metrics serves the
// built-in proxy's six names with its labels (counters with _total, as
// Prometheus wants them), and the exposition passes promtool.
func TestMetricsBuiltinNames(t *testing.T) {
	t.Parallel()
	e := start(t, Settings{})
	e.deliver()
	e.waitReady(t)
	e.agent.SetEndpoints("web", e.p.PublicAddr().String())
	testutil.EventuallyNil(t, func() error {
		if u := e.p.Upstreams(); len(u) != 1 || u[0].HealthyEndpoints != 1 {
			return errors.New("upstream has not seen its endpoint")
		}
		return nil
	})
	c, err := net.Dial("unix", e.sock)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	c.Write([]byte("ping!"))
	c.(*net.UnixConn).CloseWrite()
	if b, err := io.ReadAll(c); err != nil || string(b) != "ping!" {
		t.Fatalf("echo %q %v", b, err)
	}
	c.Close()
	wantLines := []string{
		`# TYPE inbound_conns gauge`,
		`inbound_conns{dst="web"} 0`,
		`inbound_rx_bytes_total{dst="web"} 5`,
		`inbound_tx_bytes_total{dst="web"} 5`,
		`# TYPE upstream_rx_bytes_total counter`,
		`upstream_conns{src="web",dst_type="service",dst="web"} 0`,
		`upstream_rx_bytes_total{src="web",dst_type="service",dst="web"} 5`,
		`upstream_tx_bytes_total{src="web",dst_type="service",dst="web"} 5`,
		`upstream_conn_duration_seconds_count{src="web",dst_type="service",dst="web"} 1`,
		`upstream_healthy_endpoints{src="web",dst_type="service",dst="web"} 1`,
	}
	testutil.EventuallyNil(t, func() error {
		code, body := get(t, e.base+"/metrics")
		if code != 200 {
			return fmt.Errorf("/metrics %d", code)
		}
		for _, l := range wantLines {
			if !strings.Contains(body, l+"\n") {
				return fmt.Errorf("/metrics lacks %q:\n%s", l, body)
			}
		}
		return nil
	})
	_, body := get(t, e.base+"/metrics")
	testutil.PromtoolCheck(t, body)
	resp, err := http.Get(e.base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/plain; version=0.0.4") {
		t.Errorf("/metrics Content-Type %q", ct)
	}

	var st Stats
	getJSON(t, e.base+"/stats", &st)
	if st.Goroutines == 0 || st.OpenFDs == 0 || len(st.Listeners) != 2 || st.RxBytes != 10 || st.TxBytes != 10 {
		t.Errorf("/stats %+v", st)
	}
	var certs proxy.CertInfo
	if code := getJSON(t, e.base+"/certs", &certs); code != 200 || certs.SPIFFEID != testagent.ServiceID("web") ||
		certs.Serial == "" || certs.NotAfter.Before(time.Now()) || len(certs.RootIDs) != 1 {
		t.Errorf("/certs %d %+v", code, certs)
	}
	var ups struct{ Upstreams []proxy.UpstreamStatus }
	getJSON(t, e.base+"/upstreams", &ups)
	if len(ups.Upstreams) != 1 || len(ups.Upstreams[0].Endpoints) != 1 || ups.Upstreams[0].Endpoints[0].Addr != e.p.PublicAddr().String() {
		t.Errorf("/upstreams %+v", ups)
	}
	var ixns struct {
		Target     string
		Loaded     bool
		Intentions []struct{ SourceName string }
	}
	if getJSON(t, e.base+"/intentions", &ixns); ixns.Target != "web" || !ixns.Loaded || len(ixns.Intentions) != 1 {
		t.Errorf("/intentions %+v", ixns)
	}
	if code, body := get(t, e.base+"/debug/pprof/"); code != 200 || !strings.Contains(body, "goroutine") {
		t.Errorf("/debug/pprof/ with Pprof: %d", code)
	}
}

// TestConfigRedacted: /config shows the effective configuration and never
// the ACL token, whether it comes from -token or CONSUL_HTTP_TOKEN.
func TestConfigRedacted(t *testing.T) {
	const secret = "5ecret-acl-token-0000"
	t.Setenv(api.HTTPTokenEnvName, secret+"-env")
	e := start(t, Settings{Mode: "flags", API: config.API{Token: secret, Addr: "127.0.0.1:8500"}, HTTPAddr: "127.0.0.1:8500", AccessLog: "on"})
	e.deliver()
	e.waitReady(t)
	code, body := get(t, e.base+"/config")
	if code != 200 {
		t.Fatalf("/config %d", code)
	}
	if strings.Contains(body, secret) {
		t.Fatalf("/config prints the token:\n%s", body)
	}
	var doc struct {
		Settings struct {
			Agent struct{ Token, HTTPAddr string } `json:"agent"`
		}
		Proxy struct {
			Service   string
			Upstreams []struct{ DestinationName string } `json:"upstreams"`
		}
	}
	if err := json.Unmarshal([]byte(body), &doc); err != nil {
		t.Fatal(err)
	}
	if doc.Settings.Agent.Token != Redacted || doc.Proxy.Service != "web" || len(doc.Proxy.Upstreams) != 1 {
		t.Fatalf("/config %s", body)
	}
	// Only the environment's token.
	v := configView(Settings{}, nil, metrics.Telemetry{})
	if b, _ := json.Marshal(v); strings.Contains(string(b), secret) || v.Settings.Agent.Token != Redacted+" (CONSUL_HTTP_TOKEN)" {
		t.Fatalf("env token: %s", b)
	}
}

func TestRedactArgs(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"strait -token abc -service web", "strait -token <redacted> -service web"},
		{"strait --token=abc", "strait --token=<redacted>"},
		{"strait -token-file /x -sidecar-for web", "strait -token-file /x -sidecar-for web"},
		{"strait -service token", "strait -service token"},
	} {
		if got := strings.Join(redactArgs(strings.Fields(tc.in)), " "); got != tc.want {
			t.Errorf("redactArgs(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

// fakeProxy answers the admin endpoints without a running proxy.
type fakeProxy struct{ rd proxy.Readiness }

func (f *fakeProxy) Readiness() proxy.Readiness             { return f.rd }
func (f *fakeProxy) Listeners() []proxy.ListenerStats       { return nil }
func (f *fakeProxy) Tunnels() proxy.TunnelStats             { return proxy.TunnelStats{} }
func (f *fakeProxy) Certs() (proxy.CertInfo, bool)          { return proxy.CertInfo{}, false }
func (f *fakeProxy) Upstreams() []proxy.UpstreamStatus      { return nil }
func (f *fakeProxy) Intentions() (authz.Snapshot, bool)     { return authz.Snapshot{}, false }
func (f *fakeProxy) Outbound() (proxy.OutboundStatus, bool) { return proxy.OutboundStatus{}, false }
func (f *fakeProxy) Config() *config.Config                 { return nil }

// TestEndpointsGETOnlyNoPprof: without Pprof there is no /debug/pprof/,
// and the endpoints refuse other methods.
func TestEndpointsGETOnlyNoPprof(t *testing.T) {
	t.Parallel()
	srv, err := Listen("127.0.0.1:0", Options{Proxy: &fakeProxy{rd: proxy.Readiness{Ready: true, Degraded: []string{"x"}}}, Metrics: metrics.Discard()})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	base := "http://" + srv.Addr().String()
	if code, body := get(t, base+"/ready"); code != 200 || !strings.Contains(body, `"degraded"`) {
		t.Errorf("/ready %d %s", code, body)
	}
	if code, _ := get(t, base+"/debug/pprof/"); code != 404 {
		t.Errorf("/debug/pprof/ without Pprof: %d, want 404", code)
	}
	if code, _ := get(t, base+"/live"); code != 200 {
		t.Errorf("/live %d", code)
	}
	resp, err := http.Post(base+"/ready", "text/plain", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("POST /ready: %d", resp.StatusCode)
	}
}
