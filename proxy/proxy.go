package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/straitproxy/strait/authz"
	"github.com/straitproxy/strait/config"
	"github.com/straitproxy/strait/internal/ktls"
	"github.com/straitproxy/strait/internal/watch"
	"github.com/straitproxy/strait/metrics"
	"github.com/straitproxy/strait/tlsutil"
	"github.com/straitproxy/strait/tunnel"
	"github.com/straitproxy/strait/upstream"
)

// Options configure a Proxy. Parts is required; the rest have useful zero
// values.
type Options struct {
	// OriginalDst returns a redirected connection's original destination
	// (a test hook); nil means SO_ORIGINAL_DST (tproxy.OriginalDst).
	OriginalDst func(net.Conn) (netip.AddrPort, error)
	// Parts builds the certificate source, the authorizer and the upstream
	// factory for the service of the first Config (its name, namespace
	// and partition) when Run receives it. Required; cmd/strait builds
	// them from its flags.
	Parts func(first *config.Config) Parts
	// Tunnels is the pool of strait-mux/2 tunnels that upstreams share
	// (give the same pool to the upstream factory); nil means no tunnels.
	// New sets its OnViolation when unset; Shutdown closes it. Inbound
	// tunnels are offered by the Source (tlsutil.SourceOptions.Tunnels).
	Tunnels *tunnel.Pool
	Logger  hclog.Logger
	// Metrics receives the built-in proxy's metric names and strait's own
	// (see package metrics); nil means metrics.Discard().
	Metrics *metrics.Metrics
	// Telemetry is the telemetry configuration from flags. The first
	// Config's telemetry block (agent mode) is applied under it, field by
	// field, to Metrics when Run starts; later changes of the block take a
	// restart, as with the built-in proxy.
	Telemetry metrics.Telemetry
	// AccessLog selects the connections that get an access log line;
	// "" means AccessLogDeniedOnly.
	AccessLog AccessLog
	// AccessLogger receives the access log lines; nil means
	// Logger.Named("access").
	AccessLogger hclog.Logger
	// FlushInterval is the period of the shared flush that reports live
	// connections' bytes and the gauges; zero means DefaultFlushInterval.
	FlushInterval time.Duration
	// HalfCloseTimeout is the idle limit of a connection one side of which
	// has finished; zero means DefaultHalfCloseTimeout.
	HalfCloseTimeout time.Duration
	// KTLS is "auto" (probe the kernel's TLS offload at start and report
	// it) or "off". See internal/ktls and README.md: the hand-off of
	// established connections to the kernel is not wired yet.
	KTLS string
	// DrainTimeout bounds how long a removed or changed listener's live
	// connections may continue after a reconfiguration; zero means 15s.
	DrainTimeout time.Duration
	// TunnelMaxStreams limits concurrent streams per inbound tunnel;
	// TunnelMaxPerPeer limits inbound tunnels per peer identity.
	// TunnelStreamRate and TunnelStreamBurst limit how fast a peer may
	// open streams on one inbound tunnel. Zero means the package tunnel
	// defaults. The Tunnels pool has its own limits for outbound tunnels.
	TunnelMaxStreams, TunnelMaxPerPeer int
	TunnelStreamRate                   float64
	TunnelStreamBurst                  int
	// TunnelBudget bounds the receive-window growth of one inbound
	// tunnel's streams together, in bytes; zero means
	// tunnel.DefaultTunnelBudget.
	TunnelBudget int64
	// MaxInboundConnections, when positive, overrides the configuration's
	// Public.MaxInboundConnections (the registration's
	// max_inbound_connections); see admission.
	MaxInboundConnections int
	// MaxHandshakes bounds inbound TLS handshakes in progress; zero means
	// DefaultMaxHandshakes.
	MaxHandshakes int
	// MaxOutboundConnections bounds the open connections of a transparent
	// proxy's outbound listener; zero means DefaultMaxOutboundConnections.
	MaxOutboundConnections int
}

