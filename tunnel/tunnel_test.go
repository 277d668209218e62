package tunnel

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/straitproxy/strait/internal/testutil"
	"github.com/straitproxy/strait/internal/yamux"
)

func FuzzHeader(f *testing.F) {
	f.Add([]byte{2, 3, 'w', 'e', 'b'})
	f.Add([]byte{2, 0})
	f.Add([]byte{1, 1, 'x'})
	f.Add([]byte{2, 5, 'a'})
	f.Fuzz(func(t *testing.T, b []byte) {
		svc, err := ReadHeader(bytes.NewReader(b))
		if err != nil {
			return
		}
		enc, err := AppendHeader(nil, svc)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.HasPrefix(b, enc) {
			t.Fatalf("round trip: %q -> %q -> %q", b, svc, enc)
		}
	})
}

func TestHeader(t *testing.T) {
	b, err := AppendHeader(nil, "web")
	if err != nil || !bytes.Equal(b, []byte{2, 3, 'w', 'e', 'b'}) {
		t.Fatalf("%v %v", b, err)
	}
	if _, err := AppendHeader(nil, ""); err == nil {
		t.Fatal("empty name accepted")
	}
	if _, err := ReadHeader(bytes.NewReader([]byte{9, 1, 'x'})); !errors.Is(err, ErrBadHeader) {
		t.Fatal(err)
	}
}

// echoServer serves tunnels on a loopback listener: each stream for
// "echo" echoes until EOF, then writes "bye" and closes its write side.
type echoServer struct {
	ln    net.Listener
	mu    sync.Mutex
	conns []net.Conn
	svcs  atomic.Int64
}

func newEchoServer(t *testing.T) *echoServer { return newEchoServerLimits(t, Limits{}, nil) }

func newEchoServerLimits(t *testing.T, lim Limits, onErr func(error)) *echoServer {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &echoServer{ln: ln}
	t.Cleanup(func() { ln.Close(); s.killAll() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			s.conns = append(s.conns, c)
			s.mu.Unlock()
			go Serve(context.Background(), c, lim, func(c *Conn, svc string) {
				if svc != "echo" {
					c.Refuse(StatusDenied)
					return
				}
				defer c.Close()
				s.svcs.Add(1)
				if c.Accept() != nil {
					return
				}
				io.Copy(c, c)
				c.Write([]byte("bye"))
				c.CloseWrite()
			}, onErr)
		}
	}()
	return s
}

func (s *echoServer) killAll() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range s.conns {
		c.Close()
	}
	s.conns = nil
}

func (s *echoServer) dial(ctx context.Context) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, "tcp", s.ln.Addr().String())
}

func TestHalfClose(t *testing.T) {
	s := newEchoServer(t)
	p := &Pool{}
	defer p.Close()
	c, err := p.Open(context.Background(), "k", 1, "echo", s.dial)
	if err != nil {
		t.Fatal(err)
	}
	c.Write([]byte("hello"))
	c.CloseWrite()
	got, err := io.ReadAll(c)
	if err != nil || string(got) != "hellobye" {
		t.Fatalf("got %q, %v", got, err)
	}
	c.Close()
	if tn, st := p.Stats(); tn != 1 || st != 0 {
		t.Fatalf("tunnels %d streams %d", tn, st)
	}
}

func TestPoolLeastLoadedAndLimit(t *testing.T) {
	s := newEchoServer(t)
	p := &Pool{MaxStreams: 2, MaxTunnels: 2}
	defer p.Close()
	var dials atomic.Int64
	dial := func(ctx context.Context) (net.Conn, error) { dials.Add(1); return s.dial(ctx) }
	var cs []*Conn
	for i := range 4 {
		c, err := p.Open(context.Background(), "k", 1, "echo", dial)
		if err != nil {
			t.Fatalf("stream %d: %v", i, err)
		}
		cs = append(cs, c)
	}
	if n := dials.Load(); n != 2 {
		t.Fatalf("dials %d, want 2", n)
	}
	if _, err := p.Open(context.Background(), "k", 1, "echo", dial); !errors.Is(err, ErrNoRoom) {
		t.Fatalf("fifth stream: %v", err)
	}
	// Free one slot on the first tunnel: the next stream takes it
	// without a dial.
	cs[0].Close()
	c, err := p.Open(context.Background(), "k", 1, "echo", dial)
	if err != nil || dials.Load() != 2 {
		t.Fatalf("%v, dials %d", err, dials.Load())
	}
	cs = append(cs, c)
	for _, c := range cs {
		c.Close()
	}
	// A new bundle drains the old tunnels: a new one is dialed.
	c, err = p.Open(context.Background(), "k", 2, "echo", dial)
	if err != nil || dials.Load() != 3 {
		t.Fatalf("%v, dials %d", err, dials.Load())
	}
	c.Close()
}

