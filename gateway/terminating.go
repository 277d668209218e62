package gateway

import (
	"cmp"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
	"golang.org/x/time/rate"

	"github.com/straitproxy/strait/authz"
	"github.com/straitproxy/strait/internal/watch"
	"github.com/straitproxy/strait/metrics"
	"github.com/straitproxy/strait/proxy"
	"github.com/straitproxy/strait/tlsutil"
)

// Results of a terminating gateway's connection, besides the mesh
// gateway's (routed, unknown_sni, no_endpoints, dial_failed,
// max_connections, shutdown).
const (
	ResultDenied          = "denied"           // intentions refused the client (in the handshake)
	ResultHandshakeFailed = "handshake_failed" // no client certificate, untrusted chain, timeout
	ResultOriginateFailed = "originate_failed" // the TLS handshake with the external service failed
)

// TerminatingResults lists the results a terminating gateway counts.
var TerminatingResults = []string{ResultRouted, ResultUnknownSNI, ResultDenied, ResultHandshakeFailed, ResultPeerClosed,
	ResultNoEndpoints, ResultDialFailed, ResultOriginateFailed, ResultMaxConnections, ResultShutdown}

// DefaultHandshakeTimeout bounds a terminating gateway's TLS handshake
// with a mesh client, intention check included.
const DefaultHandshakeTimeout = 10 * time.Second

// TerminatingOptions configure a Terminating gateway. Client and Name are
// required; the rest have useful zero values.
type TerminatingOptions struct {
	Client *api.Client
	// AgentConfig is the configuration Client was made from; it lets the
	// authorizers' fallback calls to the agent be cancelled
	// (authz.Options.AgentConfig).
	AgentConfig *api.Config
	// Name is the gateway's service name: its linked services are
	// /v1/catalog/gateway-services/<Name>.
	Name string
	// Logger for the gateway's events; AccessLogger for access lines
	// (nil: Logger.Named("access")); AccessLog as for the mesh gateway.
	Logger, AccessLogger hclog.Logger
	AccessLog            proxy.AccessLog
	Metrics              *metrics.Metrics
	// CurvePreferences for the mesh side's handshakes (tlsutil.KeyExchange).
	CurvePreferences []tls.CurveID
	// HandshakeTimeout bounds a client's handshake (DefaultHandshakeTimeout);
	// ConnectTimeout bounds dialing the external service, TLS origination
	// included (DefaultConnectTimeout).
	HandshakeTimeout, ConnectTimeout time.Duration
	// MaxConnections bounds the connections held at once
	// (DefaultMaxConnections); beyond it new ones are closed at accept.
	MaxConnections int
	// HalfCloseTimeout is the idle limit once one direction has finished
	// (proxy.DefaultHalfCloseTimeout).
	HalfCloseTimeout time.Duration
}

// Terminating is strait -gateway terminating: the mesh's door to services
// that run no sidecar. Mesh clients find it in /v1/health/connect/<svc>
// for every service linked to it (a terminating-gateway config entry) and
// dial it with that service's SNI; it terminates their mTLS with the linked
// service's own leaf certificate, authorizes the client with the intentions
// whose destination is the linked service (locally, and again whenever they
// change: a new deny closes the open connections it denies), and dials a
// passing instance of the service (/v1/health/service/<svc>), in plaintext
// or, when the link sets CAFile, over TLS it originates.
type Terminating struct {
	opts   TerminatingOptions
	log    hclog.Logger
	access hclog.Logger
	m      *metrics.Metrics

	ctx    context.Context // cancelled when Shutdown's grace has run out
	cancel context.CancelFunc

	mu      sync.Mutex
	links   map[string]*link // by namespace/name
	lns     []net.Listener
	conns   map[net.Conn]struct{}
	stopped bool
	total   int

	wg      sync.WaitGroup // accept loops and connections
	bg      sync.WaitGroup // links' watches and revocation loops
	ready   chan struct{}
	readyMu sync.Once
	active  atomic.Int64
	forced  atomic.Bool
	results map[string]*atomic.Int64

	lines      *rate.Limiter // refusal lines
	suppressed atomic.Int64
}