// Parts are what a Proxy runs for its service. The proxy starts Source
// and Authorizer (their Run) when it receives its first Config and stops
// them at Shutdown.
type Parts struct {
	// Source supplies the leaf certificate and roots; required.
	Source *tlsutil.Source
	// Authorizer decides inbound connections by intentions; required.
	Authorizer *authz.Authorizer
	// MTLSMode follows the service's mutual TLS mode for permissive mTLS
	// on a transparent proxy; the proxy runs it once a configuration's
	// public listener is transparent. nil means always strict.
	MTLSMode MTLSMode
	// Outbound routes the connections of a transparent proxy's outbound
	// listener; the proxy runs it once a configuration has an Outbound.
	// nil means a transparent registration gets no outbound listener.
	Outbound Outbound
	// Upstream returns the upstream of one configured upstream. It is
	// called once Source is ready; the proxy runs the upstream for as long
	// as its listener lives. Required.
	Upstream func(u config.Upstream) (*upstream.Upstream, error)
	// Peering follows cluster peers' roots for upstreams in peers and
	// for the public listener's clients from peers (package peering); the
	// proxy runs it with Source. nil means no cluster peering.
	Peering Runner
}

// Runner is a background part the proxy runs until Shutdown.
type Runner interface{ Run(ctx context.Context) }

// Proxy runs the public listener and the upstream listeners of one Config
// and follows configuration changes without disturbing unrelated
// connections.
type Proxy struct {
	opts    Options
	log     hclog.Logger
	access  hclog.Logger
	metrics *metrics.Metrics
	watches *watchTracker

	ctx    context.Context // lives until Shutdown finishes
	cancel context.CancelFunc
	bg     sync.WaitGroup // watches and background drains
	// flushMu serializes the periodic flush with the one Run does right
	// after applying a configuration.
	flushMu sync.Mutex

	src         *tlsutil.Source
	az          *authz.Authorizer
	mtls        MTLSMode
	mtlsRunning bool // under mu
	newUpstream func(config.Upstream) (*upstream.Upstream, error)
	service     string
	// router is Parts.Outbound; routerRunning is under mu.
	router        Outbound
	routerRunning bool

	mu        sync.Mutex
	public    *listener
	upstreams map[string]*listener // by listen address
	// outbound are a transparent proxy's outbound listeners (IPv4 and
	// IPv6 loopback) for outboundCfg.
	outbound    []*listener
	outboundCfg *config.Outbound
	listeners   map[*listener]struct{} // every listener until drained
	gauges      map[string]*connGauge  // *.conns, by label set
	ready       atomic.Bool
	shutdown    bool
	// telemetryRaw is the telemetry block applied at start;
	// telemetryErr why it was not; applyErr why the last
	// configuration was not fully applied.
	telemetryRaw any
	telemetryErr error
	applyErr     error

	phase   atomic.Int32 // a phase
	failure atomic.Pointer[string]
	cfg     atomic.Pointer[config.Config]

	pool      *tunnel.Pool // Options.Tunnels
	inTunnels atomic.Int64 // inbound tunnels open
	// inTunnelsByPeer caps inbound tunnels per peer identity.
	inTunnelsByPeer peerCounts
	inStreams       atomic.Int64 // inbound streams active
	// lines rate-limits refusal log lines per tunnel and per source.
	lines *lineLimiter

	// admitted are the open inbound connections, re-checked when the
	// intentions change (revokeLoop).
	admitted admittedSet

	admit         *admission // the public listener's limits
	outAdmit      *admission // the outbound listeners' connection limit
	regMaxInbound int        // the registration's max_inbound_connections, under mu
	refusalCounters
}

// New returns a Proxy. Nothing runs until Run.
func New(opts Options) *Proxy {
	if opts.Parts == nil {
		panic("proxy.New: Options.Parts is required")
	}
	if opts.Logger == nil {
		opts.Logger = hclog.NewNullLogger()
	}
	if opts.AccessLog == "" {
		opts.AccessLog = AccessLogDeniedOnly
	}
	if opts.AccessLogger == nil {
		opts.AccessLogger = opts.Logger.Named("access")
	}
	m := opts.Metrics
	if m == nil {
		m = metrics.Discard()
	}
	w := newWatchTracker(m)
	// Every watch run under the proxy's context (certificates, intentions,
	// upstream endpoints) reports to the tracker.
	ctx, cancel := context.WithCancel(watch.WithObserver(context.Background(), w))
	p := &Proxy{
		pool: opts.Tunnels, lines: newLineLimiter(), admit: newAdmission(opts.MaxHandshakes),
		opts: opts, log: opts.Logger, access: opts.AccessLogger, metrics: m, watches: w, ctx: ctx, cancel: cancel,
		upstreams: make(map[string]*listener),
		listeners: make(map[*listener]struct{}),
		gauges:    make(map[string]*connGauge),
	}
	p.outAdmit = newAdmission(0)
	p.outAdmit.setMaxConns(opts.MaxOutboundConnections)
	if opts.MaxOutboundConnections <= 0 {
		p.outAdmit.setMaxConns(DefaultMaxOutboundConnections)
	}
	if p.pool != nil && p.pool.OnViolation == nil {
		p.pool.OnViolation = p.tunnelViolation
	}
	return p
}