func TestTunnelDeath(t *testing.T) {
	s := newEchoServer(t)
	p := &Pool{}
	defer p.Close()
	c, err := p.Open(context.Background(), "k", 1, "echo", s.dial)
	if err != nil {
		t.Fatal(err)
	}
	c.Write([]byte("x"))
	buf := make([]byte, 1)
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatal(err)
	}
	s.killAll()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(buf); !errors.Is(err, ErrTunnelLost) {
		t.Fatalf("live stream after tunnel death: %v", err)
	}
	c.Close()
	c2, err := p.Open(context.Background(), "k", 1, "echo", s.dial)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	c2.Write([]byte("y"))
	if _, err := io.ReadFull(c2, buf); err != nil || buf[0] != 'y' {
		t.Fatalf("%q %v", buf, err)
	}
}

func TestWrongServiceRefused(t *testing.T) {
	s := newEchoServer(t)
	p := &Pool{}
	defer p.Close()
	if _, err := p.Open(context.Background(), "k", 1, "other", s.dial); !errors.Is(err, ErrDenied) {
		t.Fatalf("open for another service: %v", err)
	}
	if s.svcs.Load() != 0 {
		t.Fatal("handler served another service")
	}
}

// TestStreamRateLimit: streams opened faster than the tunnel's rate allows
// are closed before the handler runs, and reported.
func TestStreamRateLimit(t *testing.T) {
	refused := make(chan error, 10)
	s := newEchoServerLimits(t, Limits{StreamRate: 0.001, StreamBurst: 2}, func(err error) { refused <- err })
	p := &Pool{MaxTunnels: 1}
	defer p.Close()
	for i := range 3 {
		c, err := p.Open(context.Background(), "k", 1, "echo", s.dial)
		if i == 2 {
			// Refused for the rate: no other tunnel may be dialed, so
			// the caller is told to use a classic connection.
			if !errors.Is(err, ErrNoRoom) {
				t.Fatalf("stream over the rate: %v", err)
			}
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte("x"))
		c.CloseWrite()
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		got, err := io.ReadAll(c)
		c.Close()
		if i < 2 && string(got) != "xbye" {
			t.Fatalf("stream %d within the burst: %q %v", i, got, err)
		}
	}
	select {
	case err := <-refused:
		if !errors.Is(err, ErrStreamRate) {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("refusal not reported")
	}
	if n := s.svcs.Load(); n != 2 {
		t.Fatalf("handler ran for %d streams, want 2", n)
	}
}

// streamPair opens one stream of a session over an in-memory pipe and
// returns both ends.
func streamPair(t *testing.T) (client, server *Conn) {
	t.Helper()
	a, b := net.Pipe()
	cs, err := yamux.Client(a, yamuxConfig(1), nil)
	if err != nil {
		t.Fatal(err)
	}
	ss, err := yamux.Server(b, yamuxConfig(16), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cs.Close(); ss.Close() })
	st, err := cs.OpenStream(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	st.Write([]byte{0})
	sst, err := ss.AcceptStream()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(sst, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	return NewConn(st, nil), NewConn(sst, nil)
}

// TestWaitReadHoldsNoBuffers: streams that received bursts and read them
// hold no receive buffers while they wait for more.
func TestWaitReadHoldsNoBuffers(t *testing.T) {
	const streams, burst = 8, 3 << 20 / 4
	heap := func() uint64 {
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m.HeapInuse
	}
	before := heap()
	var servers []*Conn
	for range streams {
		c, s := streamPair(t)
		servers = append(servers, s)
		go c.Write(make([]byte, burst))
	}
	for _, s := range servers {
		if _, err := io.ReadFull(s, make([]byte, burst)); err != nil {
			t.Fatal(err)
		}
	}
	var wg sync.WaitGroup
	for _, s := range servers {
		s.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		wg.Go(func() { s.WaitRead() })
	}
	wg.Wait()
	if grown := int64(heap()) - int64(before); grown > streams*burst/4 {
		t.Fatalf("heap grew %d bytes: idle streams kept their receive buffers", grown)
	}
}

// TestSlotsAgree: streams ended every way (both sides finishing, the
// client resetting, the server resetting, the client closing while the
// server still sends) free their slot on both ends, so a pool whose
// MaxStreams equals the server's can then open that many streams at once
// on one tunnel without a refusal.
func TestSlotsAgree(t *testing.T) {
	const max = 16
	refused := make(chan error, 100)
	s := newEchoServerLimits(t, Limits{MaxStreams: max}, func(err error) { refused <- err })
	p := &Pool{MaxStreams: max, MaxTunnels: 1}
	defer p.Close()
	open := func() *Conn {
		t.Helper()
		c, err := p.Open(context.Background(), "k", 1, "echo", s.dial)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	for range 50 {
		// Both finish.
		c := open()
		c.Write([]byte("a"))
		c.CloseWrite()
		io.ReadAll(c)
		c.Close()
		// The client aborts mid-stream while the server echoes.
		c = open()
		go c.Write(make([]byte, 1<<20))
		io.ReadFull(c, make([]byte, 10))
		c.Close()
		// The client half-closes and goes away before the reply.
		c = open()
		c.Write([]byte("b"))
		c.CloseWrite()
		c.Close()
	}
	var cs []*Conn
	for range max {
		cs = append(cs, open())
	}
	for i, c := range cs {
		c.Write([]byte{byte(i)})
		b := make([]byte, 1)
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.ReadFull(c, b); err != nil || b[0] != byte(i) {
			t.Fatalf("stream %d: %v %v", i, b, err)
		}
	}
	select {
	case err := <-refused:
		t.Fatalf("server refused a stream: %v", err)
	default:
	}
	if _, err := p.Open(context.Background(), "k", 1, "echo", s.dial); !errors.Is(err, ErrNoRoom) {
		t.Fatalf("stream %d of %d: %v", max+1, max, err)
	}
	for _, c := range cs {
		c.Close()
	}
}

// TestRefusedForLimitRetried: a server with fewer slots than the client
// believes refuses the extra stream; the client learns it and opens the
// stream on another tunnel, so the caller never sees the refusal.
func TestRefusedForLimitRetried(t *testing.T) {
	s := newEchoServerLimits(t, Limits{MaxStreams: 2}, nil)
	p := &Pool{MaxStreams: 10, MaxTunnels: 2}
	defer p.Close()
	var cs []*Conn
	for i := range 4 {
		c, err := p.Open(context.Background(), "k", 1, "echo", s.dial)
		if err != nil {
			t.Fatalf("stream %d: %v", i, err)
		}
		c.Write([]byte("x"))
		if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
			t.Fatalf("stream %d: %v", i, err)
		}
		cs = append(cs, c)
	}
	if tn, _ := p.Stats(); tn != 2 {
		t.Fatalf("tunnels %d, want 2", tn)
	}
	if _, err := p.Open(context.Background(), "k", 1, "echo", s.dial); !errors.Is(err, ErrNoRoom) {
		t.Fatalf("fifth stream: %v", err)
	}
	for _, c := range cs {
		c.Close()
	}
}

// TestServerOpenedStreamClosesTunnel: a server that opens a stream on a
// client tunnel breaks the protocol: the tunnel is closed and reported.
func TestServerOpenedStreamClosesTunnel(t *testing.T) {
	addr := serveOne(t, func(c net.Conn) {
		sess, _ := yamux.Server(c, yamuxConfig(16), nil)
		defer sess.Close()
		st, err := sess.AcceptStream()
		if err != nil {
			return
		}
		io.ReadFull(st, make([]byte, 6)) // header of "echo"
		st.Write([]byte{StatusOK})
		// Once the client has its stream (it writes a byte after Open
		// returns: a violation before that would race its Open), a stream
		// the other way, with data the client never asked for.
		if _, err := io.ReadFull(st, make([]byte, 1)); err != nil {
			return
		}
		evil, err := sess.OpenStream(context.Background())
		if err != nil {
			return
		}
		evil.Write(make([]byte, 200<<10))
		<-sess.CloseChan()
	})
	violations := make(chan error, 1)
	p := &Pool{OnViolation: func(_ string, err error) { violations <- err }}
	defer p.Close()
	c, err := p.Open(context.Background(), "k", 1, "echo", func(ctx context.Context) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "tcp", addr)
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write([]byte{1}); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-violations:
		if !errors.Is(err, ErrServerStream) {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a server-opened stream was not reported")
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, ErrTunnelLost) {
		t.Fatalf("stream of the closed tunnel: %v", err)
	}
	if tn, _ := p.Stats(); tn != 0 {
		t.Fatalf("tunnels %d after the violation", tn)
	}
}

// TestOpenHonoursContext: a peer that takes tunnels but never answers
// streams holds an open no longer than the caller's context.
func TestOpenHonoursContext(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var held []net.Conn
	var mu sync.Mutex
	defer func() {
		mu.Lock()
		defer mu.Unlock()
		for _, c := range held {
			c.Close()
		}
	}()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			held = append(held, c) // never read: no ACK, no answer
			mu.Unlock()
		}
	}()
	p := &Pool{MaxTunnels: 1}
	defer p.Close()
	dial := func(ctx context.Context) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "tcp", ln.Addr().String())
	}
	// More opens than yamux lets wait for an ACK: the later ones wait for
	// a SYN slot, which must honour the context too.
	var wg sync.WaitGroup
	for range 300 {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			defer cancel()
			start := time.Now()
			_, err := p.Open(ctx, "k", 1, "echo", dial)
			if err == nil {
				t.Error("open succeeded against a silent peer")
			}
			if d := time.Since(start); d > 5*time.Second {
				t.Errorf("open took %v with a 300ms context", d)
			}
		})
	}
	wg.Wait()
}

