package proxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/straitproxy/strait/config"
	"github.com/straitproxy/strait/internal/testutil"
	"github.com/straitproxy/strait/tunnel"
)

// flood opens n TCP connections to addr that never send a byte and returns
// them; the test's cleanup closes them.
func flood(t *testing.T, addr string, n int) []net.Conn {
	t.Helper()
	conns := make([]net.Conn, 0, n)
	t.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	for range n {
		c, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			t.Fatalf("connect %d: %v", len(conns), err)
		}
		conns = append(conns, c)
	}
	return conns
}

// closedByPeer counts the connections the other side has closed (EOF or
// reset within wait); the others are still open.
func closedByPeer(conns []net.Conn, wait time.Duration) int {
	var mu sync.Mutex
	n := 0
	var wg sync.WaitGroup
	for _, c := range conns {
		wg.Go(func() {
			c.SetReadDeadline(time.Now().Add(wait))
			_, err := c.Read(make([]byte, 1))
			c.SetReadDeadline(time.Time{})
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				return
			}
			mu.Lock()
			n++
			mu.Unlock()
		})
	}
	wg.Wait()
	return n
}

// publicStats returns the public listener's counters.
func (h *harness) publicStats(t *testing.T) ListenerStats {
	t.Helper()
	for _, l := range h.p.Listeners() {
		if l.Kind == "inbound" && !l.Draining {
			return l
		}
	}
	t.Fatal("no public listener")
	return ListenerStats{}
}

// waitAccepted waits until the public listener has accepted n connections
// (admitted or refused) and returns its counters.
func (h *harness) waitAccepted(t *testing.T, n int64) ListenerStats {
	t.Helper()
	var st ListenerStats
	testutil.EventuallyNil(t, func() error {
		if st = h.publicStats(t); st.Accepted < n {
			return fmt.Errorf("public listener accepted %d of %d connections", st.Accepted, n)
		}
		return nil
	})
	return st
}

func (h *harness) prom() string {
	var b bytes.Buffer
	h.m.WritePrometheus(&b)
	return b.String()
}

// TestMaxInboundConnectionsBoundsSilentConnects: with
// max_inbound_connections 50, 300 connections that never send a byte leave
// 50 waiting in their handshake; the other 250 are closed at once, without
// a handshake, and counted. Raising the limit on reload admits more without
// a restart; once the flood ends a real client gets through.
func TestMaxInboundConnectionsBoundsSilentConnects(t *testing.T) {
	t.Parallel()
	const limit, n = 50, 300
	h := startHarness(t, AccessLogOff, config.Public{MaxInboundConnections: limit, HandshakeTimeout: time.Minute})
	addr := h.p.PublicAddr().String()
	conns := flood(t, addr, n)
	st := h.waitAccepted(t, n)
	if st.Active > limit || st.Refused != n-limit {
		t.Fatalf("after %d silent connects with max_inbound_connections %d: %d held, %d refused; want %d held, %d refused", n, limit, st.Active, st.Refused, limit, n-limit)
	}
	if got := closedByPeer(conns, 500*time.Millisecond); got != n-limit {
		t.Fatalf("%d of %d silent connections were closed by strait, want %d", got, n, n-limit)
	}
	if s := fmt.Sprintf(`inbound_conns_refused_total{dst="web",reason="max_inbound_connections"} %d`, n-limit); !strings.Contains(h.prom(), s+"\n") {
		t.Fatalf("metrics lack %s:\n%s", s, h.prom())
	}

	// Reload with a higher limit: 30 more are admitted.
	cfg := *h.p.cfg.Load()
	pub := *cfg.Public
	pub.MaxInboundConnections = limit + 30
	cfg.Public = &pub
	if err := h.p.apply(&cfg); err != nil {
		t.Fatal(err)
	}
	more := flood(t, addr, 100)
	st = h.waitAccepted(t, n+100)
	if st.Active != limit+30 || st.Refused != n-limit+70 {
		t.Fatalf("after the reload to %d: %d held, %d refused in all", limit+30, st.Active, st.Refused)
	}
	if got := closedByPeer(more, 500*time.Millisecond); got != 70 {
		t.Fatalf("after the reload, %d of 100 new silent connections were closed, want 70", got)
	}

	// The flood ends; a real peer is served.
	for _, c := range append(conns, more...) {
		c.Close()
	}
	testutil.EventuallyNil(t, func() error {
		if a := h.publicStats(t).Active; a != 0 {
			return fmt.Errorf("%d connections still held after the flood", a)
		}
		return nil
	})
	c, err := h.dialPublic("web")
	if err != nil {
		t.Fatal(err)
	}
	roundTrip(t, c, "after the flood")
}

