package proxy

import (
	"bufio"
	"context"
	"errors"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/straitproxy/strait/config"
	"github.com/straitproxy/strait/tproxy"
	"github.com/straitproxy/strait/upstream"
)

// freeLoopbackPort returns a TCP port free on 127.0.0.1 and ::1 now.
func freeLoopbackPort(t testing.TB) int {
	t.Helper()
	for range 20 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		l.Close()
		if l6, err := net.Listen("tcp", net.JoinHostPort("::1", strconv.Itoa(port))); err == nil {
			l6.Close()
			return port
		} else if isNoIPv6(err) {
			return port
		}
	}
	t.Fatal("no port free on both loopbacks")
	return 0
}

// fakeRouter is a routing table the test writes, and a mesh entry it flips.
type fakeRouter struct {
	mu       sync.Mutex
	routes   map[netip.Addr]tproxy.Route
	meshOnly atomic.Bool
}

func (r *fakeRouter) Run(ctx context.Context) { <-ctx.Done() }
func (r *fakeRouter) Ready() <-chan struct{} {
	ch := make(chan struct{})
	close(ch)
	return ch
}
func (r *fakeRouter) Lookup(ip netip.Addr) (tproxy.Route, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	rt, ok := r.routes[ip]
	return rt, ok
}
func (r *fakeRouter) MeshDestinationsOnly() bool { return r.meshOnly.Load() }
func (r *fakeRouter) Routes() []tproxy.RouteStatus {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []tproxy.RouteStatus
	for ip, rt := range r.routes {
		out = append(out, tproxy.RouteStatus{Addr: ip.String(), Upstream: rt.Upstream, Direct: rt.Direct})
	}
	return out
}
func (r *fakeRouter) Counts() (int, int, int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return 1, 0, len(r.routes)
}

// appDialer stands in for an upstream: it dials addr in plain TCP and
// records what it was asked.
type appDialer struct {
	addr  string
	ready chan struct{}
	mu    sync.Mutex
	opts  []upstream.DialOptions
}

func (d *appDialer) DialConn(ctx context.Context, o upstream.DialOptions) (net.Conn, upstream.DialResult, func(), error) {
	d.mu.Lock()
	d.opts = append(d.opts, o)
	d.mu.Unlock()
	c, err := (&net.Dialer{}).DialContext(ctx, "tcp", d.addr)
	if err != nil {
		return nil, upstream.DialResult{Attempts: 1}, nil, err
	}
	return c, upstream.DialResult{Endpoint: upstream.Endpoint{Addr: d.addr, Target: "db.default.default.dc1"}, Attempts: 1}, func() {}, nil
}
func (d *appDialer) Ready() <-chan struct{} { return d.ready }

// origDsts stands in for iptables' REDIRECT: the original destination of
// a connection from a given client port.
type origDsts struct {
	mu sync.Mutex
	m  map[int]netip.AddrPort
}

func (o *origDsts) originalDst(c net.Conn) (netip.AddrPort, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if d, ok := o.m[c.RemoteAddr().(*net.TCPAddr).Port]; ok {
		return d, nil
	}
	return c.LocalAddr().(*net.TCPAddr).AddrPort(), nil
}

