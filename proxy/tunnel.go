package proxy

import (
	"context"

	"errors"
	"net"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/straitproxy/strait/metrics"
	"github.com/straitproxy/strait/tlsutil"
	"github.com/straitproxy/strait/tunnel"
)

// TunnelStats is /stats' view of strait-mux tunnels.
type TunnelStats struct {
	Enabled bool `json:"enabled"`
	// Inbound: tunnels accepted on the public listener and their live
	// streams. Outbound: the upstreams' pooled tunnels and streams.
	InboundTunnels  int64 `json:"inbound_tunnels"`
	InboundStreams  int64 `json:"inbound_streams"`
	OutboundTunnels int64 `json:"outbound_tunnels"`
	OutboundStreams int64 `json:"outbound_streams"`
}

// Tunnels reports tunnel counts.
func (p *Proxy) Tunnels() TunnelStats {
	s := TunnelStats{Enabled: p.pool != nil, InboundTunnels: p.inTunnels.Load(), InboundStreams: p.inStreams.Load()}
	if p.pool != nil {
		s.OutboundTunnels, s.OutboundStreams = p.pool.Stats()
	}
	return s
}

// tunnelViolation is the pool's OnViolation: a server broke the protocol
// on one of our tunnels, which the pool has closed.
func (p *Proxy) tunnelViolation(key string, err error) {
	p.log.Warn("upstream tunnel closed: the server broke the tunnel protocol", "endpoint", key, "error", err)
	p.metrics.IncrCounter(metrics.UpstreamTunnelViolation, 1, []metrics.Label{{Name: "reason", Value: "server_stream"}})
}

// serveTunnel runs an inbound tunnel (the handshake selected ALPNMux)
// until it ends: every stream takes the same admission path as a classic
// inbound connection (serveInbound). When the listener starts draining,
// the tunnel refuses new streams and ends once its live ones are done.
func (p *Proxy) serveTunnel(ctx context.Context, raw net.Conn, tc *tlsutil.Conn, pl *listener) {
	peer := peerID(tc.Conn)
	remote := addrString(raw.RemoteAddr())
	dst := metrics.Label{Name: "dst", Value: p.service}
	if !p.inTunnelsByPeer.acquire(peer, p.opts.TunnelMaxPerPeer) {
		rec := &accessRecord{limitKey: remoteIP(raw)}
		if ok, n := p.lineAllowed(rec, "max_tunnels"); ok {
			p.log.Warn("inbound tunnel refused: too many tunnels from this peer", "source", peer, "remote", remote, "suppressed_before", n)
		}
		p.metrics.IncrCounter(metrics.InboundTunnelRefused, 1, []metrics.Label{dst, {Name: "reason", Value: "max_tunnels"}})
		tc.Close()
		return
	}
	defer p.inTunnelsByPeer.release(peer)
	p.inTunnels.Add(1)
	defer p.inTunnels.Add(-1)
	// The tunnel drains when the listener does, or when strait stops.
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(pl.drainCtx, cancel)
	defer stop()

	var live sync.WaitGroup // streams handed to the copy loop
	lim := tunnel.Limits{MaxStreams: p.opts.TunnelMaxStreams, StreamRate: rate.Limit(p.opts.TunnelStreamRate),
		StreamBurst: p.opts.TunnelStreamBurst, Budget: p.opts.TunnelBudget}
	limitKey := "tunnel " + remote
	err := tunnel.Serve(sctx, tc, lim, func(c *tunnel.Conn, svc string) {
		// Serve runs this before it returns, so Add comes before Wait.
		live.Add(1)
		p.inStreams.Add(1)
		release := p.admitStream(c, func() { p.inStreams.Add(-1); live.Done() })
		if release == nil {
			return
		}
		rec := &accessRecord{dir: "inbound", dest: p.service, remote: remote, start: time.Now(), source: peer, limitKey: limitKey}
		p.serveInbound(ctx, inbound{raw: c, conn: c, tc: tc.Conn, stream: c, service: svc, rec: rec}, pl, release)
	}, func(err error) {
		reason := "bad_header"
		switch {
		case errors.Is(err, tunnel.ErrStreamRate):
			reason = "stream_rate"
		case errors.Is(err, tunnel.ErrTooManyStreams):
			reason = "max_streams"
		}
		p.metrics.IncrCounter(metrics.InboundTunnelRefused, 1, []metrics.Label{dst, {Name: "reason", Value: reason}})
		if ok, n := p.lines.allow(limitKey + "|" + reason); ok {
			p.log.Warn("inbound tunnel stream refused", "source", peer, "remote", remote, "reason", reason, "error", err, "suppressed_before", n)
		} else {
			p.metrics.IncrCounter(metrics.LogSuppressed, 1, []metrics.Label{{Name: "reason", Value: reason}})
		}
	})
	switch {
	case tunnel.IsFramingError(err):
		p.log.Warn("inbound tunnel closed: the peer broke the framing", "source", peer, "remote", remote, "error", err)
		p.metrics.IncrCounter(metrics.InboundTunnelRefused, 1, []metrics.Label{dst, {Name: "reason", Value: "framing"}})
	case err != nil && !isClosed(err) && !errors.Is(err, net.ErrClosed):
		p.log.Info("inbound tunnel ended", "source", peer, "remote", remote, "error", err)
	}
	if n := p.lines.takePrefix(limitKey + "|"); n > 0 {
		p.log.Warn("inbound tunnel ended; refusal lines suppressed for it", "source", peer, "remote", remote, "suppressed", n)
	}
	tc.Close()
	live.Wait()
}

// peerCounts counts live inbound tunnels per peer identity.
type peerCounts struct {
	mu sync.Mutex
	n  map[string]int
}

// acquire takes a place for peer if it has fewer than max (<= 0 means
// tunnel.DefaultMaxTunnels) tunnels.
func (c *peerCounts) acquire(peer string, max int) bool {
	if max <= 0 {
		max = tunnel.DefaultMaxTunnels
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.n[peer] >= max {
		return false
	}
	if c.n == nil {
		c.n = make(map[string]int)
	}
	c.n[peer]++
	return true
}

func (c *peerCounts) release(peer string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.n[peer]--; c.n[peer] <= 0 {
		delete(c.n, peer)
	}
}
