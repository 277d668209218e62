package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/armon/go-metrics"
	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"

	"github.com/straitproxy/strait/authz"
	"github.com/straitproxy/strait/config"
	"github.com/straitproxy/strait/internal/ktls"
	"github.com/straitproxy/strait/tlsutil"
	"github.com/straitproxy/strait/upstream"
)

// Options configure a Proxy. Client is required; the rest have useful zero
// values.
type Options struct {
	Client *api.Client
	// AgentConfig is the config Client was built from; with it, default
	// authorization lookups are bounded by the handshake's context.
	AgentConfig *api.Config
	Logger      hclog.Logger
	// Metrics receives the built-in proxy's metric names; nil discards.
	Metrics *metrics.Metrics
	// HalfCloseTimeout is the idle limit of a connection one side of which
	// has finished; zero means DefaultHalfCloseTimeout.
	HalfCloseTimeout time.Duration
	// CurvePreferences for every handshake (tlsutil.KeyExchange); nil
	// means Go's default, the post-quantum hybrid first.
	CurvePreferences []tls.CurveID
	// KTLS is "auto" (probe the kernel's TLS offload at start and report
	// it) or "off". See internal/ktls and README.md: the hand-off of
	// established connections to the kernel is not wired yet.
	KTLS string
	// DrainTimeout bounds how long a removed or changed listener's live
	// connections may continue after a reconfiguration; zero means 15s.
	DrainTimeout time.Duration
}

// Proxy runs the public listener and the upstream listeners of one Config
// and follows configuration changes without disturbing unrelated
// connections.
type Proxy struct {
	opts    Options
	log     hclog.Logger
	metrics *metrics.Metrics

	ctx    context.Context // lives until Shutdown finishes
	cancel context.CancelFunc
	bg     sync.WaitGroup // watches and background drains

	localDC string
	src     *tlsutil.Source
	az      *authz.Authorizer
	service string

	mu        sync.Mutex
	public    *publicListener
	upstreams map[string]*upstreamListener // by listen address
	ready     atomic.Bool
	shutdown  bool
}

type publicListener struct {
	addr string
	cfg  atomic.Pointer[config.Public] // app address and timeouts may change in place
	srv  *server
}

type upstreamListener struct {
	cfg    config.Upstream
	up     *upstream.Upstream
	srv    *server
	cancel context.CancelFunc
}

// New returns a Proxy. Nothing runs until Run.
func New(opts Options) *Proxy {
	if opts.Logger == nil {
		opts.Logger = hclog.NewNullLogger()
	}
	m := opts.Metrics
	if m == nil {
		m, _ = metrics.New(metrics.DefaultConfig("strait"), &metrics.BlackholeSink{})
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Proxy{
		opts: opts, log: opts.Logger, metrics: m, ctx: ctx, cancel: cancel,
		upstreams: make(map[string]*upstreamListener),
	}
}

// Ready reports whether certificates are loaded and every listener is bound.
func (p *Proxy) Ready() bool { return p.ready.Load() }

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
	p.start(first)
	if !p.waitReady(ctx, first) {
		return nil
	}
	if err := p.apply(first); err != nil {
		return err
	}
	p.ready.Store(true)
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
			if err := p.apply(c); err != nil {
				p.log.Error("applying new configuration failed; keeping the rest running", "error", err)
			}
		}
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
	p.src = tlsutil.NewSource(p.opts.Client, c.Service, tlsutil.SourceOptions{
		Namespace: c.Namespace, Partition: c.Partition, Logger: p.log.Named("certs"),
		CurvePreferences: p.opts.CurvePreferences,
	})
	p.az = authz.New(p.opts.Client, authz.Options{
		Target: c.Service, Namespace: c.Namespace, Partition: c.Partition, Logger: p.log,
		AgentConfig: p.opts.AgentConfig,
	})
	p.bg.Go(func() { p.src.Run(p.ctx) })
	p.bg.Go(func() { p.az.Run(p.ctx) })
}

// localDatacenter is the agent's datacenter, read from our own leaf.
func (p *Proxy) localDatacenter() string {
	if b := p.src.Bundle(); b != nil {
		return b.Identity.Datacenter
	}
	return ""
}