// NewTerminating returns a Terminating gateway; it does nothing until Run
// and Serve.
func NewTerminating(opts TerminatingOptions) *Terminating {
	if opts.Logger == nil {
		opts.Logger = hclog.NewNullLogger()
	}
	if opts.AccessLogger == nil {
		opts.AccessLogger = opts.Logger.Named("access")
	}
	if opts.AccessLog == "" {
		opts.AccessLog = proxy.AccessLogDeniedOnly
	}
	if opts.Metrics == nil {
		opts.Metrics = metrics.Discard()
	}
	opts.HandshakeTimeout = cmp.Or(opts.HandshakeTimeout, DefaultHandshakeTimeout)
	opts.ConnectTimeout = cmp.Or(opts.ConnectTimeout, DefaultConnectTimeout)
	opts.MaxConnections = cmp.Or(opts.MaxConnections, DefaultMaxConnections)
	t := &Terminating{
		opts: opts, log: opts.Logger, access: opts.AccessLogger, m: opts.Metrics,
		links: make(map[string]*link), conns: make(map[net.Conn]struct{}),
		ready: make(chan struct{}), results: make(map[string]*atomic.Int64), lines: rate.NewLimiter(2, 20),
	}
	t.ctx, t.cancel = context.WithCancel(context.Background())
	for _, r := range TerminatingResults {
		t.results[r] = new(atomic.Int64)
		t.m.Declare(metrics.GatewayConnections, []metrics.Label{{Name: "result", Value: r}})
	}
	return t
}

// Ready is closed once the linked services have been read once and each
// of them has its certificate and intentions.
func (t *Terminating) Ready() <-chan struct{} { return t.ready }

// Run follows the gateway's linked services until ctx is done, starting
// and stopping their certificate, intention and instance watches. It
// returns once every watch has stopped.
func (t *Terminating) Run(ctx context.Context) {
	watch.Loop(ctx, t.log, "gateway-services "+t.opts.Name, watch.Backoff{}, t.fetchLinks)
	t.mu.Lock()
	for k, l := range t.links {
		l.stop("gateway stopped")
		delete(t.links, k)
	}
	t.mu.Unlock()
	t.bg.Wait()
}

func (t *Terminating) fetchLinks(ctx context.Context, index uint64) (uint64, error) {
	q := &api.QueryOptions{WaitIndex: index, WaitTime: 10 * time.Minute}
	gs, meta, err := t.opts.Client.Catalog().GatewayServices(t.opts.Name, q.WithContext(ctx))
	if err != nil {
		return index, fmt.Errorf("reading the services linked to gateway %q: %w", t.opts.Name, err)
	}
	t.install(ctx, gs)
	return meta.LastIndex, nil
}

// linkSettings are what a terminating-gateway config entry says of one
// linked service.
type linkSettings struct {
	Name, Namespace, Partition string
	CAFile, CertFile, KeyFile  string
	SNI                        string
}

func (s linkSettings) key() string { return cmp.Or(s.Namespace, "default") + "/" + s.Name }