// Ready reports whether certificates are loaded and every listener is bound.
func (p *Proxy) Ready() bool { return p.ready.Load() }

// source returns the certificate source, nil before Run has started it.
func (p *Proxy) source() *tlsutil.Source {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.src
}

// Run applies every Config received on cfgs until ctx is done or cfgs is
// closed. The first Config starts the certificate and intention watches;
// listeners are bound once certificates (and, with a public listener,
// intentions) are loaded, so that a bound public port means a working one.
// Run returns an error only if the first configuration cannot be applied.
func (p *Proxy) Run(ctx context.Context, cfgs <-chan *config.Config) error {
	var first *config.Config
	select {
	case <-ctx.Done():
		return nil
	case first = <-cfgs:
		if first == nil {
			return nil
		}
	}
	p.cfg.Store(first)
	p.configureTelemetry(first)
	p.start(first)
	if !p.waitReady(ctx, first) {
		return nil
	}
	p.setPhase(phaseBinding)
	if err := p.apply(first); err != nil {
		p.fail(err)
		return err
	}
	// The gauges of the new listeners (and the leaf's) now, not at the
	// next tick: a ready proxy exposes them.
	p.flush()
	p.ready.Store(true)
	p.setPhase(phaseReady)
	p.log.Info("proxy ready", "service", first.Service, "public", p.publicAddr(), "upstreams", len(first.Upstreams))
	for {
		select {
		case <-ctx.Done():
			return nil
		case c, ok := <-cfgs:
			if !ok {
				return nil
			}
			if c.Service != p.service {
				p.log.Error("the proxied service changed; restart strait to serve the new one", "old", p.service, "new", c.Service)
				continue
			}
			p.telemetryChanged(c)
			if err := p.apply(c); err != nil {
				p.log.Error("applying new configuration failed; keeping the rest running", "error", err)
			}
			p.flush()
			p.cfg.Store(c)
		}
	}
}

// configureTelemetry applies the flags' telemetry over the first Config's
// telemetry block. A block that does not decode is reported (log, /ready's
// degraded list) and ignored, as the built-in proxy ignores it: metrics are
// not a reason to refuse traffic.
func (p *Proxy) configureTelemetry(c *config.Config) {
	tel := p.opts.Telemetry
	var terr error
	if c.Telemetry != nil {
		block, warnings, err := metrics.ParseTelemetry(c.Telemetry)
		for _, w := range warnings {
			p.log.Warn(w)
		}
		if err != nil {
			terr = err
			p.log.Error("ignoring the proxy's telemetry block", "error", err)
		} else {
			tel = block.Overlay(tel)
		}
	}
	if err := p.metrics.Configure(tel); err != nil {
		terr = errors.Join(terr, err)
		p.log.Error("configuring metrics sinks failed", "error", err)
	}
	if tel.StatsdAddr != "" || tel.StatsiteAddr != "" || tel.DogstatsdAddr != "" {
		p.log.Info("sending metrics", "statsd", tel.StatsdAddr, "statsite", tel.StatsiteAddr, "dogstatsd", tel.DogstatsdAddr, "prefix", tel.MetricsPrefix)
	}
	p.mu.Lock()
	p.telemetryRaw, p.telemetryErr = c.Telemetry, terr
	p.mu.Unlock()
}

func (p *Proxy) telemetryChanged(c *config.Config) {
	p.mu.Lock()
	changed := !reflect.DeepEqual(c.Telemetry, p.telemetryRaw)
	if changed {
		p.telemetryRaw = c.Telemetry
	}
	p.mu.Unlock()
	if changed {
		p.log.Warn("the proxy's telemetry block changed; restart strait to apply it")
	}
}

