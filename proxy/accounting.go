package proxy

import (
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/straitproxy/strait/metrics"
)

// DefaultFlushInterval is how often live connections' bytes and the gauges
// are reported (Options.FlushInterval).
const DefaultFlushInterval = 5 * time.Second

// liveConn is a proxied connection's byte counts: live ones from the copy
// loop and what has been reported of them. The flush and the close take
// the difference under mu, so nothing is counted twice.
type liveConn struct {
	// peer is the connection dialed for it (the app, or the upstream
	// endpoint): a drain that ends its grace closes it too, since after a
	// half-close the only goroutine left may be reading it.
	peer   net.Conn
	ctr    Counters
	mu     sync.Mutex
	rx, tx int64
}

// take marks rx and tx (cumulative) as reported and returns what was not.
func (lc *liveConn) take(rx, tx int64) (drx, dtx int64) {
	lc.mu.Lock()
	defer lc.mu.Unlock()
	drx, dtx = max(rx-lc.rx, 0), max(tx-lc.tx, 0)
	lc.rx, lc.tx = max(rx, lc.rx), max(tx, lc.tx)
	return drx, dtx
}

// account reports bytes: one counter increment per direction.
func (l *listener) account(m *metrics.Metrics, rx, tx int64) {
	if rx > 0 {
		l.rx.Add(rx)
		m.IncrCounter(l.rxKey, float32(rx), l.labels)
	}
	if tx > 0 {
		l.tx.Add(tx)
		m.IncrCounter(l.txKey, float32(tx), l.labels)
	}
}

func (l *listener) opened(m *metrics.Metrics) {
	l.proxied.Add(1)
	l.gauge.add(m, 1)
}

func (l *listener) closed(m *metrics.Metrics, start time.Time) {
	l.gauge.add(m, -1)
	m.MeasureSince(l.durKey, start, l.labels)
}

// connGauge is the built-in proxy's *.conns gauge: open proxied
// connections, per label set (so a listener rebound while the old one
// drains, or two upstreams of one service in two datacenters, count
// together instead of overwriting each other).
type connGauge struct {
	key    []string
	labels []metrics.Label
	n      atomic.Int64
}

func (g *connGauge) add(m *metrics.Metrics, d int64) {
	m.SetGauge(g.key, float32(g.n.Add(d)), g.labels)
}

func (g *connGauge) emit(m *metrics.Metrics) { m.SetGauge(g.key, float32(g.n.Load()), g.labels) }

func labelKey(key []string, labels []metrics.Label) string {
	s := ""
	for _, k := range key {
		s += k + "."
	}
	for _, l := range labels {
		s += "|" + l.Name + "=" + l.Value
	}
	return s
}

// gaugeFor returns the shared gauge of a label set. p.mu is held.
func (p *Proxy) gaugeFor(key []string, labels []metrics.Label) *connGauge {
	k := labelKey(key, labels)
	g := p.gauges[k]
	if g == nil {
		g = &connGauge{key: key, labels: labels}
		p.gauges[k] = g
	}
	return g
}

// register sets up a listener's accounting and lists it for the flush
// and /stats. p.mu is held.
func (p *Proxy) register(l *listener, labels []metrics.Label) {
	l.labels = labels
	switch l.kind {
	case kindInbound:
		l.rxKey, l.txKey, l.durKey = metrics.InboundRxBytes, metrics.InboundTxBytes, metrics.InboundDuration
		l.gauge = p.gaugeFor(metrics.InboundConns, labels)
	case kindOutbound:
		l.rxKey, l.txKey, l.durKey = metrics.OutboundRxBytes, metrics.OutboundTxBytes, metrics.OutboundDuration
		l.gauge = p.gaugeFor(metrics.OutboundConns, labels)
	default:
		l.rxKey, l.txKey, l.durKey = metrics.UpstreamRxBytes, metrics.UpstreamTxBytes, metrics.UpstreamDuration
		l.gauge = p.gaugeFor(metrics.UpstreamConns, labels)
	}
	p.declare(l)
	p.listeners[l] = struct{}{}
}