// TestMaxHandshakesDefault: with no connection limit, silent connections
// still hold at most DefaultMaxHandshakes handshakes; the rest are closed
// at once and counted as max_handshakes.
func TestMaxHandshakesDefault(t *testing.T) {
	t.Parallel()
	const extra = 100
	h := startHarness(t, AccessLogOff, config.Public{HandshakeTimeout: time.Minute})
	conns := flood(t, h.p.PublicAddr().String(), DefaultMaxHandshakes+extra)
	st := h.waitAccepted(t, DefaultMaxHandshakes+extra)
	if st.Active != DefaultMaxHandshakes || st.Refused != extra {
		t.Fatalf("after %d silent connects: %d held, %d refused; want %d held", len(conns), st.Active, st.Refused, DefaultMaxHandshakes)
	}
	if got := closedByPeer(conns, 500*time.Millisecond); got != extra {
		t.Fatalf("%d silent connections were closed by strait, want %d", got, extra)
	}
	if s := fmt.Sprintf(`inbound_conns_refused_total{dst="web",reason="max_handshakes"} %d`, extra); !strings.Contains(h.prom(), s+"\n") {
		t.Fatalf("metrics lack %s", s)
	}
}

// TestMaxInboundConnectionsCountsTunnelStreams: tunnel streams take
// connection slots like classic connections, the tunnel itself none once
// its handshake is done. With a limit of 3, three live streams leave no
// room: a fourth stream and a classic connection are refused; when a
// stream ends, a new one is served.
func TestMaxInboundConnectionsCountsTunnelStreams(t *testing.T) {
	t.Parallel()
	h := startHarness(t, AccessLogOff, config.Public{MaxInboundConnections: 3}, withTunnels)
	var pool tunnel.Pool
	defer pool.Close()
	first, err := pool.Adopt(context.Background(), "k", nil, h.dialMux(t), "web") // the tunnel and its first stream
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	// The client's handshake ends before the server's.
	testutil.EventuallyNil(t, func() error {
		if hs, _ := h.p.admit.counts(); hs != 0 {
			return fmt.Errorf("%d handshakes in progress", hs)
		}
		return nil
	})
	open := func() net.Conn {
		t.Helper()
		c, err := pool.Open(context.Background(), "k", nil, "web", nil)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	// echoes reports whether c is proxied to the echo app.
	echoes := func(c net.Conn) bool {
		c.SetDeadline(time.Now().Add(10 * time.Second))
		defer c.SetDeadline(time.Time{})
		if _, err := c.Write([]byte("x")); err != nil {
			t.Logf("write: %v", err)
			return false
		}
		b := make([]byte, 1)
		_, err := io.ReadFull(c, b)
		if err != nil {
			t.Logf("read: %v", err)
		}
		return err == nil
	}
	live := []net.Conn{first}
	for i := range 3 {
		var c net.Conn = first
		if i > 0 {
			c = open()
		}
		defer c.Close()
		if !echoes(c) {
			hs, cs := h.p.admit.counts()
			t.Fatalf("stream %d of 3 not served (handshakes %d, connections %d, tunnels %+v, listeners %+v)", i, hs, cs, h.p.Tunnels(), h.p.Listeners())
		}
		if i > 0 {
			live = append(live, c)
		}
	}
	// Refused, the stream is not served; with no other tunnel to try
	// the caller is told to dial a classic connection.
	if _, err := pool.Open(context.Background(), "k", nil, "web", nil); !errors.Is(err, tunnel.ErrNoRoom) {
		t.Fatalf("a fourth stream with max_inbound_connections 3: %v", err)
	}
	if s := `inbound_conns_refused_total{dst="web",reason="max_inbound_connections"} 1`; !strings.Contains(h.prom(), s+"\n") {
		t.Fatalf("metrics lack %s", s)
	}
	if c, err := h.dialPublic("web"); err == nil {
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err == nil {
			t.Fatal("a classic connection was served with 3 streams live and max_inbound_connections 3")
		}
		c.Close()
	}
	live[0].Close()
	testutil.EventuallyNil(t, func() error {
		c, err := pool.Open(context.Background(), "k", nil, "web", nil)
		if err != nil {
			return err
		}
		defer c.Close()
		if !echoes(c) {
			return errors.New("no stream served after one of the three ended")
		}
		return nil
	})
}