func (p *Proxy) start(c *config.Config) {
	p.service = c.Service
	if p.opts.KTLS != "off" {
		if err := ktls.Probe(); err != nil {
			p.log.Info("kernel TLS offload unavailable; using crypto/tls", "reason", err)
		} else {
			p.log.Info("kernel TLS offload available; connections still use crypto/tls in this release")
		}
	}
	parts := p.opts.Parts(c)
	src, az := parts.Source, parts.Authorizer
	p.mu.Lock()
	p.src, p.az, p.newUpstream, p.mtls, p.router = src, az, parts.Upstream, parts.MTLSMode, parts.Outbound
	stopped := p.shutdown // Shutdown has begun: start nothing it would not join
	p.mu.Unlock()
	if stopped {
		return
	}
	p.setPhase(phaseWaitingCerts)
	p.bg.Go(func() { src.Run(p.ctx) })
	p.bg.Go(func() { az.Run(p.ctx) })
	if parts.Peering != nil {
		p.bg.Go(func() { parts.Peering.Run(p.ctx) })
	}
	p.bg.Go(p.flushLoop)
	p.bg.Go(p.revokeLoop)
}

func (p *Proxy) waitReady(ctx context.Context, c *config.Config) bool {
	t := time.NewTicker(10 * time.Second)
	defer t.Stop()
	wait := []<-chan struct{}{p.src.Ready()}
	if c.Public != nil {
		wait = append(wait, p.az.Ready())
	}
	for i, ch := range wait {
		if i == 1 {
			p.setPhase(phaseWaitingIntentions)
		}
		for ready := false; !ready; {
			select {
			case <-ctx.Done():
				return false
			case <-ch:
				ready = true
			case <-t.C:
				p.log.Warn("still waiting for certificates and intentions from the agent", "service", c.Service)
			}
		}
	}
	return true
}

func (p *Proxy) publicAddr() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.public == nil {
		return ""
	}
	return p.public.Addr().String()
}

// PublicAddr returns the bound public listener address, or nil.
func (p *Proxy) PublicAddr() net.Addr {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.public == nil {
		return nil
	}
	return p.public.Addr()
}

// apply moves the running listeners to c: the public listener is rebound
// only if its address changed (app address and timeouts apply in place);
// upstreams are diffed by listen address and only added, removed or changed
// ones are touched. Connections of a listener that goes away drain in the
// background for DrainTimeout.
func (p *Proxy) apply(c *config.Config) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.shutdown {
		return nil
	}
	var errs []error
	if c.Public != nil {
		p.setMaxInbound(c.Public)
		if c.Public.Transparent && p.mtls != nil && !p.mtlsRunning {
			p.mtlsRunning = true
			p.bg.Go(func() { p.mtls.Run(p.ctx) })
		}
	}

	switch {
	case c.Public == nil && p.public != nil:
		p.log.Info("public listener removed", "addr", p.public.cfg.Load().Addr())
		p.drainLater(p.public)
		p.public = nil
	case c.Public != nil && p.public != nil && p.public.cfg.Load().Addr() == c.Public.Addr():
		pub := *c.Public
		p.public.cfg.Store(&pub)
	case c.Public != nil:
		if p.public != nil {
			p.log.Info("public listener address changed; rebinding", "old", p.public.cfg.Load().Addr(), "new", c.Public.Addr())
			p.drainLater(p.public)
			p.public = nil
		}
		pl, err := p.listenPublic(c.Public)
		if err != nil {
			errs = append(errs, err)
		} else {
			p.public = pl
		}
	}

	want := make(map[string]config.Upstream, len(c.Upstreams))
	for _, u := range c.Upstreams {
		want[u.Network()+"|"+u.Addr()] = u
	}
	for key, ul := range p.upstreams {
		if u, ok := want[key]; ok && u == ul.upCfg {
			continue
		}
		p.log.Info("upstream removed", "upstream", ul.upCfg.String(), "addr", ul.Addr().String())
		p.stopUpstream(ul)
		delete(p.upstreams, key)
	}
	for key, u := range want {
		if _, ok := p.upstreams[key]; ok {
			continue
		}
		ul, err := p.listenUpstream(u)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		p.upstreams[key] = ul
		p.log.Info("upstream listening", "upstream", u.String(), "addr", ul.Addr().String())
	}
	if err := p.applyOutbound(c.Outbound); err != nil {
		errs = append(errs, err)
	}
	p.applyErr = errors.Join(errs...)
	return p.applyErr
}