// TestEOFSurvivesTunnelEnd: data and EOF a stream received before its
// tunnel ended are read as such, not as a lost tunnel (a drain that ends
// the tunnel right after the last stream must not turn EOF into a reset).
func TestEOFSurvivesTunnelEnd(t *testing.T) {
	c, s := streamPair(t)
	c.CloseWrite()
	s.Write([]byte("tail"))
	s.CloseWrite()
	// Both FINs are in once the client's session forgets the stream.
	testutil.Eventually(t, "the client forgets the finished stream", func() bool { return c.Stream.Session().NumStreams() == 0 })
	s.Stream.Session().Close()
	<-c.Stream.Session().CloseChan()
	got, err := io.ReadAll(c)
	if err != nil || string(got) != "tail" {
		t.Fatalf("read %q, %v; want the data and EOF", got, err)
	}
}

// TestTunnelBufferCap: a peer that fills every stream of a tunnel whose
// application never reads makes the tunnel hold at most MaxStreams x
// InitialWindow + the tunnel's budget, not MaxStreams x StreamWindow.
func TestTunnelBufferCap(t *testing.T) {
	const streams = 256
	const budget = 2 << 20
	hold := make(chan struct{})
	defer close(hold)
	addr := serveOne(t, func(c net.Conn) {
		Serve(context.Background(), c, Limits{MaxStreams: streams, Budget: budget}, func(c *Conn, svc string) {
			c.Accept()
			go func() { <-hold; c.Close() }() // never reads
		}, nil)
	})
	heap := func() int64 {
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return int64(m.HeapInuse)
	}
	p := &Pool{MaxStreams: streams, MaxTunnels: 1}
	defer p.Close()
	dial := func(ctx context.Context) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "tcp", addr)
	}
	before := heap()
	var cs []*Conn
	for range streams {
		c, err := p.Open(context.Background(), "k", 1, "echo", dial)
		if err != nil {
			t.Fatal(err)
		}
		cs = append(cs, c)
	}
	afterOpen := heap()
	for _, c := range cs {
		go c.Write(make([]byte, 1<<20)) // blocks once the window is used up
	}
	// Poll until the heap stops growing: every writer is stalled.
	last, stable := heap(), 0
	for deadline := time.Now().Add(10 * time.Second); stable < 5 && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond)
		h := heap()
		if d := h - last; d < 64<<10 && d > -(64<<10) {
			stable++
		} else {
			stable = 0
		}
		last = h
	}
	// The writers' own 1 MiB buffers are counted too.
	grown := last - afterOpen - streams*(1<<20)
	limit := int64(streams*InitialWindow + budget + streams*8<<10)
	t.Logf("%d streams: open +%d KiB, filled +%d KiB (limit %d KiB)", streams, (afterOpen-before)>>10, grown>>10, limit>>10)
	if grown > limit {
		t.Fatalf("a tunnel whose app does not read grew by %d KiB, more than %d KiB", grown>>10, limit>>10)
	}
	for _, c := range cs {
		c.Close()
	}
}

