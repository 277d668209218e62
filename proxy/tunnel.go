package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"strings"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/straitproxy/strait/metrics"
	"github.com/straitproxy/strait/tunnel"
)

// TunnelStats is /stats' view of strait-mux/1 tunnels.
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

// serveTunnel runs an inbound tunnel (the handshake selected ALPNMux)
// until it ends: every stream is checked and proxied like a classic
// inbound connection. When the listener starts draining the tunnel takes no
// new streams and ends once its live ones are done.
func (p *Proxy) serveTunnel(ctx context.Context, raw net.Conn, tc *tls.Conn, pl *publicListener) {
	peer := peerID(tc)
	dst := metrics.Label{Name: "dst", Value: p.service}
	if !p.inTunnelsByPeer.acquire(peer, p.opts.TunnelMaxPerPeer) {
		p.log.Warn("inbound tunnel refused: too many tunnels from this peer", "source", peer, "remote", addrString(raw.RemoteAddr()))
		p.metrics.IncrCounter(metrics.InboundTunnelRefused, 1, []metrics.Label{dst, {Name: "reason", Value: "max_tunnels"}})
		tc.Close()
		return
	}
	defer p.inTunnelsByPeer.release(peer)
	p.inTunnels.Add(1)
	defer p.inTunnels.Add(-1)
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(ctx, cancel)
	defer stop()
	go func() {
		select {
		case <-pl.srv.closing:
			cancel()
		case <-sctx.Done():
		}
	}()
	var live sync.WaitGroup
	lim := tunnel.Limits{MaxStreams: p.opts.TunnelMaxStreams, StreamRate: rate.Limit(p.opts.TunnelStreamRate), StreamBurst: p.opts.TunnelStreamBurst}
	// Refusals by a limit are logged once per tunnel and counted always.
	var warnedMu sync.Mutex
	warned := map[string]bool{}
	err := tunnel.Serve(sctx, tc, lim, func(c *tunnel.Conn, svc string) {
		live.Add(1)
		p.inStreams.Add(1)
		p.handleStream(ctx, raw, tc, c, svc, pl, func() { p.inStreams.Add(-1); live.Done() })
	}, func(err error) {
		reason := "bad_header"
		switch {
		case errors.Is(err, tunnel.ErrStreamRate):
			reason = "stream_rate"
		case errors.Is(err, tunnel.ErrTooManyStreams):
			reason = "max_streams"
		}
		p.metrics.IncrCounter(metrics.InboundTunnelRefused, 1, []metrics.Label{dst, {Name: "reason", Value: reason}})
		warnedMu.Lock()
		first := !warned[reason]
		warned[reason] = true
		warnedMu.Unlock()
		if reason == "bad_header" || first {
			p.log.Warn("inbound tunnel stream refused", "source", peer, "remote", addrString(raw.RemoteAddr()), "error", err)
		}
	})
	switch {
	case tunnel.IsFramingError(err):
		p.log.Warn("inbound tunnel closed: the peer broke the framing", "source", peer, "remote", addrString(raw.RemoteAddr()), "error", err)
		p.metrics.IncrCounter(metrics.InboundTunnelRefused, 1, []metrics.Label{dst, {Name: "reason", Value: "framing"}})
	case err != nil && !isClosed(err) && !errors.Is(err, net.ErrClosed):
		p.log.Info("inbound tunnel ended", "source", peer, "remote", addrString(raw.RemoteAddr()), "error", err)
	}
	tc.Close()
	live.Wait()
}

// handleStream is handleInbound for one stream of a tunnel: only our own
// service, authorized now with the tunnel's verified peer, then the app.
func (p *Proxy) handleStream(ctx context.Context, raw net.Conn, tc *tls.Conn, c *tunnel.Conn, svc string, pl *publicListener, release func()) {
	if release = p.admitStream(c, release); release == nil {
		return
	}
	handedOff := false
	defer func() {
		if !handedOff {
			c.Close()
			release()
		}
	}()
	cfg := pl.cfg.Load()
	rec := &accessRecord{dir: "inbound", dest: p.service, endpoint: cfg.LocalServiceAddress,
		remote: addrString(raw.RemoteAddr()), start: time.Now(), source: peerID(tc)}
	dst := metrics.Label{Name: "dst", Value: p.service}
	if svc != p.service {
		rec.reason, rec.detail = ReasonDenied, "tunnel stream for service "+svc+", not "+p.service
		p.log.Warn("tunnel stream for another service refused", "source", rec.source, "service", svc)
		p.metrics.IncrCounter(metrics.InboundDenied, 1, []metrics.Label{{Name: "src", Value: rec.source}, dst})
		p.logAccess(rec)
		return
	}
	id, serial, err := p.src.PeerOf(tc.ConnectionState())
	if err == nil {
		err = p.authorize(ctx, id, serial)
	}
	if err != nil {
		var denied *DeniedError
		if errors.As(err, &denied) {
			rec.reason, rec.detail = ReasonDenied, denied.Reason
			if !p.accessLogged(ReasonDenied) {
				p.log.Info("inbound connection denied", "source", denied.Source.String(), "reason", denied.Reason, "remote", rec.remote, "tunnel", true)
			}
			p.metrics.IncrCounter(metrics.InboundDenied, 1, []metrics.Label{{Name: "src", Value: denied.Source.Service}, dst})
		} else {
			reason, label := handshakeFailure(err)
			rec.reason, rec.detail = reason, err.Error()
			p.metrics.IncrCounter(metrics.InboundHandshakeFailed, 1, []metrics.Label{dst, {Name: "reason", Value: label}})
		}
		p.logAccess(rec)
		return
	}
	network, addr := "tcp", cfg.LocalServiceAddress
	if strings.HasPrefix(addr, "unix:") {
		network, addr = "unix", strings.TrimPrefix(addr, "unix:")
	}
	d := net.Dialer{Timeout: cfg.LocalConnectTimeoutOrDefault()}
	app, err := d.DialContext(ctx, network, addr)
	if err != nil {
		p.log.Warn("dialing local app failed", "app", addr, "error", err)
		rec.reason, rec.detail = appDialFailure(err), err.Error()
		p.metrics.IncrCounter(metrics.InboundAppDialFailed, 1, []metrics.Label{dst, {Name: "reason", Value: rec.reason}})
		p.logAccess(rec)
		return
	}
	handedOff = true
	p.proxy(c, c, app, pl.stats, rec, release, nil)
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
