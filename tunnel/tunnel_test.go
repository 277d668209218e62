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

	"github.com/hashicorp/yamux"
)

func FuzzHeader(f *testing.F) {
	f.Add([]byte{1, 3, 'w', 'e', 'b'})
	f.Add([]byte{1, 0})
	f.Add([]byte{2, 1, 'x'})
	f.Add([]byte{1, 5, 'a'})
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
	if err != nil || !bytes.Equal(b, []byte{1, 3, 'w', 'e', 'b'}) {
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
				defer c.Close()
				if svc != "echo" {
					return
				}
				s.svcs.Add(1)
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

var errTimeout = errors.New("timeout")

func TestWrongServiceClosed(t *testing.T) {
	s := newEchoServer(t)
	p := &Pool{}
	defer p.Close()
	c, err := p.Open(context.Background(), "k", 1, "other", s.dial)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := c.Read(make([]byte, 1)); n != 0 || err == nil {
		t.Fatalf("read %d, %v", n, err)
	}
	if s.svcs.Load() != 0 {
		t.Fatal("handler served another service")
	}
}

// TestNoAbsoluteHalfCloseLimit: yamux would reset a stream 5 minutes after
// our FIN even while the peer is still sending (a long reply to a client
// that half-closed after its request); the proxy's idle-based
// -half-close-timeout is the only limit.
func TestNoAbsoluteHalfCloseLimit(t *testing.T) {
	if c := YamuxConfig(0); c.StreamCloseTimeout != 0 || c.MaxStreamWindowSize != StreamWindow {
		t.Fatalf("%+v", c)
	}
}

// TestStreamRateLimit: streams opened faster than the tunnel's rate allows
// are closed before the handler runs, and reported.
func TestStreamRateLimit(t *testing.T) {
	refused := make(chan error, 10)
	s := newEchoServerLimits(t, Limits{StreamRate: 0.001, StreamBurst: 2}, func(err error) { refused <- err })
	p := &Pool{}
	defer p.Close()
	for i := range 3 {
		c, err := p.Open(context.Background(), "k", 1, "echo", s.dial)
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
		if i == 2 && len(got) != 0 {
			t.Fatalf("stream over the rate got %q", got)
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

// streamPair opens one stream of a yamux session over an in-memory pipe and
// returns both ends.
func streamPair(t *testing.T) (client, server *Conn) {
	t.Helper()
	a, b := net.Pipe()
	cs, err := yamux.Client(newCoalescer(a), YamuxConfig(0))
	if err != nil {
		t.Fatal(err)
	}
	ss, err := yamux.Server(newCoalescer(b), YamuxConfig(0))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cs.Close(); ss.Close() })
	st, err := cs.OpenStream()
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

// TestWaitReadDeadlines: a deadline set while WaitRead waits applies at
// once, and data that arrives after the shrink point is still delivered.
func TestWaitReadDeadlines(t *testing.T) {
	c, s := streamPair(t)
	done := make(chan error, 1)
	go func() { done <- s.WaitRead() }()
	s.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	select {
	case err := <-done:
		var ne net.Error
		if !errors.As(err, &ne) || !ne.Timeout() {
			t.Fatalf("WaitRead after the deadline: %v", err)
		}
	case <-time.After(ShrinkAfter / 2):
		t.Fatal("a deadline set during WaitRead did not apply")
	}
	s.SetReadDeadline(time.Time{})

	old := ShrinkAfter
	ShrinkAfter = 10 * time.Millisecond
	defer func() { ShrinkAfter = old }()
	// Enough read for WaitRead to take its bounded wait and shrink.
	go c.Write(make([]byte, shrinkMinBytes))
	if _, err := io.ReadFull(s, make([]byte, shrinkMinBytes)); err != nil {
		t.Fatal(err)
	}
	go func() { done <- s.WaitRead() }()
	time.AfterFunc(100*time.Millisecond, func() { c.Write([]byte("late")) })
	if err := <-done; err != nil {
		t.Fatalf("WaitRead past the shrink point: %v", err)
	}
	b := make([]byte, 8)
	if n, err := s.Read(b); err != nil || string(b[:n]) != "late" {
		t.Fatalf("read %q, %v", b[:n], err)
	}
}

// TestWaitReadReleasesBuffers: streams whose receive buffers grew under a
// burst give them back once idle for ShrinkAfter.
func TestWaitReadReleasesBuffers(t *testing.T) {
	old := ShrinkAfter
	ShrinkAfter = 20 * time.Millisecond
	defer func() { ShrinkAfter = old }()
	const streams, burst = 8, 3 << 20 / 4 // under the window: buffered unread
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
	heap := func() uint64 {
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m.HeapInuse
	}
	before := heap()
	var wg sync.WaitGroup
	for _, s := range servers {
		s.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		wg.Go(func() { s.WaitRead() })
	}
	wg.Wait()
	after := heap()
	if freed := int64(before) - int64(after); freed < streams*burst/2 {
		t.Fatalf("heap %d -> %d bytes: idle streams kept their receive buffers", before, after)
	}
}
