package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"time"

	"github.com/straitproxy/strait/config"
	"github.com/straitproxy/strait/metrics"
	"github.com/straitproxy/strait/tproxy"
	"github.com/straitproxy/strait/upstream"
)

// Outbound is what the proxy needs of a transparent proxy's router
// (*tproxy.Outbound): the implicit upstreams and the table of their
// addresses, and the mesh entry's MeshDestinationsOnly.
type Outbound interface {
	Run(ctx context.Context)
	Lookup(ip netip.Addr) (tproxy.Route, bool)
	MeshDestinationsOnly() bool
	// Counts reports the implicit upstreams followed, those left out by
	// a limit, and the addresses routed.
	Counts() (upstreams, dropped, routes int)
	// Routes lists the routing table.
	Routes() []tproxy.RouteStatus
	// Ready is closed once the table has its first routes (see
	// tproxy.Outbound.Ready).
	Ready() <-chan struct{}
}

// OutboundStatus is a transparent proxy's outbound side, for the admin
// listener's /outbound.
type OutboundStatus struct {
	// Listeners are the bound outbound listener addresses.
	Listeners            []string `json:"listeners"`
	MeshDestinationsOnly bool     `json:"mesh_destinations_only"`
	// ImplicitUpstreams counts the services followed; LeftOut those the
	// intentions allow beyond the limit.
	ImplicitUpstreams int `json:"implicit_upstreams"`
	LeftOut           int `json:"left_out,omitempty"`
	// Routes are the destination addresses routed into the mesh.
	Routes []tproxy.RouteStatus `json:"routes"`
}

// Outbound reports the outbound side, or false when there is none (not a
// transparent proxy, or not started).
func (p *Proxy) Outbound() (OutboundStatus, bool) {
	p.mu.Lock()
	router, running := p.router, p.routerRunning
	var addrs []string
	for _, l := range p.outbound {
		addrs = append(addrs, l.addr)
	}
	p.mu.Unlock()
	if router == nil || !running {
		return OutboundStatus{}, false
	}
	ups, left, _ := router.Counts()
	routes := router.Routes()
	if routes == nil {
		routes = []tproxy.RouteStatus{}
	}
	return OutboundStatus{Listeners: addrs, MeshDestinationsOnly: router.MeshDestinationsOnly(),
		ImplicitUpstreams: ups, LeftOut: left, Routes: routes}, true
}

// DefaultMaxOutboundConnections bounds the open connections of the
// outbound listener when Options.MaxOutboundConnections is zero: each
// costs two descriptors, two goroutines and the copy buffers.
const DefaultMaxOutboundConnections = 16384

// passthroughConnectTimeout bounds dialing a destination outside the
// mesh (Envoy's original-destination cluster as Consul configures it).
const passthroughConnectTimeout = 5 * time.Second

// Access log reasons of the outbound listener.
const (
	// ReasonMeshDestinationsOnly: no mesh destination matched and the
	// mesh entry sets TransparentProxy.MeshDestinationsOnly.
	ReasonMeshDestinationsOnly = "mesh_destinations_only"
	// ReasonOutboundLoop: the connection was addressed to the outbound
	// listener itself (not redirected), or its original destination could
	// not be read.
	ReasonOutboundLoop = "loop"
	// ReasonMaxOutbound: refused by the outbound connection limit
	// (counted, never logged per connection).
	ReasonMaxOutbound = "max_outbound_connections"
)

// Routes of metrics.OutboundConnections.
const (
	routeVirtual     = "virtual"
	routeDirect      = "direct"
	routePassthrough = "passthrough"
)