// setMaxInbound applies the connection limit of pub, or the flag's, which
// wins. Called under p.mu.
func (p *Proxy) setMaxInbound(pub *config.Public) {
	n, from := pub.MaxInboundConnections, "registration"
	if p.opts.MaxInboundConnections > 0 {
		n, from = p.opts.MaxInboundConnections, "flag"
		if reg := pub.MaxInboundConnections; reg > 0 && reg != p.regMaxInbound {
			p.log.Warn("-max-inbound-connections overrides the registration's max_inbound_connections", "flag", n, "registration", reg)
		}
	}
	p.regMaxInbound = pub.MaxInboundConnections
	if p.admit.setMaxConns(n) {
		if n == 0 {
			from = "none"
		}
		p.log.Info("inbound connection limit", "max_inbound_connections", n, "from", from, "max_handshakes", p.admit.maxHandshakes)
	}
}

// drainLater stops l accepting and lets its live connections drain in
// the background, owned by the Proxy, for DrainTimeout; then an upstream's
// endpoint watch stops. The listener is closed now so that its address can
// be rebound at once.
func (p *Proxy) drainLater(l *listener) {
	d := p.opts.DrainTimeout
	if d <= 0 {
		d = 15 * time.Second
	}
	l.ln.Close()
	l.draining.Store(true)
	p.bg.Go(func() {
		ctx, cancel := context.WithTimeout(p.ctx, d)
		defer cancel()
		l.Shutdown(ctx)
		if l.stopUp != nil {
			l.stopUp()
		}
		p.forget(l)
	})
}

func (p *Proxy) stopUpstream(ul *listener) { p.drainLater(ul) }

// listenPublic binds and starts the public listener. p.mu is held.
func (p *Proxy) listenPublic(c *config.Public) (*listener, error) {
	ln, err := net.Listen("tcp", c.Addr())
	if err != nil {
		return nil, fmt.Errorf("public listener: %w", err)
	}
	pl := newListener(kindInbound, "public", ln, p.log)
	pub := *c
	pl.cfg.Store(&pub)
	tlsCfg := p.src.ServerConfig(p.authorize)
	pl.admit = p.admitHandshake
	pl.handle = func(ctx context.Context, conn net.Conn, release func()) {
		p.handleInbound(ctx, conn, pl, tlsCfg, release)
	}
	p.register(pl, []metrics.Label{{Name: "dst", Value: p.service}})
	pl.start()
	p.log.Info("public listener bound", "addr", ln.Addr().String(), "app", c.LocalServiceAddress)
	return pl, nil
}

// listenUpstream binds and starts an upstream listener and its endpoint
// watch. p.mu is held.
func (p *Proxy) listenUpstream(u config.Upstream) (*listener, error) {
	up, err := p.newUpstream(u)
	if err != nil {
		return nil, err
	}
	var ln net.Listener
	if u.LocalBindSocketPath != "" {
		ln, err = listenUnix(u.LocalBindSocketPath, u.LocalBindSocketMode)
	} else {
		ln, err = net.Listen("tcp", u.Addr())
	}
	if err != nil {
		return nil, fmt.Errorf("upstream %s: %w", u.String(), err)
	}
	ctx, cancel := context.WithCancel(p.ctx)
	p.bg.Go(func() { up.Run(ctx) })
	ul := newListener(kindUpstream, u.String(), ln, p.log)
	ul.upCfg, ul.up, ul.stopUp = u, up, cancel
	ul.handle = func(ctx context.Context, conn net.Conn, release func()) {
		p.handleUpstream(ctx, conn, ul, release)
	}
	p.register(ul, []metrics.Label{
		{Name: "src", Value: p.service}, {Name: "dst_type", Value: u.Type()}, {Name: "dst", Value: u.DestinationName},
	})
	ul.start()
	return ul, nil
}