// install starts links that appeared, stops those that went away and
// re-reads the TLS origination files of those whose settings changed.
func (t *Terminating) install(ctx context.Context, gs []*api.GatewayService) {
	want := map[string]linkSettings{}
	for _, g := range gs {
		if g.GatewayKind != "" && g.GatewayKind != api.ServiceKindTerminatingGateway {
			continue
		}
		s := linkSettings{Name: g.Service.Name, Namespace: g.Service.Namespace, Partition: g.Service.Partition,
			CAFile: g.CAFile, CertFile: g.CertFile, KeyFile: g.KeyFile, SNI: g.SNI}
		want[s.key()] = s
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	for k, l := range t.links {
		if _, ok := want[k]; !ok {
			t.log.Info("service unlinked; closing its connections", "service", l.set.Name)
			l.stop("service unlinked from the gateway")
			delete(t.links, k)
		}
	}
	var waits []<-chan struct{}
	for k, s := range want {
		if l, ok := t.links[k]; ok {
			if l.settings() != s {
				l.configure(s)
				t.log.Info("linked service changed", "service", s.Name, "tls_origination", l.originating())
			}
			waits = append(waits, l.ready)
			continue
		}
		if t.stopped {
			continue
		}
		l := t.newLink(ctx, s)
		t.links[k] = l
		waits = append(waits, l.ready)
		t.log.Info("service linked", "service", s.Name, "tls_origination", l.originating())
	}
	t.readyMu.Do(func() {
		t.bg.Go(func() {
			for _, w := range waits {
				select {
				case <-w:
				case <-ctx.Done():
					return
				}
			}
			close(t.ready)
		})
	})
}

// link is one linked service: its identity material, its intentions, its
// passing instances and the connections admitted to it.
type link struct {
	t      *Terminating
	log    hclog.Logger
	src    *tlsutil.Source
	az     *authz.Authorizer
	server *tls.Config
	ready  chan struct{} // closed once certificate and intentions are in

	setMu sync.Mutex
	set   linkSettings
	// origin is the TLS origination config, nil for plaintext; originErr
	// says why the link's files could not be loaded (connections are then
	// refused rather than sent in plaintext).
	origin    atomic.Pointer[tls.Config]
	originErr atomic.Pointer[error]

	endpoints atomic.Pointer[[]string]
	next      atomic.Uint64

	cancel context.CancelFunc
	conns  connSet
}

func (t *Terminating) newLink(parent context.Context, s linkSettings) *link {
	ns, ap := ceScope(s.Namespace), ceScope(s.Partition)
	log := t.log.With("service", s.Name)
	l := &link{t: t, log: log, ready: make(chan struct{})}
	l.src = tlsutil.NewSource(t.opts.Client, s.Name, tlsutil.SourceOptions{
		Namespace: ns, Partition: ap, Logger: log.Named("certs"), CurvePreferences: t.opts.CurvePreferences,
	})
	l.az = authz.New(t.opts.Client, authz.Options{
		Target: s.Name, Namespace: ns, Partition: ap, Logger: log, AgentConfig: t.opts.AgentConfig,
	})
	l.server = l.src.ServerConfig(l.authorize)
	l.configure(s)
	ctx, cancel := context.WithCancel(parent)
	l.cancel = cancel
	t.bg.Go(func() { l.src.Run(ctx) })
	t.bg.Go(func() { l.az.Run(ctx) })
	t.bg.Go(func() {
		watch.Loop(ctx, log, "instances "+s.Name, watch.Backoff{}, func(ctx context.Context, index uint64) (uint64, error) {
			return l.fetchInstances(ctx, index, ns, ap)
		})
	})
	t.bg.Go(func() { l.revokeLoop(ctx) })
	t.bg.Go(func() {
		for _, ch := range []<-chan struct{}{l.src.Ready(), l.az.Ready()} {
			select {
			case <-ch:
			case <-ctx.Done():
				return
			}
		}
		close(l.ready)
	})
	return l
}

// ceScope is a namespace or partition as the agent wants it in a query:
// empty for "default", which Consul CE refuses as a parameter.
func ceScope(s string) string {
	if s == "default" {
		return ""
	}
	return s
}

func (l *link) settings() linkSettings {
	l.setMu.Lock()
	defer l.setMu.Unlock()
	return l.set
}

func (l *link) originating() bool { return l.origin.Load() != nil || l.originErr.Load() != nil }

// configure applies s, loading the TLS origination files when CAFile is
// set. Files are read once per change of the link, as Envoy reads them
// when its cluster changes.
func (l *link) configure(s linkSettings) {
	l.setMu.Lock()
	l.set = s
	l.setMu.Unlock()
	if s.CAFile == "" {
		l.origin.Store(nil)
		l.originErr.Store(nil)
		return
	}
	cfg, err := originConfig(s)
	if err != nil {
		err = fmt.Errorf("TLS origination to %s: %w", s.Name, err)
		l.log.Error("cannot load the link's TLS files; refusing its connections until the link changes", "error", err)
		l.originErr.Store(&err)
		l.origin.Store(nil)
		return
	}
	l.originErr.Store(nil)
	l.origin.Store(cfg)
}

// originConfig is the client TLS config of a link with CAFile: trust
// CAFile, present CertFile/KeyFile when both are set, send SNI and verify
// the server's certificate for it (without SNI, the chain alone).
func originConfig(s linkSettings) (*tls.Config, error) {
	pem, err := os.ReadFile(s.CAFile)
	if err != nil {
		return nil, fmt.Errorf("CAFile: %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("CAFile %s: no PEM certificate", s.CAFile)
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: roots, ServerName: s.SNI}
	if s.CertFile != "" || s.KeyFile != "" {
		cert, err := tls.LoadX509KeyPair(s.CertFile, s.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("CertFile/KeyFile: %w", err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	if s.SNI == "" {
		// Verify the chain only: there is no name to check it against.
		cfg.InsecureSkipVerify = true
		cfg.VerifyConnection = func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("server sent no certificate")
			}
			inter := x509.NewCertPool()
			for _, c := range cs.PeerCertificates[1:] {
				inter.AddCert(c)
			}
			_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter})
			return err
		}
	}
	return cfg, nil
}

// fetchInstances follows the service's passing instances.
func (l *link) fetchInstances(ctx context.Context, index uint64, ns, ap string) (uint64, error) {
	name := l.settings().Name
	q := &api.QueryOptions{WaitIndex: index, WaitTime: 10 * time.Minute, Namespace: ns, Partition: ap}
	entries, meta, err := l.t.opts.Client.Health().Service(name, "", true, q.WithContext(ctx))
	if err != nil {
		return index, fmt.Errorf("reading the instances of %s: %w", name, err)
	}
	eps := make([]string, 0, len(entries))
	for _, e := range entries {
		if e.Service == nil || e.Service.Port == 0 {
			continue
		}
		host := e.Service.Address
		if host == "" && e.Node != nil {
			host = e.Node.Address
		}
		eps = append(eps, net.JoinHostPort(host, strconv.Itoa(e.Service.Port)))
	}
	slices.Sort(eps)
	if old := l.endpoints.Load(); old == nil || !slices.Equal(*old, eps) {
		l.log.Info("instances", "passing", len(eps))
	}
	l.endpoints.Store(&eps)
	return meta.LastIndex, nil
}

// stop ends the link's watches and closes its connections: the gateway no
// longer stands for the service.
func (l *link) stop(why string) {
	l.cancel()
	l.conns.killAll(why)
}

// deniedError is what a refused client's handshake fails with.
type deniedError struct {
	src    tlsutil.Identity
	reason string
}

func (e *deniedError) Error() string {
	return "connection from " + e.src.String() + " denied: " + e.reason
}

func (l *link) authorize(ctx context.Context, src tlsutil.Identity, serial string) error {
	d, err := l.az.Authorize(ctx, src, serial)
	if err != nil {
		return fmt.Errorf("authorizing %s: %w", src, err)
	}
	if !d.Allow {
		return &deniedError{src: src, reason: d.Reason}
	}
	return nil
}

// revokeLoop re-checks the link's open connections when its intentions
// change (and every DefaultTTL, for the default policy), as the proxy's
// public listener does, and closes those now denied.
func (l *link) revokeLoop(ctx context.Context) {
	tk := time.NewTicker(l.az.DefaultTTL())
	defer tk.Stop()
	for {
		changed := l.az.Changed()
		select {
		case <-ctx.Done():
			return
		case <-changed:
		case <-tk.C:
		}
		for k, cs := range l.conns.bySource() {
			cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			d, err := l.az.Authorize(cctx, k.id, k.serial)
			cancel()
			if err != nil || d.Allow {
				continue
			}
			l.log.Info("intentions now deny open connections; closing them", "source", k.id.String(), "connections", len(cs), "reason", d.Reason)
			l.t.m.IncrCounter(metrics.InboundRevoked, float32(len(cs)), []metrics.Label{{Name: "src", Value: k.id.Service}, {Name: "dst", Value: l.settings().Name}})
			for _, c := range cs {
				c.kill(d.Reason)
			}
		}
	}
}

// lookup returns the link whose SNI is sni, or nil.
func (t *Terminating) lookup(sni string) *link {
	name, _, _ := strings.Cut(sni, ".")
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, l := range t.links {
		s := l.settings()
		if s.Name != name {
			continue
		}
		b := l.src.Bundle()
		if b == nil {
			continue
		}
		if strings.EqualFold(sni, tlsutil.ServiceSNI(s.Name, s.Namespace, s.Partition, b.Identity.Datacenter, b.TrustDomain)) {
			return l
		}
	}
	return nil
}

// Serve accepts connections on ln until Shutdown, on a goroutine of its
// own.
func (t *Terminating) Serve(ln net.Listener) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.stopped {
		ln.Close()
		return
	}
	t.lns = append(t.lns, ln)
	t.wg.Go(func() { t.acceptLoop(ln) })
}