func (p *Proxy) waitReady(ctx context.Context, c *config.Config) bool {
	t := time.NewTicker(10 * time.Second)
	defer t.Stop()
	wait := []<-chan struct{}{p.src.Ready()}
	if c.Public != nil {
		wait = append(wait, p.az.Ready())
	}
	for _, ch := range wait {
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
	return p.public.srv.Addr().String()
}

// PublicAddr returns the bound public listener address, or nil.
func (p *Proxy) PublicAddr() net.Addr {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.public == nil {
		return nil
	}
	return p.public.srv.Addr()
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

	switch {
	case c.Public == nil && p.public != nil:
		p.log.Info("public listener removed", "addr", p.public.addr)
		p.drainLater(p.public.srv)
		p.public = nil
	case c.Public != nil && p.public != nil && p.public.addr == c.Public.Addr():
		pub := *c.Public
		p.public.cfg.Store(&pub)
	case c.Public != nil:
		if p.public != nil {
			p.log.Info("public listener address changed; rebinding", "old", p.public.addr, "new", c.Public.Addr())
			p.drainLater(p.public.srv)
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
		if u, ok := want[key]; ok && u == ul.cfg {
			continue
		}
		p.log.Info("upstream removed", "upstream", ul.cfg.String(), "addr", ul.srv.Addr().String())
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
		p.log.Info("upstream listening", "upstream", u.String(), "addr", ul.srv.Addr().String())
	}
	return errors.Join(errs...)
}

func (p *Proxy) drainLater(s *server) {
	d := p.opts.DrainTimeout
	if d <= 0 {
		d = 15 * time.Second
	}
	p.bg.Go(func() {
		ctx, cancel := context.WithTimeout(p.ctx, d)
		defer cancel()
		s.Shutdown(ctx)
	})
}

func (p *Proxy) stopUpstream(ul *upstreamListener) {
	// Close the listener now so the address can be rebound at once; live
	// connections drain in the background, then the watch stops.
	ul.srv.ln.Close()
	d := p.opts.DrainTimeout
	if d <= 0 {
		d = 15 * time.Second
	}
	p.bg.Go(func() {
		ctx, cancel := context.WithTimeout(p.ctx, d)
		defer cancel()
		ul.srv.Shutdown(ctx)
		ul.cancel()
	})
}

func (p *Proxy) listenPublic(c *config.Public) (*publicListener, error) {
	ln, err := net.Listen("tcp", c.Addr())
	if err != nil {
		return nil, fmt.Errorf("public listener: %w", err)
	}
	pl := &publicListener{addr: c.Addr()}
	pub := *c
	pl.cfg.Store(&pub)
	tlsCfg := p.src.ServerConfig(p.authorize)
	pl.srv = newServer("public", ln, p.log, func(ctx context.Context, conn net.Conn, release func()) {
		p.handleInbound(ctx, conn, pl, tlsCfg, release)
	})
	p.log.Info("public listener bound", "addr", ln.Addr().String(), "app", c.LocalServiceAddress)
	return pl, nil
}

func (p *Proxy) listenUpstream(u config.Upstream) (*upstreamListener, error) {
	up, err := upstream.New(u, upstream.Options{
		Client:          p.opts.Client,
		TLS:             p.src,
		LocalDatacenter: p.localDatacenter(),
		Logger:          p.log.Named("upstream").With("upstream", u.DestinationName),
	})
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
	ul := &upstreamListener{cfg: u, up: up, cancel: cancel}
	ul.srv = newServer("upstream "+u.DestinationName, ln, p.log, func(ctx context.Context, conn net.Conn, release func()) {
		p.handleUpstream(ctx, conn, ul, release)
	})
	return ul, nil
}

// listenUnix binds a unix socket, replacing a stale socket file left by a
// previous run, and applies mode.
func listenUnix(path string, mode os.FileMode) (net.Listener, error) {
	if fi, err := os.Lstat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
		os.Remove(path)
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
		return fmt.Errorf("authorization of %s failed: %w", peer, err)
	}
	if !d.Allow {
		return &DeniedError{Source: peer, Reason: d.Reason}
	}
	return nil
}

func (p *Proxy) handleInbound(ctx context.Context, conn net.Conn, pl *publicListener, tlsCfg *tls.Config, release func()) {
	handedOff := false
	defer func() {
		if !handedOff {
			release()
		}
	}()
	cfg := pl.cfg.Load()
	start := time.Now()
	hctx, cancel := context.WithTimeout(ctx, cfg.HandshakeTimeoutOrDefault())
	tc := tls.Server(conn, tlsCfg)
	err := tc.HandshakeContext(hctx)
	cancel()
	if err != nil {
		tc.Close()
		var denied *DeniedError
		if errors.As(err, &denied) {
			p.log.Info("inbound connection denied", "source", denied.Source.String(), "reason", denied.Reason, "remote", conn.RemoteAddr().String())
			p.metrics.IncrCounterWithLabels([]string{"inbound", "denied"}, 1, []metrics.Label{{Name: "src", Value: denied.Source.Service}, {Name: "dst", Value: p.service}})
			return
		}
		p.log.Debug("inbound handshake failed", "remote", conn.RemoteAddr().String(), "error", err)
		p.metrics.IncrCounterWithLabels([]string{"inbound", "handshake_failed"}, 1, []metrics.Label{{Name: "dst", Value: p.service}})
		return
	}
	// The peer is authenticated and authorized; only now is the app dialed.
	network, addr := "tcp", cfg.LocalServiceAddress
	if strings.HasPrefix(addr, "unix:") {
		network, addr = "unix", strings.TrimPrefix(addr, "unix:")
	}
	d := net.Dialer{Timeout: cfg.LocalConnectTimeoutOrDefault()}
	app, err := d.DialContext(ctx, network, addr)
	if err != nil {
		p.log.Warn("dialing local app failed", "app", addr, "error", err)
		tc.Close()
		return
	}
	labels := []metrics.Label{{Name: "dst", Value: p.service}}
	p.metrics.IncrCounterWithLabels([]string{"inbound", "conns"}, 1, labels)
	handedOff = true
	Start(tc, app, p.opts.HalfCloseTimeout, func(res Result) {
		defer release()
		p.metrics.IncrCounterWithLabels([]string{"inbound", "rx_bytes"}, float32(res.AToB), labels)
		p.metrics.IncrCounterWithLabels([]string{"inbound", "tx_bytes"}, float32(res.BToA), labels)
		if res.Err != nil && !isClosed(res.Err) {
			src := tc.ConnectionState().PeerCertificates[0].URIs[0].String()
			p.log.Debug("inbound connection ended with error", "source", src, "error", res.Err, "duration", time.Since(start))
		}
	})
}

func (p *Proxy) handleUpstream(ctx context.Context, conn net.Conn, ul *upstreamListener, release func()) {
	handedOff := false
	defer func() {
		if !handedOff {
			release()
		}
	}()
	// Right after start the first endpoint answer may still be on its way;
	// wait for it within the connect timeout rather than fail.
	select {
	case <-ul.up.Ready():
	default:
		t := time.NewTimer(ul.cfg.ConnectTimeoutOrDefault())
		select {
		case <-ul.up.Ready():
		case <-t.C:
		case <-ctx.Done():
		}
		t.Stop()
	}
	tc, ep, releaseEndpoint, err := ul.up.Dial(ctx)
	if err != nil {
		p.log.Warn("upstream dial failed", "upstream", ul.cfg.String(), "error", err)
		p.metrics.IncrCounterWithLabels([]string{"upstream", "dial_failed"}, 1, []metrics.Label{{Name: "dst", Value: ul.cfg.DestinationName}})
		conn.Close()
		return
	}
	labels := []metrics.Label{{Name: "src", Value: p.service}, {Name: "dst_type", Value: ul.cfg.Type()}, {Name: "dst", Value: ul.cfg.DestinationName}}
	p.metrics.IncrCounterWithLabels([]string{"upstream", "conns"}, 1, labels)
	handedOff = true
	Start(conn, tc, p.opts.HalfCloseTimeout, func(res Result) {
		defer release()
		defer releaseEndpoint()
		p.metrics.IncrCounterWithLabels([]string{"upstream", "tx_bytes"}, float32(res.AToB), labels)
		p.metrics.IncrCounterWithLabels([]string{"upstream", "rx_bytes"}, float32(res.BToA), labels)
		if res.Err != nil && !isClosed(res.Err) {
			p.log.Debug("upstream connection ended with error", "upstream", ul.cfg.String(), "endpoint", ep.Addr, "error", res.Err)
		}
	})
}

// Shutdown stops accepting on every listener, lets live connections finish
// until ctx is done, closes what is left, and stops the watches.
func (p *Proxy) Shutdown(ctx context.Context) {
	p.mu.Lock()
	p.shutdown = true
	var srvs []*server
	if p.public != nil {
		srvs = append(srvs, p.public.srv)
	}
	for _, ul := range p.upstreams {
		srvs = append(srvs, ul.srv)
	}
	p.mu.Unlock()
	p.ready.Store(false)
	var wg sync.WaitGroup
	for _, s := range srvs {
		wg.Go(func() { s.Shutdown(ctx) })
	}
	wg.Wait()
	p.cancel()
	p.bg.Wait()
}