// declare makes a listener's series whose labels are known now exist at
// zero (Prometheus only), so that alerts see them before the first event:
// its byte counters and durations, its failure counters with every reason
// of their fixed set, and its conns gauge. Series labelled with a peer's
// service (inbound.denied) cannot be known in advance and appear on first
// use; the endpoint and leaf gauges come with the flush that precedes
// readiness.
func (p *Proxy) declare(l *listener) {
	m := p.metrics
	for _, k := range [][]string{l.rxKey, l.txKey, l.durKey} {
		m.Declare(k, l.labels)
	}
	withReason := func(key []string, reasons []string) {
		for _, r := range reasons {
			m.Declare(key, append(l.labels[:len(l.labels):len(l.labels)], metrics.Label{Name: "reason", Value: r}))
		}
	}
	switch l.kind {
	case kindOutbound:
		withReason(metrics.OutboundRefused, metrics.OutboundRefusedReasons)
	case kindInbound:
		withReason(metrics.InboundHandshakeFailed, metrics.HandshakeFailedReasons)
		withReason(metrics.InboundAppDialFailed, metrics.AppDialFailedReasons)
		withReason(metrics.InboundConnsRefused, metrics.ConnsRefusedReasons)
		if p.pool != nil {
			withReason(metrics.InboundTunnelRefused, metrics.TunnelRefusedReasons)
		}
	default:
		m.Declare(metrics.UpstreamDialFailed, l.labels)
		m.Declare(metrics.UpstreamDialRetries, l.labels)
	}
	l.gauge.emit(m)
}

// targetLabels are an upstream listener's labels plus target.
func targetLabels(labels []metrics.Label, target string) []metrics.Label {
	return append(labels[:len(labels):len(labels)], metrics.Label{Name: "target", Value: target})
}

// forget drops a drained listener's accounting.
func (p *Proxy) forget(l *listener) {
	p.mu.Lock()
	delete(p.listeners, l)
	p.mu.Unlock()
}

// flushLoop is the shared flush: one ticker for the whole proxy, never one
// per connection.
func (p *Proxy) flushLoop() {
	d := p.opts.FlushInterval
	if d <= 0 {
		d = DefaultFlushInterval
	}
	t := time.NewTicker(d)
	defer t.Stop()
	p.flush()
	for {
		select {
		case <-p.ctx.Done():
			return
		case <-t.C:
			p.flush()
		}
	}
}

// flush reports the bytes live connections moved since the last report
// (one increment per listener and direction), re-emits the gauges, and
// emits the runtime metrics.
func (p *Proxy) flush() {
	p.flushMu.Lock()
	defer p.flushMu.Unlock()
	p.mu.Lock()
	ls := make([]*listener, 0, len(p.listeners))
	// Only the gauges of listeners still there (draining ones included):
	// a removed upstream's series stops being emitted and expires.
	gauges := map[*connGauge]struct{}{}
	for l := range p.listeners {
		ls = append(ls, l)
		gauges[l.gauge] = struct{}{}
	}
	src := p.src
	var router Outbound
	if p.routerRunning {
		router = p.router
	}
	p.mu.Unlock()

	var buf []*liveConn
	for _, l := range ls {
		buf = l.live(buf[:0])
		var rx, tx int64
		for _, lc := range buf {
			r, t := lc.take(lc.ctr.AToB.Load(), lc.ctr.BToA.Load())
			rx += r
			tx += t
		}
		l.account(p.metrics, rx, tx)
		if l.up != nil && !l.draining.Load() {
			healthy, ejected := 0, 0
			for _, e := range l.up.Endpoints() {
				healthy++
				if !e.EjectedUntil.IsZero() {
					ejected++
				}
			}
			p.metrics.SetGauge(metrics.UpstreamHealthyEndpoints, float32(healthy), l.labels)
			p.metrics.SetGauge(metrics.UpstreamEjectedEndpoints, float32(ejected), l.labels)
			if ch := l.up.Chain(); ch != nil {
				for _, t := range ch.Targets {
					tl := targetLabels(l.labels, t.ID)
					p.metrics.SetGauge(metrics.UpstreamTargetHealthyEndpoints, float32(len(t.Endpoints)), tl)
					active := float32(0)
					if t.Active {
						active = 1
					}
					p.metrics.SetGauge(metrics.UpstreamTargetActive, active, tl)
				}
			}
		}
	}
	for g := range gauges {
		g.emit(p.metrics)
	}
	if router != nil {
		ups, _, routes := router.Counts()
		src := []metrics.Label{{Name: "src", Value: p.service}}
		p.metrics.SetGauge(metrics.OutboundImplicitUpstreams, float32(ups), src)
		p.metrics.SetGauge(metrics.OutboundRoutes, float32(routes), src)
	}
	if src != nil {
		if b := src.Bundle(); b != nil {
			p.metrics.SetGauge(metrics.LeafExpiry, float32(time.Until(b.NotAfter).Seconds()),
				[]metrics.Label{{Name: "service", Value: p.service}})
		}
	}
	p.metrics.EmitRuntimeStats()
}