// listenUnix binds a unix socket and applies mode; mode 0 leaves the socket
// as the umask makes it (0777 &^ umask), as Envoy does. A socket file
// already at path is removed only when stale: if something accepts on it,
// another process owns the path and listenUnix fails.
func listenUnix(path string, mode os.FileMode) (net.Listener, error) {
	if fi, err := os.Lstat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
		d := net.Dialer{Timeout: time.Second}
		c, err := d.Dial("unix", path)
		switch {
		case err == nil:
			c.Close()
			return nil, fmt.Errorf("unix socket %s: address in use by another process", path)
		case errors.Is(err, syscall.ECONNREFUSED): // nobody listens: stale
			if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
				return nil, fmt.Errorf("removing stale unix socket %s: %w", path, err)
			}
		default: // EAGAIN (full backlog: live), EACCES, ...: leave it alone
			return nil, fmt.Errorf("unix socket %s exists and may be in use: %w", path, err)
		}
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, err
	}
	if mode != 0 {
		if err := os.Chmod(path, mode); err != nil {
			ln.Close()
			return nil, fmt.Errorf("chmod %s: %w", path, err)
		}
	}
	return ln, nil
}

// DeniedError is returned into the TLS handshake when intentions refuse a
// peer.
type DeniedError struct {
	Source tlsutil.Identity
	Reason string
}

func (e *DeniedError) Error() string {
	return "connection from " + e.Source.Service + " denied: " + e.Reason
}

func (p *Proxy) authorize(ctx context.Context, peer tlsutil.Identity, serial string) error {
	d, err := p.az.Authorize(ctx, peer, serial)
	if err != nil {
		return &AuthzError{Source: peer, Err: err}
	}
	if !d.Allow {
		return &DeniedError{Source: peer, Reason: d.Reason}
	}
	return nil
}

func (p *Proxy) handleInbound(ctx context.Context, conn net.Conn, pl *listener, tlsCfg *tls.Config, release func()) {
	cfg := pl.cfg.Load()
	if p.appPortConn(conn, cfg) {
		p.servePlaintext(ctx, conn, pl, release)
		return
	}
	rec := &accessRecord{dir: "inbound", dest: p.service, endpoint: cfg.LocalServiceAddress,
		remote: addrString(conn.RemoteAddr()), start: time.Now(), limitKey: remoteIP(conn)}
	// The accept loop took a handshake slot (admission) for conn.
	hctx, cancel := context.WithTimeout(ctx, cfg.HandshakeTimeoutOrDefault())
	tc := tlsutil.Server(conn, tlsCfg)
	err := tc.HandshakeContext(hctx)
	cancel()
	if err != nil {
		p.admit.releaseHandshake()
		tc.Close()
		p.refused(rec, err)
		release()
		return
	}
	if tc.ConnectionState().NegotiatedProtocol == tlsutil.ALPNMux {
		// A tunnel holds no slot: each of its streams takes one.
		p.admit.releaseHandshake()
		defer release()
		p.serveTunnel(ctx, conn, tc, pl)
		return
	}
	p.admit.promote()
	rec.source = peerID(tc.Conn)
	p.serveInbound(ctx, inbound{raw: conn, conn: tc, tc: tc.Conn, rec: rec}, pl, p.releasingConn(release))
}

// inbound is an authenticated inbound connection on its way to the app: a
// classic TLS connection, authorized in its handshake (VerifyConnection),
// or a tunnel stream, authorized in serveInbound with its tunnel's
// verified peer.
type inbound struct {
	raw     net.Conn     // what the listener tracks (a stream for a stream)
	conn    net.Conn     // what to copy from
	tc      *tls.Conn    // the TLS connection (a stream's tunnel)
	stream  *tunnel.Conn // non-nil for a tunnel stream
	service string       // the destination a stream's header names
	rec     *accessRecord
}