// TestPoolSpreadsBusyTunnels: 32 live streams go over every tunnel the
// pool may dial (at spreadStreams each), not 32 deep on the first one.
func TestPoolSpreadsBusyTunnels(t *testing.T) {
	s := newEchoServer(t)
	p := &Pool{MaxTunnels: 4}
	defer p.Close()
	var cs []*Conn
	for range 32 {
		c, err := p.Open(context.Background(), "k", 1, "echo", s.dial)
		if err != nil {
			t.Fatal(err)
		}
		cs = append(cs, c)
	}
	if tn, st := p.Stats(); tn != 4 || st != 32 {
		t.Fatalf("tunnels %d, streams %d; want 4 tunnels for 32 streams", tn, st)
	}
	p.mu.Lock()
	for _, tu := range p.keys["k"] {
		if n := tu.load(); n != 8 {
			t.Errorf("a tunnel carries %d streams, want 8", n)
		}
	}
	p.mu.Unlock()
	for _, c := range cs {
		c.Close()
	}
}

// gatedConn blocks Reads while its gate is shut.
type gatedConn struct {
	net.Conn
	mu   sync.Mutex
	open *sync.Cond
	shut bool
}

func newGatedConn(c net.Conn) *gatedConn {
	g := &gatedConn{Conn: c}
	g.open = sync.NewCond(&g.mu)
	return g
}

