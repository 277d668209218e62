package proxy

import (
	"context"
	"net"
	"net/netip"
	"time"

	"github.com/straitproxy/strait/config"
	"github.com/straitproxy/strait/metrics"
	"github.com/straitproxy/strait/tproxy"
)

// SourcePlaintext is the access log's source for a plaintext connection
// passed to the application in permissive mTLS mode.
const SourcePlaintext = "plaintext"

// MTLSMode is what the proxy needs from the mutual TLS mode watcher
// (*tproxy.MTLSMode).
type MTLSMode interface {
	Run(ctx context.Context)
	Permissive() bool
	Changed() <-chan struct{}
}

// appPortConn reports whether conn, accepted on a transparent proxy's
// public listener, was originally addressed to the application's port:
// iptables sent it here, and it is not a mesh peer.
func (p *Proxy) appPortConn(conn net.Conn, cfg *config.Public) bool {
	if !cfg.Transparent || cfg.ApplicationPort <= 0 {
		return false
	}
	dst, err := p.originalDst(conn)
	if err != nil {
		p.log.Debug("no original destination; taking the mTLS path", "remote", addrString(conn.RemoteAddr()), "error", err)
		return false
	}
	return int(dst.Port()) == cfg.ApplicationPort
}

func (p *Proxy) originalDst(conn net.Conn) (netip.AddrPort, error) {
	if p.opts.OriginalDst != nil {
		return p.opts.OriginalDst(conn)
	}
	return tproxy.OriginalDst(conn)
}

// servePlaintext handles a connection to the application's port on a
// transparent proxy's public listener: in permissive mode it goes to the
// application as it is (no TLS, no intentions: Consul's semantics), counted
// and logged with the client's address; in strict mode it is closed.
// Either way it held a handshake slot, which becomes a connection slot.
func (p *Proxy) servePlaintext(ctx context.Context, conn net.Conn, pl *listener, release func()) {
	cfg := pl.cfg.Load()
	rec := &accessRecord{dir: "inbound", dest: p.service, endpoint: cfg.LocalServiceAddress, source: SourcePlaintext,
		remote: addrString(conn.RemoteAddr()), start: time.Now(), limitKey: remoteIP(conn)}
	dst := metrics.Label{Name: "dst", Value: p.service}
	if p.mtls == nil || !p.mtls.Permissive() {
		p.admit.releaseHandshake()
		abortive(conn)
		conn.Close()
		release()
		p.metrics.IncrCounter(metrics.InboundPlaintextRefused, 1, []metrics.Label{dst})
		rec.reason, rec.detail = ReasonPlaintextRefused, "plaintext to the application's port while the service is strict"
		p.logAccess(rec)
		return
	}
	p.admit.promote()
	release = p.releasingConn(release)
	app, err := dialApp(ctx, cfg)
	if err != nil {
		conn.Close()
		release()
		rec.reason, rec.detail = appDialFailure(err), err.Error()
		p.metrics.IncrCounter(metrics.InboundAppDialFailed, 1, []metrics.Label{dst, {Name: "reason", Value: rec.reason}})
		p.logAccess(rec)
		return
	}
	p.metrics.IncrCounter(metrics.InboundPlaintext, 1, []metrics.Label{dst})
	adm := &admitted{plaintext: true, kill: func() {
		abortive(conn)
		abortive(app)
		conn.Close()
		app.Close()
	}}
	p.proxy(conn, conn, app, pl, rec, release, nil, adm)
}