// serveInbound is the one admission path after authentication, for
// classic connections and tunnel streams alike: authorize (streams), dial
// the app, answer the stream, proxy. release is called once the
// connection is finished.
func (p *Proxy) serveInbound(ctx context.Context, in inbound, pl *listener, release func()) {
	handedOff := false
	defer func() {
		if !handedOff {
			release()
		}
	}()
	rec := in.rec
	cfg := pl.cfg.Load()
	rec.endpoint = cfg.LocalServiceAddress
	refuse := func(status uint32) {
		if in.stream != nil {
			in.stream.Refuse(status)
		} else {
			in.tc.Close()
		}
	}
	src, serial, err := p.src.PeerOf(in.tc.ConnectionState())
	if err != nil { // the handshake verified the chain: cannot happen
		refuse(tunnel.StatusDenied)
		p.refused(rec, err)
		return
	}
	if in.stream != nil {
		if err := p.authorizeStream(ctx, in, src, serial); err != nil {
			refuse(tunnel.StatusDenied)
			p.refused(rec, err)
			return
		}
	}
	// The peer is authenticated and authorized; only now is the app dialed.
	app, err := dialApp(ctx, cfg)
	if err != nil {
		refuse(tunnel.StatusUnavailable)
		rec.reason, rec.detail = appDialFailure(err), err.Error()
		if ok, n := p.lineAllowed(rec, "app_dial"); ok {
			p.log.Warn("dialing local app failed", "app", cfg.LocalServiceAddress, "error", err, "suppressed_before", n)
		}
		p.metrics.IncrCounter(metrics.InboundAppDialFailed, 1, []metrics.Label{{Name: "dst", Value: p.service}, {Name: "reason", Value: rec.reason}})
		p.logAccess(rec)
		return
	}
	if in.stream != nil {
		if err := in.stream.Accept(); err != nil {
			app.Close()
			in.stream.Close()
			rec.reason, rec.detail = closeReason(err, pl)
			p.logAccess(rec)
			return
		}
	}
	handedOff = true
	conn := in.conn
	adm := &admitted{src: src, serial: serial, kill: func() {
		abortive(conn)
		abortive(app)
		conn.Close()
		app.Close()
	}}
	p.proxy(in.raw, in.conn, app, pl, rec, release, nil, adm)
}

// authorizeStream checks a tunnel stream: our own service only (a tunnel
// is no way to reach another), and the intentions for the tunnel's peer.
func (p *Proxy) authorizeStream(ctx context.Context, in inbound, id tlsutil.Identity, serial string) error {
	if in.service != p.service {
		return &DeniedError{Source: id, Reason: "tunnel stream for service " + in.service + ", not " + p.service}
	}
	return p.authorize(ctx, id, serial)
}

// refused reports an inbound connection refused before its app was
// dialed: denied by intentions, or its handshake (a stream's
// authorization) failed.
func (p *Proxy) refused(rec *accessRecord, err error) {
	dst := metrics.Label{Name: "dst", Value: p.service}
	var denied *DeniedError
	if errors.As(err, &denied) {
		rec.source, rec.reason, rec.detail = denied.Source.String(), ReasonDenied, denied.Reason
		if !p.accessLogged(ReasonDenied) {
			if ok, n := p.lineAllowed(rec, "denied"); ok {
				p.log.Info("inbound connection denied", "source", rec.source, "reason", denied.Reason, "remote", rec.remote, "suppressed_before", n)
			}
		}
		p.metrics.IncrCounter(metrics.InboundDenied, 1, []metrics.Label{{Name: "src", Value: denied.Source.Service}, dst})
		p.logAccess(rec)
		return
	}
	reason, label := handshakeFailure(err)
	p.log.Debug("inbound handshake failed", "remote", rec.remote, "reason", label, "error", err)
	p.metrics.IncrCounter(metrics.InboundHandshakeFailed, 1, []metrics.Label{dst, {Name: "reason", Value: label}})
	rec.reason, rec.detail = reason, err.Error()
	p.logAccess(rec)
}

// dialApp dials the local application (tcp, or unix:path).
func dialApp(ctx context.Context, cfg *config.Public) (net.Conn, error) {
	network, addr := "tcp", cfg.LocalServiceAddress
	if path, ok := strings.CutPrefix(addr, "unix:"); ok {
		network, addr = "unix", path
	}
	d := net.Dialer{Timeout: cfg.LocalConnectTimeoutOrDefault()}
	return d.DialContext(ctx, network, addr)
}

// remoteIP is the IP of c's peer: the line limiter's key for a source.
func remoteIP(c net.Conn) string {
	if a, ok := c.RemoteAddr().(*net.TCPAddr); ok {
		return a.IP.String()
	}
	return addrString(c.RemoteAddr())
}