func (t *Terminating) acceptLoop(ln net.Listener) {
	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			t.log.Error("accept failed", "addr", ln.Addr().String(), "error", err, "retry_in", backoff)
			select {
			case <-time.After(backoff):
				continue
			case <-t.ctx.Done():
				return
			}
		}
		backoff = 0
		if refused := t.admit(c); refused != "" {
			c.Close()
			t.count(refused)
			t.logLine(&record{remote: addrString(c.RemoteAddr()), start: time.Now(), result: refused})
			continue
		}
		t.wg.Go(func() { t.handle(c) })
	}
}

func (t *Terminating) admit(c net.Conn) string {
	t.mu.Lock()
	defer t.mu.Unlock()
	switch {
	case t.stopped:
		return ResultShutdown
	case t.total >= t.opts.MaxConnections:
		return ResultMaxConnections
	}
	t.total++
	t.conns[c] = struct{}{}
	t.wg.Add(1) // the connection, until finish
	return ""
}

func (t *Terminating) finish(c net.Conn) {
	t.mu.Lock()
	t.total--
	delete(t.conns, c)
	t.mu.Unlock()
	t.wg.Done()
}

var errUnknownSNI = errors.New("server name is no service linked to this gateway")

func (t *Terminating) handle(c net.Conn) {
	rec := &record{remote: addrString(c.RemoteAddr()), start: time.Now(), kind: "terminating"}
	var l *link
	cfg := &tls.Config{GetConfigForClient: func(h *tls.ClientHelloInfo) (*tls.Config, error) {
		rec.sni = h.ServerName
		if l = t.lookup(h.ServerName); l == nil {
			return nil, errUnknownSNI
		}
		return l.server.GetConfigForClient(h)
	}}
	tc := tlsutil.Server(c, cfg)
	hctx, cancel := context.WithTimeout(t.ctx, t.opts.HandshakeTimeout)
	err := tc.HandshakeContext(hctx)
	cancel()
	var denied *deniedError
	switch {
	case errors.Is(err, errUnknownSNI):
		t.refuse(c, rec, ResultUnknownSNI, err)
		return
	case errors.As(err, &denied):
		rec.target = l.settings().Name
		rec.reason = denied.reason
		t.refuse(c, rec, ResultDenied, err)
		return
	case errors.Is(err, io.EOF):
		// Closed before a ClientHello: the registration's TCP check
		// does exactly that every 10s.
		t.refuse(c, rec, ResultPeerClosed, err)
		return
	case err != nil:
		t.refuse(c, rec, ResultHandshakeFailed, err)
		return
	}
	s := l.settings()
	rec.target = s.Name
	src, serial, err := l.src.PeerOf(tc.ConnectionState())
	if err != nil {
		t.refuse(tc, rec, ResultHandshakeFailed, err)
		return
	}
	rec.reason = src.String()
	dctx, cancel := context.WithTimeout(t.ctx, t.opts.ConnectTimeout)
	bc, result, err := l.dial(dctx, rec)
	cancel()
	if err != nil {
		if t.ctx.Err() != nil {
			result = ResultShutdown
		}
		t.refuse(tc, rec, result, err)
		return
	}
	t.count(ResultRouted)
	t.active.Add(1)
	lc := &liveConn{src: src, serial: serial}
	lc.close = func() {
		c.Close()
		bc.Close()
	}
	l.conns.add(lc)
	labels := []metrics.Label{{Name: "kind", Value: "terminating"}, {Name: "target", Value: s.Name}}
	proxy.StartCounted(tc, bc, t.opts.HalfCloseTimeout, nil, func(r proxy.Result) {
		l.conns.remove(lc)
		t.active.Add(-1)
		rec.rx, rec.tx = r.AToB, r.BToA
		t.m.IncrCounter(metrics.GatewayRxBytes, float32(rec.rx), labels)
		t.m.IncrCounter(metrics.GatewayTxBytes, float32(rec.tx), labels)
		t.m.MeasureSince(metrics.GatewayDuration, rec.start, labels[:1])
		rec.result = ResultRouted
		rec.reason, rec.detail = endReason(r.Err, t.forced.Load())
		if why := lc.revoked.Load(); why != nil {
			rec.reason, rec.detail = "revoked", *why
		}
		if t.opts.AccessLog == proxy.AccessLogOn || rec.reason == "revoked" {
			t.writeLine(rec)
		}
		t.finish(c)
	})
}