// applyOutbound binds, moves or removes the outbound listeners to match
// c, and starts the router with the first one. p.mu is held.
func (p *Proxy) applyOutbound(c *config.Outbound) error {
	if c == nil {
		for _, l := range p.outbound {
			p.log.Info("outbound listener removed", "addr", l.addr)
			p.drainLater(l)
		}
		p.outbound, p.outboundCfg = nil, nil
		return nil
	}
	if p.outboundCfg != nil && *p.outboundCfg == *c && len(p.outbound) > 0 {
		return nil
	}
	if p.router == nil {
		return errors.New("outbound listener: transparent proxy registration, but strait was built without an outbound router")
	}
	for _, l := range p.outbound {
		p.log.Info("outbound listener port changed; rebinding", "old", l.addr)
		p.drainLater(l)
	}
	p.outbound = nil
	cfg := *c
	p.outboundCfg = &cfg
	var errs []error
	for i, addr := range c.Addrs() {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			if i > 0 && isNoIPv6(err) {
				p.log.Info("no IPv6 loopback; outbound listener on IPv4 only", "addr", addr, "error", err)
				continue
			}
			errs = append(errs, fmt.Errorf("outbound listener %s: %w", addr, err))
			continue
		}
		ol := newListener(kindOutbound, "outbound", ln, p.log)
		ol.admit = p.admitOutbound
		ol.handle = func(ctx context.Context, conn net.Conn, release func()) {
			p.handleOutbound(ctx, conn, ol, release)
		}
		p.register(ol, []metrics.Label{{Name: "src", Value: p.service}})
		ol.start()
		p.outbound = append(p.outbound, ol)
		p.log.Info("outbound listener bound", "addr", ln.Addr().String())
	}
	if !p.routerRunning {
		p.routerRunning = true
		p.bg.Go(func() { p.router.Run(p.ctx) })
	}
	return errors.Join(errs...)
}

// isNoIPv6 recognises a host without IPv6 (or without ::1).
func isNoIPv6(err error) bool {
	return errors.Is(err, syscall.EADDRNOTAVAIL) || errors.Is(err, syscall.EAFNOSUPPORT) || errors.Is(err, syscall.EPROTONOSUPPORT)
}

// admitOutbound is the outbound listeners' accept hook: a connection slot
// for a just-accepted connection, or the refusal counted.
func (p *Proxy) admitOutbound() bool {
	if p.outAdmit.acquireConn() == "" {
		return true
	}
	p.metrics.IncrCounter(metrics.OutboundRefused, 1, []metrics.Label{{Name: "src", Value: p.service}, {Name: "reason", Value: ReasonMaxOutbound}})
	return false
}

// handleOutbound routes one connection redirected to the outbound
// listener by its original destination: into the mesh when the IP is an
// upstream's (a virtual IP through its discovery chain, an instance
// dialed directly at its own address), else to the original destination
// unproxied, or nowhere when the mesh entry says MeshDestinationsOnly.
func (p *Proxy) handleOutbound(ctx context.Context, conn net.Conn, ol *listener, release func()) {
	release = p.releasingOutbound(release)
	rec := &accessRecord{dir: "outbound", remote: addrString(conn.RemoteAddr()), start: time.Now(), limitKey: remoteIP(conn)}
	if b := p.src.Bundle(); b != nil {
		rec.source = b.Identity.String()
	}
	dst, err := p.originalDst(conn)
	local, _ := netip.ParseAddrPort(conn.LocalAddr().String())
	if err != nil || dst == local || (dst.Addr().IsLoopback() && int(dst.Port()) == p.outboundPort()) {
		detail := "addressed to the outbound listener itself"
		if err != nil {
			detail = err.Error()
		}
		p.refuseOutbound(conn, rec, ReasonOutboundLoop, detail, release)
		return
	}
	rec.endpoint = dst.String()
	// Right after start the first routes may be on their way: a virtual
	// IP must not be passed through for want of one.
	awaitAnswer(ctx, p.router.Ready(), config.DefaultConnectTimeout)
	if r, ok := p.router.Lookup(dst.Addr()); ok {
		p.outboundMesh(ctx, conn, ol, rec, r, dst, release)
		return
	}
	if p.router.MeshDestinationsOnly() {
		p.refuseOutbound(conn, rec, ReasonMeshDestinationsOnly, "no mesh destination has address "+dst.Addr().String(), release)
		return
	}
	rec.dest = routePassthrough
	labels := []metrics.Label{{Name: "src", Value: p.service}, {Name: "dst", Value: routePassthrough}, {Name: "route", Value: routePassthrough}}
	d := net.Dialer{Timeout: passthroughConnectTimeout}
	out, err := d.DialContext(ctx, "tcp", dst.String())
	if err != nil {
		conn.Close()
		release()
		rec.reason, rec.detail = ReasonUpstreamDialFailed, err.Error()
		if ctx.Err() != nil {
			rec.reason = ReasonShutdown
		} else {
			p.metrics.IncrCounter(metrics.OutboundDialFailed, 1, labels)
		}
		p.logAccess(rec)
		return
	}
	p.metrics.IncrCounter(metrics.OutboundConnections, 1, labels)
	p.proxy(conn, conn, out, ol, rec, release, nil, nil)
}

