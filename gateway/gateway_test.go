package gateway

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/straitproxy/strait/internal/testutil"
	"github.com/straitproxy/strait/metrics"
	"github.com/straitproxy/strait/proxy"
)

// fakeRouter routes the server names it holds; everything else is an
// unknown service.
type fakeRouter struct {
	mu      sync.Mutex
	targets map[string]*Target
	calls   atomic.Int64
}

func (r *fakeRouter) Route(ctx context.Context, sni string) (*Target, error) {
	r.calls.Add(1)
	r.mu.Lock()
	t := r.targets[sni]
	r.mu.Unlock()
	if t == nil {
		return nil, &RouteError{Result: ResultUnknownSNI, Reason: UnknownService}
	}
	return t, nil
}

func localTarget(service string, addrs ...string) *Target {
	t := NewTarget(Name{Kind: KindLocal, Datacenter: "dc1", Service: service, Namespace: "default"})
	var eps []Endpoint
	for _, a := range addrs {
		eps = append(eps, Endpoint{Addr: a})
	}
	t.SetEndpoints(eps)
	return t
}

func hclogTo(w io.Writer) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{Name: "gateway", Output: w, Level: hclog.Debug})
}

type testServer struct {
	*Server
	addr string
	log  *testutil.Buffer
	m    *metrics.Metrics
}

func startServer(t testing.TB, r Router, opts Options) *testServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	buf := &testutil.Buffer{}
	opts.Router = r
	opts.Logger = hclogTo(buf)
	if opts.Metrics == nil {
		opts.Metrics = metrics.Discard()
	}
	if opts.AccessLog == "" {
		opts.AccessLog = proxy.AccessLogOn
	}
	s := New(opts)
	s.Serve(ln)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s.Shutdown(ctx)
		if t.Failed() {
			t.Logf("gateway log:\n%s", buf.String())
		}
	})
	return &testServer{Server: s, addr: ln.Addr().String(), log: buf, m: opts.Metrics}
}

// backend is a plain TCP server that records the first bytes of each
// connection (the replayed hello) and then echoes.
type backend struct {
	ln      net.Listener
	accepts atomic.Int64
	mu      sync.Mutex
	hellos  [][]byte
	conns   []net.Conn
}

func startBackend(t testing.TB, helloLen int) *backend {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &backend{ln: ln}
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			b.accepts.Add(1)
			b.mu.Lock()
			b.conns = append(b.conns, c)
			b.mu.Unlock()
			wg.Go(func() {
				defer c.Close()
				h := make([]byte, helloLen)
				if _, err := io.ReadFull(c, h); err != nil {
					return
				}
				b.mu.Lock()
				b.hellos = append(b.hellos, h)
				b.mu.Unlock()
				io.Copy(c, c)
				c.(*net.TCPConn).CloseWrite()
			})
		}
	})
	t.Cleanup(func() {
		ln.Close()
		b.mu.Lock()
		for _, c := range b.conns {
			c.Close()
		}
		b.mu.Unlock()
		wg.Wait()
	})
	return b
}

func (b *backend) addr() string { return b.ln.Addr().String() }

func helloFor(t testing.TB, sni string) []byte {
	return captureHello(t, &tls.Config{ServerName: sni, InsecureSkipVerify: true})
}

const sniWeb = "web.default.dc1.internal." + testTD

