package proxy

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"io"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"

	"github.com/straitproxy/strait/authz"
	"github.com/straitproxy/strait/config"
	"github.com/straitproxy/strait/internal/testagent"
	"github.com/straitproxy/strait/internal/testutil"
	"github.com/straitproxy/strait/metrics"
	"github.com/straitproxy/strait/tlsutil"
	"github.com/straitproxy/strait/tunnel"
	"github.com/straitproxy/strait/upstream"
)

// lines collects JSON log lines as they are written.
type lines struct {
	mu  sync.Mutex
	buf bytes.Buffer
	ch  chan map[string]any
}

func newLines() *lines { return &lines{ch: make(chan map[string]any, 100)} }

func (l *lines) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.buf.Write(p)
	for {
		line, err := l.buf.ReadBytes('\n')
		if err != nil {
			l.buf.Write(line) // incomplete: keep for the next write
			return len(p), nil
		}
		var m map[string]any
		if json.Unmarshal(line, &m) == nil {
			l.ch <- m
		}
	}
}

// next returns the next access line, failing the test after 10s.
func (l *lines) next(t *testing.T) map[string]any {
	t.Helper()
	select {
	case m := <-l.ch:
		return m
	case <-time.After(10 * time.Second):
		t.Fatal("no access log line within 10s")
		return nil
	}
}

// none checks that no line is pending. Lines are written synchronously at
// the end of a connection, so a caller that already consumed the line of a
// later connection knows that an earlier one would be here.
func (l *lines) none(t *testing.T) {
	t.Helper()
	select {
	case m := <-l.ch:
		t.Fatalf("unexpected access log line %v", m)
	default:
	}
}

// echoApp accepts connections and echoes until EOF.
func echoApp(t testing.TB) string {
	return serveApp(t, func(c net.Conn) { io.Copy(c, c) })
}

// serveApp accepts connections on loopback and runs handle on each, then
// closes it; it returns the address.
func serveApp(t testing.TB, handle func(net.Conn)) string {
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
				handle(c)
			}()
		}
	}()
	return ln.Addr().String()
}

type harness struct {
	agent   *testagent.Agent
	p       *Proxy
	m       *metrics.Metrics
	access  *lines
	app     string
	upSock  string // upstream "web" socket, which leads back to our own public listener
	deadSck string // upstream "nowhere" socket: no endpoints
}

// startHarness runs a proxy for "web" with a public listener in front of an
// echo app and two upstreams, against a fake agent, and waits until ready.
func startHarness(t testing.TB, mode AccessLog, pub config.Public, opt ...func(*Options)) *harness {
	t.Helper()
	h := &harness{agent: testagent.Start(t), m: metrics.Discard(), access: newLines(), app: echoApp(t)}
	h.agent.SetIntentions(
		testagent.Intention("web", "web", api.IntentionActionAllow),
		testagent.Intention("evil", "web", api.IntentionActionDeny),
	)
	dir := t.TempDir()
	h.upSock, h.deadSck = filepath.Join(dir, "web.sock"), filepath.Join(dir, "nowhere.sock")
	if pub.LocalServiceAddress == "" {
		pub.LocalServiceAddress = h.app
	}
	pub.BindAddress = "127.0.0.1"
	cfg := &config.Config{Service: "web", Public: &pub, Upstreams: []config.Upstream{
		{DestinationName: "web", LocalBindSocketPath: h.upSock, ConnectTimeout: 5 * time.Second},
		{DestinationName: "nowhere", LocalBindSocketPath: h.deadSck, ConnectTimeout: time.Second},
	}}
	o := Options{
		Metrics: h.m, AccessLog: mode,
		AccessLogger: hclog.New(&hclog.LoggerOptions{Name: "access", JSONFormat: true, Output: h.access}),
		DrainTimeout: time.Second,
	}
	for _, f := range opt {
		f(&o)
	}
	// An option may set Parts to supply the parts testParts leaves out
	// (MTLSMode); the rest is testParts'.
	custom, base := o.Parts, testParts(h.agent, o.Logger, o.Tunnels)
	if custom != nil && custom(cfg).Outbound != nil {
		// A test router: the configuration is a transparent proxy's.
		cfg.Outbound = &config.Outbound{Port: freeLoopbackPort(t)}
	}
	o.Parts = func(c *config.Config) Parts {
		p := base(c)
		if custom != nil {
			cp := custom(c)
			p.MTLSMode, p.Outbound = cp.MTLSMode, cp.Outbound
		}
		return p
	}
	h.p = New(o)
	cfgs := make(chan *config.Config, 1)
	cfgs <- cfg
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- h.p.Run(ctx, cfgs) }()
	t.Cleanup(func() {
		cancel()
		sctx, scancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer scancel()
		h.p.Shutdown(sctx)
		<-done
	})
	testutil.EventuallyNil(t, func() error {
		if !h.p.Ready() {
			return errors.New("proxy not ready: " + h.p.Readiness().Reason)
		}
		return nil
	})
	h.agent.SetEndpoints("web", h.p.PublicAddr().String())
	testutil.EventuallyNil(t, func() error {
		for _, u := range h.p.Upstreams() {
			if u.DestinationName == "web" && u.HealthyEndpoints == 1 {
				return nil
			}
		}
		return errors.New("upstream web has not seen its endpoint")
	})
	return h
}