// outboundMesh dials r's upstream for conn, as an upstream listener
// does, and proxies.
func (p *Proxy) outboundMesh(ctx context.Context, conn net.Conn, ol *listener, rec *accessRecord, r tproxy.Route, dst netip.AddrPort, release func()) {
	rec.dest = r.Upstream
	route := routeVirtual
	opts := upstream.DialOptions{Source: conn.RemoteAddr()}
	if r.Direct {
		route, opts.Direct = routeDirect, dst
	}
	labels := []metrics.Label{{Name: "src", Value: p.service}, {Name: "dst", Value: r.Upstream}, {Name: "route", Value: route}}
	// An upstream that appeared a moment ago may still be waiting for
	// its first endpoint answer.
	awaitAnswer(ctx, r.Dialer.Ready(), config.DefaultConnectTimeout)
	tc, ep, releaseEndpoint, err := r.Dialer.DialConn(ctx, opts)
	rec.attempts = int32(ep.Attempts)
	if err != nil {
		conn.Close()
		release()
		rec.reason, rec.detail = ReasonUpstreamDialFailed, err.Error()
		if ctx.Err() != nil {
			rec.reason = ReasonShutdown
		} else {
			p.log.Warn("outbound dial failed", "upstream", r.Upstream, "destination", dst.String(), "error", err)
			p.metrics.IncrCounter(metrics.OutboundDialFailed, 1, labels)
		}
		p.logAccess(rec)
		return
	}
	rec.endpoint, rec.target = ep.Addr, ep.Target
	p.metrics.IncrCounter(metrics.OutboundConnections, 1, labels)
	p.proxy(conn, conn, tc, ol, rec, release, releaseEndpoint, nil)
}

// refuseOutbound closes conn at once (a reset: the application sees the
// destination refuse), counts and logs why.
func (p *Proxy) refuseOutbound(conn net.Conn, rec *accessRecord, reason, detail string, release func()) {
	abortive(conn)
	conn.Close()
	release()
	p.metrics.IncrCounter(metrics.OutboundRefused, 1, []metrics.Label{{Name: "src", Value: p.service}, {Name: "reason", Value: reason}})
	rec.reason, rec.detail = reason, detail
	if ok, n := p.lineAllowed(rec, "outbound_"+reason); ok {
		p.log.Debug("outbound connection refused", "reason", reason, "destination", rec.endpoint, "remote", rec.remote, "suppressed_before", n)
	}
	p.logAccess(rec)
}

// releasingOutbound returns release extended by giving the outbound
// connection slot back, at most once.
func (p *Proxy) releasingOutbound(release func()) func() {
	var once sync.Once
	return func() {
		once.Do(func() {
			p.outAdmit.releaseConn()
			release()
		})
	}
}

// outboundPort is the bound outbound port, 0 when none.
func (p *Proxy) outboundPort() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.outboundCfg == nil {
		return 0
	}
	if p.outboundCfg.Port == 0 {
		return config.DefaultOutboundPort
	}
	return p.outboundCfg.Port
}