// TestRoutesAndReplaysHello: the backend receives the ClientHello byte
// for byte and then the rest of the stream, in order; a half-close from
// the client reaches the backend, whose reply still comes back in full.
func TestRoutesAndReplaysHello(t *testing.T) {
	t.Parallel()
	hello := helloFor(t, sniWeb)
	be := startBackend(t, len(hello))
	r := &fakeRouter{targets: map[string]*Target{sniWeb: localTarget("web", be.addr())}}
	s := startServer(t, r, Options{})

	c, err := net.Dial("tcp", s.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	payload := make([]byte, 1<<20)
	rand.Read(payload)
	go func() {
		c.Write(hello)
		c.Write(payload)
		c.(*net.TCPConn).CloseWrite()
	}()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("reading the echo: %v", err)
	}
	if !bytes.Equal(got, payload) {
		t.Fatalf("echo of %d bytes differs from the %d sent", len(got), len(payload))
	}
	be.mu.Lock()
	if len(be.hellos) != 1 || !bytes.Equal(be.hellos[0], hello) {
		t.Errorf("backend did not receive the hello verbatim")
	}
	be.mu.Unlock()
	testutil.Eventually(t, "the access log line", func() bool {
		return strings.Contains(s.log.String(), "result=routed")
	})
	line := s.log.String()
	for _, want := range []string{"sni=" + sniWeb, "route=local", "target=web", "upstream=" + be.addr(),
		fmt.Sprintf("rx_bytes=%d", len(hello)+len(payload)), fmt.Sprintf("tx_bytes=%d", len(payload))} {
		if !strings.Contains(line, want) {
			t.Errorf("access log lacks %q:\n%s", want, line)
		}
	}
	if n := s.Stats().Results[ResultRouted]; n != 1 {
		t.Errorf("routed %d, want 1", n)
	}
}

// TestTLSEndToEnd: a real TLS client and server handshake through the
// gateway, which holds no certificate: TLS is not terminated.
func TestTLSEndToEnd(t *testing.T) {
	t.Parallel()
	ca := testutil.NewCA(t, testTD)
	srvLeaf := ca.Leaf(t, "web", testutil.LeafOptions{})
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{srvLeaf.Cert}})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var sawSNI atomic.Value
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				tc := c.(*tls.Conn)
				if tc.Handshake() != nil {
					return
				}
				sawSNI.Store(tc.ConnectionState().ServerName)
				io.Copy(c, c)
			}()
		}
	}()
	r := &fakeRouter{targets: map[string]*Target{sniWeb: localTarget("web", ln.Addr().String())}}
	s := startServer(t, r, Options{})
	c, err := tls.Dial("tcp", s.addr, &tls.Config{ServerName: sniWeb, RootCAs: ca.Pool(),
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 || cs.PeerCertificates[0].URIs[0].String() != srvLeaf.URI {
				return errors.New("not web's certificate")
			}
			return nil
		}, InsecureSkipVerify: true})
	if err != nil {
		t.Fatalf("TLS through the gateway: %v", err)
	}
	defer c.Close()
	msg := []byte("hello through the gateway")
	c.Write(msg)
	got := make([]byte, len(msg))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("echo %q, %v", got, err)
	}
	if v, _ := sawSNI.Load().(string); v != sniWeb {
		t.Errorf("backend saw server name %q, want %q", v, sniWeb)
	}
}

// TestUnknownSNIRefused: an unknown name is closed without a byte back,
// counted by result and reason, and nothing is dialed.
func TestUnknownSNIRefused(t *testing.T) {
	t.Parallel()
	hello := helloFor(t, "nope.default.dc1.internal."+testTD)
	be := startBackend(t, len(hello))
	r := &fakeRouter{targets: map[string]*Target{sniWeb: localTarget("web", be.addr())}}
	s := startServer(t, r, Options{})
	if err := refusedAfter(s.addr, hello); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, "the unknown_sni count", func() bool {
		st := s.Stats()
		return st.Results[ResultUnknownSNI] == 1 && st.UnknownSNI[UnknownService] == 1
	})
	if n := be.accepts.Load(); n != 0 {
		t.Errorf("backend dialed %d times for an unknown name", n)
	}
	var out bytes.Buffer
	s.m.WritePrometheus(&out)
	for _, want := range []string{`gateway_connections_total{result="unknown_sni"} 1`, `gateway_unknown_sni_total{reason="unknown_service"} 1`} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("metrics lack %s", want)
		}
	}
}

// refusedAfter dials addr, sends what, and expects the connection closed
// with nothing read.
func refusedAfter(addr string, what []byte) error {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	c.Write(what)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 16)
	n, err := c.Read(buf)
	if n > 0 {
		return fmt.Errorf("received %q", buf[:n])
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return errors.New("connection neither answered nor closed")
	}
	return nil
}