func (p *Proxy) handleUpstream(ctx context.Context, conn net.Conn, ul *listener, release func()) {
	handedOff := false
	defer func() {
		if !handedOff {
			release()
		}
	}()
	rec := &accessRecord{dir: "upstream", dest: ul.upCfg.String(), remote: addrString(conn.RemoteAddr()), start: time.Now()}
	if b := p.src.Bundle(); b != nil {
		rec.source = b.Identity.String()
	}
	// Right after start the first endpoint answer may still be on its way;
	// wait for it within the connect timeout rather than fail.
	awaitAnswer(ctx, ul.up.Ready(), ul.upCfg.ConnectTimeoutOrDefault())
	tc, ep, releaseEndpoint, err := ul.up.DialConn(ctx, upstream.DialOptions{Source: conn.RemoteAddr()})
	rec.attempts = int32(ep.Attempts)
	if n := rec.attempts; n > 1 {
		p.metrics.IncrCounter(metrics.UpstreamDialRetries, float32(n-1), ul.labels)
	}
	if err != nil {
		conn.Close()
		rec.reason, rec.detail = ReasonUpstreamDialFailed, err.Error()
		if ctx.Err() != nil {
			rec.reason = ReasonShutdown
		} else {
			p.log.Warn("upstream dial failed", "upstream", ul.upCfg.String(), "error", err)
			p.metrics.IncrCounter(metrics.UpstreamDialFailed, 1, ul.labels)
		}
		p.logAccess(rec)
		return
	}
	rec.endpoint, rec.target = ep.Addr, ep.Target
	if ep.Target != "" {
		p.metrics.IncrCounter(metrics.UpstreamTargetConnections, 1, targetLabels(ul.labels, ep.Target))
	}
	p.proxy(conn, conn, tc, ul, rec, release, releaseEndpoint, nil)
	handedOff = true
}

// proxy hands an accepted connection (raw, as the listener tracks it; a
// is what to copy from, the TLS side for inbound) and its dialed peer b to
// the copy loop, and does the accounting and the access log at the end.
// adm, for an inbound connection, is registered for re-checks while the
// connection lives.
func (p *Proxy) proxy(raw, a, b net.Conn, l *listener, rec *accessRecord, release, releaseEndpoint func(), adm *admitted) {
	lc := &liveConn{peer: b}
	l.attach(raw, lc)
	l.opened(p.metrics)
	if adm != nil {
		p.admitted.add(adm)
	}
	StartCounted(a, b, p.opts.HalfCloseTimeout, &lc.ctr, func(res Result) {
		if adm != nil {
			p.admitted.remove(adm)
		}
		defer release()
		if releaseEndpoint != nil {
			defer releaseEndpoint()
		}
		rx, tx := lc.take(res.AToB, res.BToA)
		if adm != nil && adm.plaintext {
			p.metrics.IncrCounter(metrics.InboundPlaintextBytes, float32(res.AToB+res.BToA), []metrics.Label{{Name: "dst", Value: p.service}})
		}
		l.account(p.metrics, rx, tx)
		l.closed(p.metrics, rec.start)
		rec.rx, rec.tx = res.AToB, res.BToA
		rec.reason, rec.detail = closeReason(res.Err, l)
		if adm != nil {
			if why := adm.revoked.Load(); why != nil {
				rec.reason, rec.detail = ReasonRevoked, *why
			}
		}
		if res.Err != nil && !isClosed(res.Err) {
			p.log.Debug(rec.dir+" connection ended with error", "source", rec.source, "destination", rec.dest,
				"endpoint", rec.endpoint, "error", res.Err, "duration", time.Since(rec.start))
		}
		p.logAccess(rec)
	})
}

// Shutdown stops accepting on every listener, lets live connections finish
// until ctx is done, closes what is left, and stops the watches.
func (p *Proxy) Shutdown(ctx context.Context) {
	p.mu.Lock()
	p.shutdown = true
	var ls []*listener
	if p.public != nil {
		ls = append(ls, p.public)
	}
	for _, ul := range p.upstreams {
		ls = append(ls, ul)
	}
	ls = append(ls, p.outbound...)
	p.mu.Unlock()
	p.ready.Store(false)
	p.setPhase(phaseStopping)
	var wg sync.WaitGroup
	for _, l := range ls {
		wg.Go(func() { l.Shutdown(ctx) })
	}
	wg.Wait()
	if p.pool != nil {
		p.pool.Close()
	}
	p.cancel()
	p.bg.Wait()
}

// awaitAnswer waits until ready is closed, d has passed or ctx is done:
// right after start (or after an upstream appears) the first answer from
// Consul may still be on its way, and a connection waits for it within its
// connect timeout rather than fail.
func awaitAnswer(ctx context.Context, ready <-chan struct{}, d time.Duration) {
	select {
	case <-ready:
		return
	default:
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ready:
	case <-t.C:
	case <-ctx.Done():
	}
}
