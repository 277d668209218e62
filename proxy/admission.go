package proxy

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/straitproxy/strait/metrics"
	"github.com/straitproxy/strait/tunnel"
)

// DefaultMaxHandshakes bounds the inbound TLS handshakes in progress on the
// public listener when Options.MaxHandshakes is zero. A handshake held open
// by a silent or slow peer costs a goroutine, a descriptor and up to one
// TLS record of buffer (~20-50 KB at worst) for up to the handshake
// timeout: 1,024 keeps a flood under ~50 MB and 1,024 descriptors, far
// above what legitimate peers have in flight (a handshake takes a few
// milliseconds of CPU, and strait peers share tunnels).
const DefaultMaxHandshakes = 1024

// Reasons of metrics.InboundConnsRefused.
const (
	refusedMaxInbound    = "max_inbound_connections"
	refusedMaxHandshakes = "max_handshakes"
)

// admission is the one place every inbound connection of the public
// listener passes through. A connection takes a handshake slot when it is
// accepted, before its TLS handshake starts; an authorized classic
// connection turns it into a connection slot, a tunnel gives it back (its
// streams take connection slots of their own). Beyond the limits a new
// connection or stream is refused at once.
//
//   - maxConns (Consul's max_inbound_connections; 0 means no limit) bounds
//     connection slots plus handshake slots;
//   - maxHandshakes bounds handshake slots, limit or not.
//
// A lowered maxConns closes nothing: new connections are refused until
// enough of the live ones have finished.
type admission struct {
	mu            sync.Mutex
	maxConns      int
	maxHandshakes int
	handshakes    int
	conns         int
}

func newAdmission(maxHandshakes int) *admission {
	if maxHandshakes <= 0 {
		maxHandshakes = DefaultMaxHandshakes
	}
	return &admission{maxHandshakes: maxHandshakes}
}

// setMaxConns changes the connection limit (0: none) and reports whether
// it changed.
func (a *admission) setMaxConns(n int) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	changed := a.maxConns != n
	a.maxConns = n
	return changed
}

// acquireHandshake takes a handshake slot, or returns the reason it cannot.
func (a *admission) acquireHandshake() (refused string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	switch {
	case a.maxConns > 0 && a.conns+a.handshakes >= a.maxConns:
		return refusedMaxInbound
	case a.handshakes >= a.maxHandshakes:
		return refusedMaxHandshakes
	}
	a.handshakes++
	return ""
}

// releaseHandshake gives a handshake slot back: the handshake failed, or
// the connection is a tunnel.
func (a *admission) releaseHandshake() {
	a.mu.Lock()
	a.handshakes--
	a.mu.Unlock()
}

// promote turns a handshake slot into a connection slot: always possible,
// as both count towards maxConns.
func (a *admission) promote() {
	a.mu.Lock()
	a.handshakes--
	a.conns++
	a.mu.Unlock()
}

// acquireConn takes a connection slot for a tunnel stream, or returns the
// reason it cannot.
func (a *admission) acquireConn() (refused string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.maxConns > 0 && a.conns+a.handshakes >= a.maxConns {
		return refusedMaxInbound
	}
	a.conns++
	return ""
}

func (a *admission) releaseConn() {
	a.mu.Lock()
	a.conns--
	a.mu.Unlock()
}

// counts returns the slots in use.
func (a *admission) counts() (handshakes, conns int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.handshakes, a.conns
}

// admitHandshake is the public listener's accept hook: it takes a
// handshake slot for a just-accepted connection or counts the refusal.
func (p *Proxy) admitHandshake() bool {
	reason := p.admit.acquireHandshake()
	if reason == "" {
		return true
	}
	p.refusedByLimit(reason, false)
	return false
}

// admitStream takes a connection slot for a tunnel stream. It returns the
// stream's release extended by the slot's; or, refused, it refuses c (the
// client may take the connection elsewhere), calls release, counts the
// refusal and returns nil. serveTunnel calls it first.
func (p *Proxy) admitStream(c *tunnel.Conn, release func()) func() {
	if reason := p.admit.acquireConn(); reason != "" {
		c.Refuse(tunnel.StatusBusy)
		release()
		p.refusedByLimit(reason, true)
		return nil
	}
	return p.releasingConn(release)
}

// releasingConn returns release extended by giving a connection slot back,
// at most once.
func (p *Proxy) releasingConn(release func()) func() {
	var once sync.Once
	return func() {
		once.Do(func() {
			p.admit.releaseConn()
			release()
		})
	}
}

// refusalLogEvery spaces the warnings about refused connections; every
// refusal is counted.
const refusalLogEvery = 10 * time.Second

// refusedByLimit counts a connection or stream refused by admission.
func (p *Proxy) refusedByLimit(reason string, stream bool) {
	p.metrics.IncrCounter(metrics.InboundConnsRefused, 1, []metrics.Label{{Name: "dst", Value: p.service}, {Name: "reason", Value: reason}})
	n := p.refusedSince.Add(1)
	now := time.Now().UnixNano()
	last := p.refusedLogged.Load()
	if now-last < int64(refusalLogEvery) || !p.refusedLogged.CompareAndSwap(last, now) {
		return
	}
	p.refusedSince.Add(-n)
	hs, conns := p.admit.counts()
	p.log.Warn("refusing inbound connections: limit reached", "reason", reason, "refused", n, "tunnel_stream", stream,
		"handshakes", hs, "connections", conns, "max_inbound_connections", p.admit.maxConnsNow(), "max_handshakes", p.admit.maxHandshakes)
}

func (a *admission) maxConnsNow() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.maxConns
}

// refusalCounters are the Proxy's state for refused's log spacing.
type refusalCounters struct {
	refusedSince  atomic.Int64
	refusedLogged atomic.Int64 // unix nanoseconds of the last warning
}