// TestLeastActiveAndFailover: connections go to the endpoint with the
// fewest live ones; an endpoint that refuses is skipped within the same
// connection.
func TestLeastActiveAndFailover(t *testing.T) {
	t.Parallel()
	hello := helloFor(t, sniWeb)
	a, b := startBackend(t, len(hello)), startBackend(t, len(hello))
	dead, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	deadAddr := dead.Addr().String()
	dead.Close() // refuses from now on
	tgt := localTarget("web", a.addr(), b.addr(), deadAddr)
	r := &fakeRouter{targets: map[string]*Target{sniWeb: tgt}}
	s := startServer(t, r, Options{})

	open := func() net.Conn {
		c, err := net.Dial("tcp", s.addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.Write(hello)
		c.Write([]byte("x"))
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		one := make([]byte, 1)
		if _, err := io.ReadFull(c, one); err != nil {
			t.Fatalf("connection through the gateway: %v", err)
		}
		return c
	}
	// Four connections: whatever the order, the dead endpoint is skipped
	// and the live ones end up with two each.
	var conns []net.Conn
	for range 4 {
		conns = append(conns, open())
	}
	if na, nb := a.accepts.Load(), b.accepts.Load(); na != 2 || nb != 2 {
		t.Fatalf("accepts %d and %d, want 2 and 2 (least active)", na, nb)
	}
	// Free both of a's (a reset, so that the gateway closes both sides
	// at once): the next two go to a.
	a.mu.Lock()
	for _, c := range a.conns {
		c.(*net.TCPConn).SetLinger(0)
		c.Close()
	}
	a.mu.Unlock()
	testutil.Eventually(t, "a's connections released", func() bool {
		for _, e := range tgt.snapshot() {
			if e.Addr == a.addr() && e.active.Load() != 0 {
				return false
			}
		}
		return true
	})
	open()
	open()
	if na := a.accepts.Load(); na != 4 {
		t.Errorf("a accepted %d, want 4: the least active endpoint gets new connections", na)
	}
	if !strings.Contains(s.log.String(), "attempts=2") {
		t.Errorf("no connection retried past the dead endpoint:\n%s", s.log.String())
	}
	_ = conns
}

// TestNoEndpoints: a known target with no healthy endpoint refuses.
func TestNoEndpoints(t *testing.T) {
	t.Parallel()
	r := &fakeRouter{targets: map[string]*Target{sniWeb: localTarget("web")}}
	s := startServer(t, r, Options{})
	if err := refusedAfter(s.addr, helloFor(t, sniWeb)); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, "no_endpoints counted", func() bool { return s.Stats().Results[ResultNoEndpoints] == 1 })
}

// The hostile clients: each is bounded, counted and never reaches the
// router.

func TestSlowlorisHello(t *testing.T) {
	t.Parallel()
	r := &fakeRouter{}
	s := startServer(t, r, Options{HelloTimeout: 300 * time.Millisecond})
	hello := helloFor(t, sniWeb)
	c, err := net.Dial("tcp", s.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	start := time.Now()
	// One byte every 50ms: the whole hello would take a minute.
	closed := make(chan time.Duration, 1)
	go func() {
		buf := make([]byte, 1)
		c.Read(buf)
		closed <- time.Since(start)
	}()
	for i := 0; i < len(hello); i++ {
		if _, err := c.Write(hello[i : i+1]); err != nil {
			break
		}
		select {
		case <-closed:
			i = len(hello)
		case <-time.After(50 * time.Millisecond):
		}
	}
	testutil.Eventually(t, "hello_timeout counted", func() bool { return s.Stats().Results[ResultHelloTimeout] == 1 })
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("slow hello held for %s, want about the 300ms hello timeout", d)
	}
	if r.calls.Load() != 0 {
		t.Error("a partial hello reached the router")
	}
}

func TestOversizedAndGarbageHellos(t *testing.T) {
	t.Parallel()
	r := &fakeRouter{}
	s := startServer(t, r, Options{})
	p := defaultParts()
	p.exts = sniExt(sniWeb)
	p.lenDelta = 1 << 15 // the handshake claims more than its record
	for _, tc := range []struct {
		name string
		data []byte
	}{
		{"http", []byte("GET / HTTP/1.1\r\nHost: web\r\n\r\n")},
		{"record over 16 KiB", append([]byte{22, 3, 1, 0xff, 0xff}, make([]byte, 1024)...)},
		{"fragmented hello", p.build()},
		{"zeros", make([]byte, 64)},
	} {
		if err := refusedAfter(s.addr, tc.data); err != nil {
			t.Errorf("%s: %v", tc.name, err)
		}
	}
	testutil.Eventually(t, "four bad_hello", func() bool { return s.Stats().Results[ResultBadHello] == 4 })
	if r.calls.Load() != 0 {
		t.Error("a bad hello reached the router")
	}
}