// dial connects to a passing instance, the next one on failure, within
// ctx; with TLS origination it also completes that handshake.
func (l *link) dial(ctx context.Context, rec *record) (net.Conn, string, error) {
	if p := l.originErr.Load(); p != nil {
		return nil, ResultOriginateFailed, *p
	}
	origin := l.origin.Load()
	eps := l.endpoints.Load()
	if eps == nil || len(*eps) == 0 {
		return nil, ResultNoEndpoints, fmt.Errorf("%w: %s has no passing instance", ErrNoEndpoints, l.settings().Name)
	}
	start := int(l.next.Add(1))
	var errs []error
	for i := range *eps {
		addr := (*eps)[(start+i)%len(*eps)]
		rec.upstream, rec.attempts = addr, i+1
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			errs = append(errs, fmt.Errorf("dialing %s: %w", addr, err))
			if ctx.Err() != nil {
				break
			}
			continue
		}
		if origin == nil {
			return c, "", nil
		}
		tc := tls.Client(c, origin)
		if err := tc.HandshakeContext(ctx); err != nil {
			c.Close()
			return nil, ResultOriginateFailed, fmt.Errorf("TLS origination to %s: %w", addr, err)
		}
		return tc, "", nil
	}
	return nil, ResultDialFailed, errors.Join(errs...)
}