func (g *gatedConn) Read(b []byte) (int, error) {
	g.mu.Lock()
	for g.shut {
		g.open.Wait()
	}
	g.mu.Unlock()
	return g.Conn.Read(b)
}

func (g *gatedConn) setShut(shut bool) {
	g.mu.Lock()
	g.shut = shut
	g.mu.Unlock()
	g.open.Broadcast()
}

// TestDrainSendsLastFrames: a draining tunnel whose last stream has
// finished on the server side, with its reply and FIN still queued (the
// client is slow to read), waits for them to leave before it closes: the
// client reads the reply and EOF, not a lost tunnel.
func TestDrainSendsLastFrames(t *testing.T) {
	a, b := net.Pipe()
	client := newGatedConn(a)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	reply := make(chan struct{})
	served := make(chan error, 1)
	go func() {
		served <- Serve(ctx, b, Limits{}, func(c *Conn, svc string) {
			c.Accept()
			<-reply
			c.Write([]byte("tail"))
			c.CloseWrite()
		}, nil)
	}()
	sess, err := yamux.Client(client, yamuxConfig(1), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close()
	defer client.setShut(false) // before Close, which waits for the reader
	st, err := sess.OpenStream(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	hdr, _ := AppendHeader(nil, "echo")
	if answer, err := handshakeStream(context.Background(), st, hdr); err != nil || answer != StatusOK {
		t.Fatalf("answer %d, %v", answer, err)
	}
	st.CloseWrite() // our FIN: the server finishes the stream once it has replied
	client.setShut(true)
	close(reply)
	cancel() // drain, while the reply and the server's FIN cannot be written yet
	select {
	case err := <-served:
		t.Fatalf("the tunnel closed with its last frames unsent: %v", err)
	case <-time.After(10 * drainPoll):
	}
	client.setShut(false)
	st.SetReadDeadline(time.Now().Add(10 * time.Second))
	got, err := io.ReadAll(NewConn(st, nil))
	if err != nil || string(got) != "tail" {
		t.Fatalf("read %q, %v; want the reply and EOF", got, err)
	}
	if err := <-served; err != nil {
		t.Fatalf("Serve: %v", err)
	}
}

// serveOne listens on loopback, runs serve on the first connection (closed
// when serve returns) and returns the address.
func serveOne(t *testing.T, serve func(net.Conn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		serve(c)
	}()
	return ln.Addr().String()
}