// TestIdleConnectionsBounded: connections that send nothing take pending
// slots; beyond MaxPending new ones are closed at once and counted, and
// the slots come back when the idle ones time out.
func TestIdleConnectionsBounded(t *testing.T) {
	t.Parallel()
	const maxPending = 5
	s := startServer(t, &fakeRouter{}, Options{MaxPending: maxPending, HelloTimeout: time.Second})
	var idle []net.Conn
	for range maxPending {
		c, err := net.Dial("tcp", s.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		idle = append(idle, c)
	}
	testutil.Eventually(t, "five pending", func() bool { return s.Stats().Pending == maxPending })
	if err := refusedAfter(s.addr, nil); err != nil {
		t.Fatalf("the connection beyond max-pending: %v", err)
	}
	testutil.Eventually(t, "max_pending counted", func() bool { return s.Stats().Results[ResultMaxPending] >= 1 })
	testutil.Eventually(t, "idle ones timed out", func() bool {
		st := s.Stats()
		return st.Results[ResultHelloTimeout] == maxPending && st.Pending == 0 && st.Held == 0
	})
	_ = idle
}

// TestMaxConnections: proxied connections count against MaxConnections
// too.
func TestMaxConnections(t *testing.T) {
	t.Parallel()
	hello := helloFor(t, sniWeb)
	be := startBackend(t, len(hello))
	r := &fakeRouter{targets: map[string]*Target{sniWeb: localTarget("web", be.addr())}}
	s := startServer(t, r, Options{MaxConnections: 2})
	for range 2 {
		c, err := net.Dial("tcp", s.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write(hello)
	}
	testutil.Eventually(t, "two proxied", func() bool { return s.Stats().Active == 2 })
	if err := refusedAfter(s.addr, hello); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, "max_connections counted", func() bool { return s.Stats().Results[ResultMaxConnections] == 1 })
}

// TestShutdownDrainsAndJoins is not parallel: it counts goroutines.
func TestShutdownDrainsAndJoins(t *testing.T) {
	hello := helloFor(t, sniWeb)
	be := startBackend(t, len(hello))
	before := testutil.Goroutines() // the backend's accept loop included
	r := &fakeRouter{targets: map[string]*Target{sniWeb: localTarget("web", be.addr())}}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := New(Options{Router: r})
	s.Serve(ln)
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write(hello)
	testutil.Eventually(t, "proxied", func() bool { return s.Stats().Active == 1 })

	// A live connection keeps Shutdown waiting until it ends...
	done := make(chan struct{})
	go func() {
		s.Shutdown(context.Background())
		close(done)
	}()
	testutil.EventuallyNil(t, func() error {
		if _, err := net.Dial("tcp", ln.Addr().String()); err == nil {
			return errors.New("still accepting after Shutdown began")
		}
		return nil
	})
	select {
	case <-done:
		t.Fatal("Shutdown returned with a live connection")
	case <-time.After(100 * time.Millisecond):
	}
	c.Write([]byte("still works"))
	buf := make([]byte, 11)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatalf("a draining connection: %v", err)
	}
	c.Close()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Shutdown did not return after the last connection ended")
	}
	// ...and a grace that runs out closes what is left.
	s2 := New(Options{Router: r})
	ln2, _ := net.Listen("tcp", "127.0.0.1:0")
	s2.Serve(ln2)
	c2, err := net.Dial("tcp", ln2.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	c2.Write(hello)
	testutil.Eventually(t, "proxied", func() bool { return s2.Stats().Active == 1 })
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	s2.Shutdown(ctx)
	cancel()
	c2.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c2.Read(buf); err == nil {
		t.Error("connection still open after a forced shutdown")
	}
	testutil.NoNewGoroutines(t, before)
}