// refuse counts and logs a connection that was not proxied, then closes
// it: whoever sees it closed sees it counted.
func (t *Terminating) refuse(c net.Conn, rec *record, result string, err error) {
	rec.result = result
	if err != nil {
		rec.detail = err.Error()
	}
	t.count(result)
	t.logLine(rec)
	c.Close()
	t.finish(c)
}

func (t *Terminating) count(result string) {
	if ctr, ok := t.results[result]; ok {
		ctr.Add(1)
	}
	t.m.IncrCounter(metrics.GatewayConnections, 1, []metrics.Label{{Name: "result", Value: result}})
}

// logLine writes a refused connection's access line (modes on and
// denied-only), rate-limited as the mesh gateway's.
func (t *Terminating) logLine(rec *record) {
	switch {
	case t.opts.AccessLog == proxy.AccessLogOff:
		return
	case t.opts.AccessLog != proxy.AccessLogOn && rec.result == ResultPeerClosed:
		return
	}
	if !t.lines.Allow() {
		t.suppressed.Add(1)
		t.m.IncrCounter(metrics.LogSuppressed, 1, []metrics.Label{{Name: "reason", Value: "gateway_refusal"}})
		return
	}
	if n := t.suppressed.Swap(0); n > 0 {
		rec.detail += fmt.Sprintf(" (%d lines suppressed before)", n)
	}
	t.writeLine(rec)
}

func (t *Terminating) writeLine(rec *record) {
	args := []any{"remote", rec.remote, "sni", rec.sni, "result", rec.result}
	if rec.target != "" {
		args = append(args, "service", rec.target)
	}
	if rec.upstream != "" {
		args = append(args, "upstream", rec.upstream, "attempts", rec.attempts)
	}
	if rec.result == ResultRouted {
		args = append(args, "rx_bytes", rec.rx, "tx_bytes", rec.tx)
	}
	args = append(args, "duration_ms", float64(time.Since(rec.start).Microseconds())/1000)
	if rec.reason != "" {
		args = append(args, "reason", rec.reason)
	}
	if rec.detail != "" {
		args = append(args, "detail", rec.detail)
	}
	t.access.Info("connection", args...)
}