// testParts is cmd/strait's wiring of the proxy's parts against the fake
// agent a: pool, when set, is Options.Tunnels.
func testParts(a *testagent.Agent, log hclog.Logger, pool *tunnel.Pool) func(*config.Config) Parts {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	return func(c *config.Config) Parts {
		src := tlsutil.NewSource(a.Client(), c.Service, tlsutil.SourceOptions{
			Namespace: c.Namespace, Partition: c.Partition, Logger: log.Named("certs"), Tunnels: pool != nil,
		})
		az := authz.New(a.Client(), authz.Options{Target: c.Service, Logger: log, AgentConfig: a.Config()})
		return Parts{Source: src, Authorizer: az, Upstream: func(u config.Upstream) (*upstream.Upstream, error) {
			return upstream.New(u, upstream.Options{Client: a.Client(), TLS: src, Tunnels: pool,
				LocalDatacenter: src.Bundle().Identity.Datacenter, Logger: log.Named("upstream").With("upstream", u.DestinationName)})
		}}
	}
}

// roundTrip sends msg on c, half-closes, and reads the echo to EOF.
func roundTrip(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatal(err)
	}
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != msg {
		t.Fatalf("echo %q, want %q", got, msg)
	}
	c.Close()
}

func (h *harness) dialPublic(service string) (*tls.Conn, error) {
	cert := h.agent.ClientCert(service)
	return tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", h.p.PublicAddr().String(), &tls.Config{
		Certificates: []tls.Certificate{cert}, InsecureSkipVerify: true, // the test checks the proxy, not its identity
	})
}

func want(t *testing.T, line map[string]any, fields map[string]any) {
	t.Helper()
	for k, v := range fields {
		got, ok := line[k]
		if !ok {
			t.Errorf("access line %v: no %q", line, k)
			continue
		}
		if s, ok := v.(string); ok && strings.HasPrefix(s, "~") {
			if !strings.Contains(got.(string), s[1:]) {
				t.Errorf("access line %s = %q, want it to contain %q", k, got, s[1:])
			}
			continue
		}
		if f, ok := got.(float64); ok {
			if iv, ok := v.(int); ok && f == float64(iv) {
				continue
			}
		}
		if got != v {
			t.Errorf("access line %s = %#v, want %#v", k, got, v)
		}
	}
}

// TestAccessLogProxiedAndDenied: a connection through the upstream listener
// and back into our own public listener yields one upstream and one inbound
// line with bytes both ways and reason closed; a peer that intentions deny
// yields a denied line; the metrics carry the built-in proxy's names.
func TestAccessLogProxiedAndDenied(t *testing.T) {
	t.Parallel()
	h := startHarness(t, AccessLogOn, config.Public{})

	c, err := net.Dial("unix", h.upSock)
	if err != nil {
		t.Fatal(err)
	}
	roundTrip(t, c, "hello")
	// The inbound side ends first or last depending on scheduling.
	got := map[string]map[string]any{}
	for range 2 {
		l := h.access.next(t)
		got[l["direction"].(string)] = l
	}
	self := testagent.ServiceID("web")
	want(t, got["inbound"], map[string]any{
		"@module": "access", "@message": "connection", "source": self, "destination": "web",
		"endpoint": h.app, "rx_bytes": 5, "tx_bytes": 5, "reason": ReasonClosed,
	})
	want(t, got["upstream"], map[string]any{
		"source": self, "destination": "web", "endpoint": h.p.PublicAddr().String(),
		"rx_bytes": 5, "tx_bytes": 5, "reason": ReasonClosed, "attempts": 1,
	})
	if _, ok := got["inbound"]["duration_ms"].(float64); !ok {
		t.Errorf("inbound line has no numeric duration_ms: %v", got["inbound"])
	}

	tc, err := h.dialPublic("evil")
	if err == nil {
		// TLS 1.3: the client finishes first; the refusal arrives as an
		// alert on the first read.
		tc.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, err = tc.Read(make([]byte, 1))
		tc.Close()
	}
	if err == nil {
		t.Fatal("denied peer could read from the connection")
	}
	want(t, h.access.next(t), map[string]any{
		"direction": "inbound", "source": testagent.ServiceID("evil"), "destination": "web",
		"reason": ReasonDenied, "detail": "~evil", "rx_bytes": 0, "tx_bytes": 0,
	})

	var prom bytes.Buffer
	h.m.WritePrometheus(&prom)
	for _, s := range []string{
		`inbound_rx_bytes_total{dst="web"} 5`,
		`inbound_tx_bytes_total{dst="web"} 5`,
		`upstream_rx_bytes_total{src="web",dst_type="service",dst="web"} 5`,
		`upstream_tx_bytes_total{src="web",dst_type="service",dst="web"} 5`,
		`inbound_conns{dst="web"} 0`,
		`upstream_conns{src="web",dst_type="service",dst="web"} 0`,
		`inbound_denied_total{src="evil",dst="web"} 1`,
		`inbound_conn_duration_seconds_count{dst="web"} 1`,
	} {
		if !strings.Contains(prom.String(), s+"\n") {
			t.Errorf("metrics lack %q:\n%s", s, prom.String())
		}
	}
	h.access.none(t)
}

