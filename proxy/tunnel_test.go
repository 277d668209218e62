package proxy

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
	"github.com/straitproxy/strait/internal/yamux"

	"github.com/straitproxy/strait/config"
	"github.com/straitproxy/strait/internal/testagent"
	"github.com/straitproxy/strait/internal/testutil"
	"github.com/straitproxy/strait/tlsutil"
	"github.com/straitproxy/strait/tunnel"
)

func withTunnels(o *Options) { o.Tunnels = &tunnel.Pool{} }

// TestTunnelSelfLoop: with tunnels on, connections through the upstream
// "web" (our own public listener) ride as streams of a tunnel, carry data
// both ways with half-close, are accounted per stream, and run
// concurrently; a deny intention then refuses new streams on the live
// tunnel before the app is dialed.
func TestTunnelSelfLoop(t *testing.T) {
	t.Parallel()
	h := startHarness(t, AccessLogOn, config.Public{}, withTunnels)

	for i := range 3 {
		c, err := net.Dial("unix", h.upSock)
		if err != nil {
			t.Fatal(err)
		}
		roundTrip(t, c, fmt.Sprintf("hello %d", i))
		got := map[string]map[string]any{}
		for range 2 {
			l := h.access.next(t)
			got[l["direction"].(string)] = l
		}
		want(t, got["inbound"], map[string]any{"source": testagent.ServiceID("web"), "rx_bytes": 7, "tx_bytes": 7, "reason": ReasonClosed})
		want(t, got["upstream"], map[string]any{"rx_bytes": 7, "tx_bytes": 7, "reason": ReasonClosed})
	}
	ts := h.p.Tunnels()
	if ts.InboundTunnels != 1 || ts.OutboundTunnels != 1 {
		t.Fatalf("tunnels %+v, want one each way", ts)
	}

	const n = 200
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Go(func() {
			c, err := net.Dial("unix", h.upSock)
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(20 * time.Second))
			msg := make([]byte, 10000+i)
			for j := range msg {
				msg[j] = byte(i + j)
			}
			go func() {
				c.Write(msg)
				c.(*net.UnixConn).CloseWrite()
			}()
			got, err := io.ReadAll(c)
			if err != nil {
				errs <- err
				return
			}
			if string(got) != string(msg) {
				errs <- fmt.Errorf("stream %d: %d bytes back, want %d", i, len(got), len(msg))
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	for range 2 * n {
		h.access.next(t)
	}
	ts = h.p.Tunnels()
	if ts.OutboundTunnels < 1 || ts.OutboundTunnels > 4 || ts.InboundTunnels != ts.OutboundTunnels {
		t.Fatalf("after %d concurrent streams: %+v", n, ts)
	}

	t.Logf("before deny: %+v", h.p.Tunnels())
	h.agent.SetIntentions(testagent.Intention("web", "web", api.IntentionActionDeny))
	testutil.EventuallyNil(t, func() error {
		c, err := net.Dial("unix", h.upSock)
		if err != nil {
			return err
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		c.Write([]byte("x"))
		c.(*net.UnixConn).CloseWrite()
		b, _ := io.ReadAll(c)
		// A refused stream ends with the server's FIN: the app sees EOF
		// and closes; only then does the upstream side finish.
		c.Close()
		var lines []map[string]any
		for range 2 {
			lines = append(lines, h.access.next(t))
		}
		t.Logf("deny probe: %q %+v", b, h.p.Tunnels())
		if len(b) != 0 {
			return fmt.Errorf("stream still allowed")
		}
		for _, l := range lines {
			if l["direction"] != "inbound" {
				continue
			}
			if l["reason"] == ReasonRevoked {
				// Admitted just before the deny reached the cache, then
				// closed by the re-check: try again.
				return fmt.Errorf("probe stream admitted before the deny was seen (revoked)")
			}
			want(t, l, map[string]any{"reason": ReasonDenied, "tx_bytes": 0})
		}
		return nil
	})
	if ts := h.p.Tunnels(); ts.InboundTunnels < 1 {
		t.Fatalf("the tunnel should have survived the denied stream: %+v", ts)
	}
}

// TestTunnelStreamForAnotherService: a stream naming another service is
// closed without dialing the app (no pivoting through a tunnel).
func TestTunnelStreamForAnotherService(t *testing.T) {
	t.Parallel()
	h := startHarness(t, AccessLogOn, config.Public{}, withTunnels)
	tc := h.dialMux(t)
	var pool tunnel.Pool
	defer pool.Close()
	// The server refuses the stream before any application byte is sent.
	if _, err := pool.Adopt(context.Background(), "k", nil, tc, "db"); !errors.Is(err, tunnel.ErrDenied) {
		t.Fatalf("stream for another service: %v", err)
	}
	want(t, h.access.next(t), map[string]any{"direction": "inbound", "reason": ReasonDenied, "detail": "~db", "tx_bytes": 0})
	// The tunnel stays usable for our own service.
	c2, err := pool.Open(context.Background(), "k", nil, "web", nil)
	if err != nil {
		t.Fatal(err)
	}
	roundTrip(t, c2, "ok")
}

// TestTunnelsPerPeerLimit: a peer that opens more inbound tunnels than
// TunnelMaxPerPeer gets the extra ones closed; its first one keeps working.
func TestTunnelsPerPeerLimit(t *testing.T) {
	t.Parallel()
	h := startHarness(t, AccessLogOff, config.Public{}, withTunnels, func(o *Options) { o.TunnelMaxPerPeer = 1 })
	dial := func() *tls.Conn { return h.dialMux(t) }
	var pool tunnel.Pool
	defer pool.Close()
	first, err := pool.Adopt(context.Background(), "first", nil, dial(), "web")
	if err != nil {
		t.Fatal(err)
	}
	roundTrip(t, first, "one")
	testutil.EventuallyNil(t, func() error {
		if n := h.p.Tunnels().InboundTunnels; n != 1 {
			return fmt.Errorf("inbound tunnels %d", n)
		}
		return nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := pool.Adopt(ctx, "second", nil, dial(), "web"); err == nil || ctx.Err() != nil {
		t.Fatalf("second tunnel from the same peer: %v", err)
	}
	c, err := pool.Open(context.Background(), "first", nil, "web", nil)
	if err != nil {
		t.Fatal(err)
	}
	roundTrip(t, c, "still")
}

// TestTunnelBrokenFramingEndsTunnel: a peer that sends bytes that are not
// yamux frames on a strait-mux/2 connection loses the whole tunnel, and
// the app is never dialed.
func TestTunnelBrokenFramingEndsTunnel(t *testing.T) {
	t.Parallel()
	accepts := make(chan struct{}, 1)
	app := serveApp(t, func(net.Conn) { accepts <- struct{}{} })
	h := startHarness(t, AccessLogOff, config.Public{LocalServiceAddress: app}, withTunnels)
	tc := h.dialMux(t)
	defer tc.Close()
	tc.Write([]byte("GET / HTTP/1.1\r\nHost: web\r\n\r\n")) // not a yamux frame
	tc.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.Copy(io.Discard, tc); err != nil && errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatal("tunnel still open after a framing error")
	}
	testutil.EventuallyNil(t, func() error {
		if n := h.p.Tunnels().InboundTunnels; n != 0 {
			return fmt.Errorf("inbound tunnels %d", n)
		}
		return nil
	})
	select {
	case <-accepts:
		t.Fatal("app dialed for a broken tunnel")
	default:
	}
}

// dialMux dials the public listener as the strait peer "web" offering
// only strait-mux/2, and checks that the tunnel protocol was selected.
func (h *harness) dialMux(t *testing.T) *tls.Conn {
	t.Helper()
	tc, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", h.p.PublicAddr().String(), &tls.Config{
		Certificates: []tls.Certificate{h.agent.ClientCert("web")}, InsecureSkipVerify: true, NextProtos: []string{tlsutil.ALPNMux},
	})
	if err != nil {
		t.Fatal(err)
	}
	if got := tc.ConnectionState().NegotiatedProtocol; got != tlsutil.ALPNMux {
		t.Fatalf("negotiated %q", got)
	}
	return tc
}

// countWriter counts the lines written to it.
type countWriter struct{ n atomic.Int64 }

func (w *countWriter) Write(p []byte) (int, error) {
	w.n.Add(int64(bytes.Count(p, []byte{'\n'})))
	return len(p), nil
}

// TestHostileTunnelPeerBounded: an allowed peer that opens 2,000 streams
// the server refuses (another service, a bad header), each followed by
// 128 KiB that it never finishes, grows the server's heap by less than
// 64 MiB and makes it write fewer than 50 log and access-log lines; the
// tunnel still serves a good stream afterwards.
func TestHostileTunnelPeerBounded(t *testing.T) {
	var logged countWriter
	h := startHarness(t, AccessLogDeniedOnly, config.Public{}, withTunnels, func(o *Options) {
		o.Logger = hclog.New(&hclog.LoggerOptions{Output: &logged, Level: hclog.Info})
		o.AccessLogger = hclog.New(&hclog.LoggerOptions{Output: &logged})
	})
	heap := func() int64 {
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return int64(m.HeapInuse)
	}
	before, linesBefore := heap(), logged.n.Load()

	yc := yamux.DefaultConfig()
	yc.LogOutput = io.Discard
	yc.InitialStreamWindowSize = tunnel.InitialWindow // strait-mux/2's
	sess, err := yamux.Client(h.dialMux(t), yc, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close()
	good, _ := tunnel.AppendHeader(nil, "web")
	other, _ := tunnel.AppendHeader(nil, "db")
	payload := make([]byte, 128<<10)
	const streams = 2000
	var wg sync.WaitGroup
	sem := make(chan struct{}, 64)
	for i := range streams {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			st, err := sess.OpenStream(context.Background())
			if err != nil {
				t.Error(err)
				return
			}
			hdr := other
			if i%2 == 1 {
				hdr = []byte{9, 1, 'x'} // a bad header
			}
			st.Write(hdr)
			st.Write(payload) // fails once the server's reset is in; never closed
		})
	}
	wg.Wait()
	// Frames are handled in order: once a good stream answers, every
	// refused one before it has been handled.
	st, err := sess.OpenStream(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	st.Write(good)
	st.SetDeadline(time.Now().Add(10 * time.Second))
	if b := make([]byte, 1); func() error { _, err := io.ReadFull(st, b); return err }() != nil || b[0] != tunnel.StatusOK {
		t.Fatal("the tunnel did not serve a good stream after the refused ones")
	}
	roundTrip(t, st, "still here")

	grown := heap() - before
	lines := logged.n.Load() - linesBefore
	t.Logf("%d refused streams of 128 KiB: heap +%d KiB, %d log lines", streams, grown>>10, lines)
	if grown > 64<<20 {
		t.Errorf("heap grew by %d MiB", grown>>20)
	}
	if lines >= 50 {
		t.Errorf("%d log lines for %d refused streams", lines, streams)
	}
}