// TestOutboundListener: connections to the outbound listener go by their
// original destination IP, whatever the port: to the route's upstream (a
// virtual IP through the chain, a DialedDirectly instance with its
// address), else through to the original destination, or nowhere once
// MeshDestinationsOnly is set; one addressed to the listener itself is
// refused. Each is counted and access-logged.
func TestOutboundListener(t *testing.T) {
	t.Parallel()
	router := &fakeRouter{routes: map[netip.Addr]tproxy.Route{}}
	dsts := &origDsts{m: map[int]netip.AddrPort{}}
	h := startHarness(t, AccessLogOn, config.Public{}, func(o *Options) {
		o.OriginalDst = dsts.originalDst
		o.Parts = func(*config.Config) Parts { return Parts{Outbound: router} }
	})
	meshApp := serveApp(t, func(c net.Conn) { c.Write([]byte("mesh:")); copyAll(c) })
	db := &appDialer{addr: meshApp, ready: make(chan struct{})}
	close(db.ready)
	router.mu.Lock()
	router.routes[netip.MustParseAddr("240.0.0.7")] = tproxy.Route{Upstream: "db", Dialer: db}
	router.routes[netip.MustParseAddr("10.1.2.3")] = tproxy.Route{Upstream: "db", Dialer: db, Direct: true}
	router.mu.Unlock()

	var outAddr string
	for _, l := range h.p.Listeners() {
		if l.Kind == kindOutbound && strings.HasPrefix(l.Addr, "127.0.0.1:") {
			outAddr = l.Addr
		}
	}
	if outAddr == "" {
		t.Fatalf("no IPv4 outbound listener: %+v", h.p.Listeners())
	}
	// dialAs dials the outbound listener as if the application had dialed
	// dst.
	dialAs := func(dst string) (net.Conn, *bufio.Reader, error) {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		l.Close()
		if dst != "" {
			dsts.mu.Lock()
			dsts.m[port] = netip.MustParseAddrPort(dst)
			dsts.mu.Unlock()
		}
		d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port}}
		c, err := d.Dial("tcp", outAddr)
		if err != nil {
			return nil, nil, err
		}
		return c, bufio.NewReader(c), nil
	}
	expectPrefix := func(r *bufio.Reader, prefix string) {
		t.Helper()
		buf := make([]byte, len(prefix))
		if _, err := r.Read(buf); err != nil || string(buf) != prefix {
			t.Fatalf("read %q, %v; want %q", buf, err, prefix)
		}
	}

	// A virtual IP, two arbitrary ports: the upstream, through its chain.
	for _, dst := range []string{"240.0.0.7:5432", "240.0.0.7:80"} {
		c, r, err := dialAs(dst)
		if err != nil {
			t.Fatal(err)
		}
		expectPrefix(r, "mesh:")
		if err := echoOnce(c, r, "to "+dst, 10*time.Second); err != nil {
			t.Fatalf("%s: %v", dst, err)
		}
		c.Close()
		want(t, h.access.next(t), map[string]any{"direction": "outbound", "destination": "db", "endpoint": meshApp,
			"target": "db.default.default.dc1", "reason": ReasonClosed})
	}
	// A DialedDirectly instance: the upstream is asked to dial that address.
	c, r, err := dialAs("10.1.2.3:8080")
	if err != nil {
		t.Fatal(err)
	}
	expectPrefix(r, "mesh:")
	c.Close()
	h.access.next(t)
	db.mu.Lock()
	if n := len(db.opts); n != 3 || db.opts[0].Direct.IsValid() || db.opts[2].Direct != netip.MustParseAddrPort("10.1.2.3:8080") {
		t.Errorf("dial options %+v: want two chain dials, then a direct dial of 10.1.2.3:8080", db.opts)
	}
	db.mu.Unlock()

	// Outside the mesh: passed through to the original destination.
	c, r, err = dialAs(h.app)
	if err != nil {
		t.Fatal(err)
	}
	if err := echoOnce(c, r, "passthrough", 10*time.Second); err != nil {
		t.Fatalf("passthrough: %v", err)
	}
	c.Close()
	want(t, h.access.next(t), map[string]any{"direction": "outbound", "destination": "passthrough", "endpoint": h.app, "reason": ReasonClosed})

	// MeshDestinationsOnly: reset at once, counted, logged.
	router.meshOnly.Store(true)
	if c, r, err := dialAs(h.app); err == nil {
		if err := closedWithinTest(c, r, 10*time.Second); err != nil {
			t.Fatalf("outside the mesh with MeshDestinationsOnly: %v", err)
		}
		c.Close()
	} else if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatal(err)
	}
	want(t, h.access.next(t), map[string]any{"direction": "outbound", "endpoint": h.app, "reason": ReasonMeshDestinationsOnly})
	// Mesh destinations still go.
	c, r, err = dialAs("240.0.0.7:1")
	if err != nil {
		t.Fatal(err)
	}
	expectPrefix(r, "mesh:")
	c.Close()
	h.access.next(t)

	// Not redirected (the original destination is the listener itself).
	if c, r, err := dialAs(""); err == nil {
		if err := closedWithinTest(c, r, 10*time.Second); err != nil {
			t.Fatalf("a connection addressed to the outbound listener: %v", err)
		}
		c.Close()
	}
	want(t, h.access.next(t), map[string]any{"direction": "outbound", "reason": ReasonOutboundLoop})

	if st, ok := h.p.Outbound(); !ok || len(st.Routes) != 2 || !st.MeshDestinationsOnly || len(st.Listeners) == 0 {
		t.Errorf("Outbound() = %+v, %v", st, ok)
	}
	p := h.prom()
	for _, w := range []string{
		`outbound_connections_total{src="web",dst="db",route="virtual"} 3`,
		`outbound_connections_total{src="web",dst="db",route="direct"} 1`,
		`outbound_connections_total{src="web",dst="passthrough",route="passthrough"} 1`,
		`outbound_refused_total{src="web",reason="mesh_destinations_only"} 1`,
		`outbound_refused_total{src="web",reason="loop"} 1`,
		`outbound_refused_total{src="web",reason="max_outbound_connections"} 0`,
	} {
		if !strings.Contains(p, w) {
			t.Errorf("metrics lack %s:\n%s", w, grepLines(p, "outbound"))
		}
	}
}

// copyAll echoes c until EOF.
func copyAll(c net.Conn) {
	buf := make([]byte, 4096)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			c.Write(buf[:n])
		}
		if err != nil {
			return
		}
	}
}