// TestAccessLogFailures: the reasons of connections that never reach a peer.
func TestAccessLogFailures(t *testing.T) {
	t.Parallel()
	h := startHarness(t, AccessLogOn, config.Public{HandshakeTimeout: 200 * time.Millisecond})

	// A TCP connect that never sends a ClientHello.
	raw, err := net.Dial("tcp", h.p.PublicAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	want(t, h.access.next(t), map[string]any{"direction": "inbound", "reason": ReasonHandshakeTimeout, "source": ""})

	// An upstream with no endpoints.
	c, err := net.Dial("unix", h.deadSck)
	if err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatal("read from an upstream without endpoints succeeded")
	}
	c.Close()
	want(t, h.access.next(t), map[string]any{
		"direction": "upstream", "destination": "nowhere", "reason": ReasonUpstreamDialFailed, "detail": "~no healthy endpoints",
	})

	var prom bytes.Buffer
	h.m.WritePrometheus(&prom)
	for _, s := range []string{
		`inbound_handshake_failed_total{dst="web",reason="timeout"} 1`,
		`upstream_dial_failed_total{src="web",dst_type="service",dst="nowhere"} 1`,
	} {
		if !strings.Contains(prom.String(), s+"\n") {
			t.Errorf("metrics lack %q:\n%s", s, prom.String())
		}
	}
}

// TestAccessLogAppRefused: an authorized peer whose application is down.
func TestAccessLogAppRefused(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := ln.Addr().String()
	ln.Close()
	h := startHarness(t, AccessLogOn, config.Public{LocalServiceAddress: closed})
	tc, err := h.dialPublic("web")
	if err != nil {
		t.Fatal(err)
	}
	tc.SetReadDeadline(time.Now().Add(10 * time.Second))
	tc.Read(make([]byte, 1))
	tc.Close()
	want(t, h.access.next(t), map[string]any{
		"direction": "inbound", "source": testagent.ServiceID("web"), "reason": ReasonAppRefused, "endpoint": closed,
	})
}

// TestAccessLogDeniedOnly: the default mode writes denials and nothing else.
func TestAccessLogDeniedOnly(t *testing.T) {
	t.Parallel()
	h := startHarness(t, AccessLogDeniedOnly, config.Public{})
	c, err := net.Dial("unix", h.upSock)
	if err != nil {
		t.Fatal(err)
	}
	roundTrip(t, c, "hi")
	tc, err := h.dialPublic("evil")
	if err == nil {
		tc.SetReadDeadline(time.Now().Add(10 * time.Second))
		tc.Read(make([]byte, 1))
		tc.Close()
	}
	// Only the denial is logged: the first line is it (a line for the
	// proxied connection, had one been written, would come first) and no
	// other is pending.
	want(t, h.access.next(t), map[string]any{"reason": ReasonDenied, "source": testagent.ServiceID("evil")})
	h.access.none(t)
}

func TestCloseReason(t *testing.T) {
	s := &listener{}
	for _, tc := range []struct {
		err    error
		forced bool
		want   string
	}{
		{nil, false, ReasonClosed},
		{&dirError{"a", io.EOF}, false, ReasonClosed},
		{&dirError{"a", errors.Join(errors.New("read"), errReset())}, false, ReasonReset},
		{&dirError{"a", timeoutErr()}, false, ReasonReapedIdle},
		{&dirError{"a", net.ErrClosed}, true, ReasonShutdown},
		{errors.New("tls: bad record MAC"), false, ReasonError},
	} {
		s.forced.Store(tc.forced)
		if got, _ := closeReason(tc.err, s); got != tc.want {
			t.Errorf("closeReason(%v, forced %v) = %s, want %s", tc.err, tc.forced, got, tc.want)
		}
	}
}

func TestParseAccessLog(t *testing.T) {
	for in, want := range map[string]AccessLog{"": AccessLogDeniedOnly, "on": AccessLogOn, "off": AccessLogOff, "denied-only": AccessLogDeniedOnly} {
		if got, err := ParseAccessLog(in); err != nil || got != want {
			t.Errorf("ParseAccessLog(%q) = %q, %v", in, got, err)
		}
	}
	if _, err := ParseAccessLog("all"); err == nil {
		t.Error("ParseAccessLog(all) accepted")
	}
}