// Shutdown stops accepting, lets live connections finish until ctx is
// done, then closes the rest; it returns once every connection is done.
// Run's watches stop with Run's context.
func (t *Terminating) Shutdown(ctx context.Context) {
	t.mu.Lock()
	t.stopped = true
	lns := t.lns
	t.mu.Unlock()
	for _, ln := range lns {
		ln.Close()
	}
	done := make(chan struct{})
	go func() { t.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		t.forced.Store(true)
		t.cancel()
		t.mu.Lock()
		for c := range t.conns {
			c.Close()
		}
		t.mu.Unlock()
		<-done
	}
	t.cancel()
}

// LinkView is one linked service in /routes.
type LinkView struct {
	Service         string   `json:"service"`
	Ready           bool     `json:"ready"`
	TLSOrigination  bool     `json:"tls_origination"`
	SNI             string   `json:"sni,omitempty"`
	OriginError     string   `json:"origination_error,omitempty"`
	Instances       []string `json:"instances"`
	OpenConnections int      `json:"open_connections"`
}

// Routes returns the linked services, for /routes.
func (t *Terminating) Routes() []LinkView {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]LinkView, 0, len(t.links))
	for _, l := range t.links {
		s := l.settings()
		v := LinkView{Service: s.Name, TLSOrigination: l.originating(), SNI: s.SNI, OpenConnections: l.conns.len()}
		select {
		case <-l.ready:
			v.Ready = true
		default:
		}
		if p := l.originErr.Load(); p != nil {
			v.OriginError = (*p).Error()
		}
		if eps := l.endpoints.Load(); eps != nil {
			v.Instances = *eps
		}
		out = append(out, v)
	}
	slices.SortFunc(out, func(a, b LinkView) int { return strings.Compare(a.Service, b.Service) })
	return out
}

// Stats returns the connection counters, for /stats.
func (t *Terminating) Stats() Stats {
	st := Stats{Active: t.active.Load(), Results: map[string]int64{},
		Limits: Limits{MaxConnections: t.opts.MaxConnections, HelloTimeout: t.opts.HandshakeTimeout.String()}}
	t.mu.Lock()
	st.Held = t.total
	for _, ln := range t.lns {
		st.Listeners = append(st.Listeners, ln.Addr().String())
	}
	t.mu.Unlock()
	for r, c := range t.results {
		st.Results[r] = c.Load()
	}
	return st
}

// liveConn is a proxied connection that intentions may revoke.
type liveConn struct {
	src     tlsutil.Identity
	serial  string
	close   func()
	revoked atomic.Pointer[string]
}

func (c *liveConn) kill(why string) {
	c.revoked.Store(&why)
	c.close()
}

type sourceKey struct {
	id     tlsutil.Identity
	serial string
}

// connSet is a link's live connections.
type connSet struct {
	mu sync.Mutex
	m  map[*liveConn]struct{}
}

func (s *connSet) add(c *liveConn) {
	s.mu.Lock()
	if s.m == nil {
		s.m = make(map[*liveConn]struct{})
	}
	s.m[c] = struct{}{}
	s.mu.Unlock()
}

func (s *connSet) remove(c *liveConn) {
	s.mu.Lock()
	delete(s.m, c)
	s.mu.Unlock()
}

func (s *connSet) len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.m)
}

func (s *connSet) bySource() map[sourceKey][]*liveConn {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[sourceKey][]*liveConn)
	for c := range s.m {
		k := sourceKey{c.src, c.serial}
		out[k] = append(out[k], c)
	}
	return out
}

func (s *connSet) killAll(why string) {
	s.mu.Lock()
	cs := make([]*liveConn, 0, len(s.m))
	for c := range s.m {
		cs = append(cs, c)
	}
	s.mu.Unlock()
	for _, c := range cs {
		c.kill(why)
	}
}
