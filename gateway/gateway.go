package gateway

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/time/rate"

	"github.com/straitproxy/strait/metrics"
	"github.com/straitproxy/strait/proxy"
)

// Defaults of Options' limits.
const (
	// DefaultHelloTimeout bounds the wait for a connection's ClientHello
	// (Envoy's listener filter timeout is 15s; mesh clients send the hello
	// at once).
	DefaultHelloTimeout = 10 * time.Second
	// DefaultMaxPending bounds the connections whose ClientHello has not
	// arrived yet: each may hold up to MaxHelloRecord bytes, so 1,024 of
	// them hold at most ~16 MiB.
	DefaultMaxPending = 1024
	// DefaultMaxConnections bounds the connections held at once, waiting
	// or proxied: two descriptors each.
	DefaultMaxConnections = 16384
)

// Results of a connection: the result label of gateway.connections, and
// the access log's "result".
const (
	ResultRouted         = "routed"          // proxied to a backend
	ResultUnknownSNI     = "unknown_sni"     // the server name routes nowhere (gateway.unknown_sni says why)
	ResultHelloTimeout   = "hello_timeout"   // no whole ClientHello within the hello timeout
	ResultBadHello       = "bad_hello"       // not TLS, malformed, fragmented or oversized ClientHello
	ResultPeerClosed     = "peer_closed"     // the client left before its ClientHello was complete
	ResultNotReady       = "not_ready"       // the gateway does not know its datacenter or trust domain yet
	ResultWatchLimit     = "watch_limit"     // a new service would exceed the watch limit and none is idle
	ResultNoEndpoints    = "no_endpoints"    // the target has no healthy endpoint
	ResultDialFailed     = "dial_failed"     // no endpoint could be dialed within the connect timeout
	ResultMaxConnections = "max_connections" // refused at accept: the connection limit
	ResultMaxPending     = "max_pending"     // refused at accept: too many connections waiting for a ClientHello
	ResultShutdown       = "shutdown"        // the gateway stopped before the connection was routed
)

// Results lists every result, for declaring the metric's series.
var Results = []string{ResultRouted, ResultUnknownSNI, ResultHelloTimeout, ResultBadHello, ResultPeerClosed,
	ResultNotReady, ResultWatchLimit, ResultNoEndpoints, ResultDialFailed, ResultMaxConnections, ResultMaxPending,
	ResultShutdown}

// Router maps a server name to its target. *Catalog is the Consul-backed
// one.
type Router interface {
	// Route returns the target of sni, waiting within ctx for a new
	// target's first endpoint set. Its errors are *RouteError.
	Route(ctx context.Context, sni string) (*Target, error)
}

// RouteError is why a server name was not routed.
type RouteError struct {
	Result string // ResultUnknownSNI, ResultNotReady or ResultWatchLimit
	Reason string // with ResultUnknownSNI, one of the Unknown* reasons
	Err    error
}

func (e *RouteError) Error() string {
	s := e.Result
	if e.Reason != "" {
		s += " (" + e.Reason + ")"
	}
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	return s
}

func (e *RouteError) Unwrap() error { return e.Err }

// Options configure a Server. Router is required; the rest have useful
// zero values.
type Options struct {
	Router Router
	// Logger for the gateway's own events; AccessLogger gets the access
	// log lines (nil: Logger.Named("access")).
	Logger, AccessLogger hclog.Logger
	// AccessLog: off, on (every connection) or denied-only (connections
	// refused before they were proxied, rate-limited). Empty means
	// denied-only.
	AccessLog proxy.AccessLog
	Metrics   *metrics.Metrics
	// HelloTimeout (DefaultHelloTimeout), MaxPending (DefaultMaxPending)
	// and MaxConnections (DefaultMaxConnections) bound what a client can
	// make the gateway hold.
	HelloTimeout   time.Duration
	MaxPending     int
	MaxConnections int
	// RouteTimeout bounds the wait for a new target's first endpoint set
	// (DefaultConnectTimeout); dialing then gets the target's own connect
	// timeout.
	RouteTimeout time.Duration
	// HalfCloseTimeout is the idle limit once one direction has finished
	// (proxy.DefaultHalfCloseTimeout).
	HalfCloseTimeout time.Duration
}

// Server accepts TLS connections on its listeners and routes each by the
// server name of its ClientHello, without terminating TLS: the hello is
// replayed to the backend and the bytes then move both ways by splice(2).
type Server struct {
	opts   Options
	log    hclog.Logger
	access hclog.Logger
	m      *metrics.Metrics
	dial   dialer

	// ctx is cancelled when Shutdown's grace has run out.
	ctx    context.Context
	cancel context.CancelFunc

	mu      sync.Mutex
	lns     []net.Listener
	conns   map[net.Conn]struct{}
	stopped bool
	pending int
	total   int
	started bool

	active  atomic.Int64
	forced  atomic.Bool
	wg      sync.WaitGroup // accept loops, handlers, connections until done
	flushWG sync.WaitGroup
	flushC  chan struct{}

	results map[string]*atomic.Int64
	unknown map[string]*atomic.Int64
	rx, tx  atomic.Int64

	// refusal lines are rate-limited: a flood of bad clients costs them
	// a connection each and us one counter increment.
	lines      *rate.Limiter
	suppressed atomic.Int64
}

// New returns a Server; it accepts nothing until Serve.
func New(opts Options) *Server {
	if opts.Logger == nil {
		opts.Logger = hclog.NewNullLogger()
	}
	if opts.AccessLogger == nil {
		opts.AccessLogger = opts.Logger.Named("access")
	}
	if opts.Metrics == nil {
		opts.Metrics = metrics.Discard()
	}
	if opts.AccessLog == "" {
		opts.AccessLog = proxy.AccessLogDeniedOnly
	}
	if opts.HelloTimeout <= 0 {
		opts.HelloTimeout = DefaultHelloTimeout
	}
	if opts.MaxPending <= 0 {
		opts.MaxPending = DefaultMaxPending
	}
	if opts.MaxConnections <= 0 {
		opts.MaxConnections = DefaultMaxConnections
	}
	if opts.RouteTimeout <= 0 {
		opts.RouteTimeout = DefaultConnectTimeout
	}
	s := &Server{
		opts: opts, log: opts.Logger, access: opts.AccessLogger, m: opts.Metrics, dial: netDial,
		conns: make(map[net.Conn]struct{}), flushC: make(chan struct{}),
		results: make(map[string]*atomic.Int64), unknown: make(map[string]*atomic.Int64),
		lines: rate.NewLimiter(2, 20),
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	for _, r := range Results {
		s.results[r] = new(atomic.Int64)
		s.m.Declare(metrics.GatewayConnections, []metrics.Label{{Name: "result", Value: r}})
	}
	for _, r := range UnknownReasons {
		s.unknown[r] = new(atomic.Int64)
		s.m.Declare(metrics.GatewayUnknownSNI, []metrics.Label{{Name: "reason", Value: r}})
	}
	return s
}

// Serve accepts connections on ln until Shutdown, on a goroutine of its
// own; it returns at once. A Server may serve several listeners (the LAN
// and the WAN address).
func (s *Server) Serve(ln net.Listener) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped {
		ln.Close()
		return
	}
	s.lns = append(s.lns, ln)
	if !s.started {
		s.started = true
		s.flushWG.Go(s.flushLoop)
	}
	s.wg.Go(func() { s.acceptLoop(ln) })
}

func (s *Server) acceptLoop(ln net.Listener) {
	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.log.Error("accept failed", "addr", ln.Addr().String(), "error", err, "retry_in", backoff)
			t := time.NewTimer(backoff)
			select {
			case <-t.C:
				continue
			case <-s.ctx.Done():
				t.Stop()
				return
			}
		}
		backoff = 0
		if refused := s.admit(c); refused != "" {
			c.Close()
			s.count(refused)
			s.logRefusal(&record{remote: addrString(c.RemoteAddr()), start: time.Now(), result: refused})
			if refused == ResultShutdown {
				return
			}
			continue
		}
		s.wg.Go(func() { s.handle(c) })
	}
}

// admit takes a connection slot and a pending (hello) slot for c, or
// returns why it cannot.
func (s *Server) admit(c net.Conn) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.stopped:
		return ResultShutdown
	case s.total >= s.opts.MaxConnections:
		return ResultMaxConnections
	case s.pending >= s.opts.MaxPending:
		return ResultMaxPending
	}
	s.total++
	s.pending++
	s.conns[c] = struct{}{}
	s.wg.Add(1) // the connection, until finish
	return ""
}

func (s *Server) helloDone() {
	s.mu.Lock()
	s.pending--
	s.mu.Unlock()
}

// finish gives c's connection slot back.
func (s *Server) finish(c net.Conn) {
	s.mu.Lock()
	s.total--
	delete(s.conns, c)
	s.mu.Unlock()
	s.wg.Done()
}

// record is one connection's access log line.
type record struct {
	remote   string
	sni      string
	kind     string
	target   string
	upstream string
	start    time.Time
	rx, tx   int64
	attempts int
	result   string
	reason   string // unknown_sni's reason, or how a proxied connection ended
	detail   string
}

func (s *Server) handle(c net.Conn) {
	rec := &record{remote: addrString(c.RemoteAddr()), start: time.Now()}
	hello, sni, err := ReadHello(c, rec.start.Add(s.opts.HelloTimeout))
	s.helloDone()
	if err != nil {
		if errors.Is(err, ErrNoSNI) {
			rec.reason = UnknownNoSNI
			s.countUnknown(UnknownNoSNI)
		}
		s.refuse(c, rec, helloResult(err), err)
		return
	}
	rec.sni = sni
	routeCtx, cancel := context.WithTimeout(s.ctx, s.opts.RouteTimeout)
	tgt, err := s.opts.Router.Route(routeCtx, sni)
	cancel()
	if err != nil {
		var re *RouteError
		switch {
		case errors.As(err, &re):
			rec.reason = re.Reason
			if re.Result == ResultUnknownSNI {
				s.countUnknown(re.Reason)
			}
			s.refuse(c, rec, re.Result, err)
		case s.ctx.Err() != nil:
			s.refuse(c, rec, ResultShutdown, err)
		default:
			s.refuse(c, rec, ResultNotReady, err)
		}
		return
	}
	n := tgt.Name()
	rec.kind, rec.target = n.Kind, n.Target()
	dialCtx, cancel := context.WithTimeout(s.ctx, tgt.ConnectTimeout())
	bc, ep, attempts, release, err := tgt.dial(dialCtx, s.dial)
	cancel()
	rec.attempts = attempts
	if err != nil {
		result := ResultDialFailed
		switch {
		case errors.Is(err, ErrNoEndpoints):
			result = ResultNoEndpoints
		case s.ctx.Err() != nil:
			result = ResultShutdown
		}
		s.refuse(c, rec, result, err)
		return
	}
	rec.upstream = ep.Addr
	// Replay the ClientHello; the backend's socket buffer takes it
	// whole, so the deadline only guards against a stuck peer.
	bc.SetWriteDeadline(time.Now().Add(tgt.ConnectTimeout()))
	if _, err := bc.Write(hello); err != nil {
		bc.Close()
		release()
		s.refuse(c, rec, ResultDialFailed, fmt.Errorf("replaying the ClientHello to backend %s: %w", ep.Addr, err))
		return
	}
	bc.SetWriteDeadline(time.Time{})
	s.count(ResultRouted)
	s.active.Add(1)
	labels := []metrics.Label{{Name: "kind", Value: rec.kind}, {Name: "target", Value: rec.target}}
	proxy.StartCounted(c, bc, s.opts.HalfCloseTimeout, nil, func(r proxy.Result) {
		s.active.Add(-1)
		release()
		// The hello went to the backend before the copy started.
		rec.rx, rec.tx = r.AToB+int64(len(hello)), r.BToA
		s.rx.Add(rec.rx)
		s.tx.Add(rec.tx)
		s.m.IncrCounter(metrics.GatewayRxBytes, float32(rec.rx), labels)
		s.m.IncrCounter(metrics.GatewayTxBytes, float32(rec.tx), labels)
		s.m.MeasureSince(metrics.GatewayDuration, rec.start, labels[:1])
		rec.result = ResultRouted
		rec.reason, rec.detail = s.endReason(r.Err)
		if s.opts.AccessLog == proxy.AccessLogOn {
			s.writeLine(rec, 0)
		}
		s.finish(c)
	})
}

// refuse closes a connection that was not proxied, counts and logs it.
func (s *Server) refuse(c net.Conn, rec *record, result string, err error) {
	c.Close()
	rec.result = result
	if err != nil {
		rec.detail = err.Error()
	}
	s.count(result)
	s.logRefusal(rec)
	s.finish(c)
}

func (s *Server) count(result string) {
	if ctr, ok := s.results[result]; ok {
		ctr.Add(1)
	}
	s.m.IncrCounter(metrics.GatewayConnections, 1, []metrics.Label{{Name: "result", Value: result}})
}

func (s *Server) countUnknown(reason string) {
	if ctr, ok := s.unknown[reason]; ok {
		ctr.Add(1)
	}
	s.m.IncrCounter(metrics.GatewayUnknownSNI, 1, []metrics.Label{{Name: "reason", Value: reason}})
}

// helloResult classifies a failed ReadHello.
func helloResult(err error) string {
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		return ResultHelloTimeout
	case errors.Is(err, ErrNoSNI):
		return ResultUnknownSNI
	case errors.Is(err, ErrNotTLS), errors.Is(err, ErrBadHello), errors.Is(err, ErrFragmented), errors.Is(err, ErrHelloTooBig):
		return ResultBadHello
	case errors.Is(err, net.ErrClosed):
		return ResultShutdown
	}
	return ResultPeerClosed // EOF, unexpected EOF, reset
}

// Close reasons of proxied connections (the access log's "reason").
const (
	reasonClosed     = "closed"
	reasonReset      = "reset"
	reasonReapedIdle = "reaped_idle"
	reasonShutdown   = "shutdown"
	reasonError      = "error"
)

func (s *Server) endReason(err error) (reason, detail string) { return endReason(err, s.forced.Load()) }

// endReason names how a proxied connection ended; forced means the
// shutdown grace ran out.
func endReason(err error, forced bool) (reason, detail string) {
	switch {
	case err == nil:
		return reasonClosed, ""
	case forced:
		return reasonShutdown, ""
	case errors.Is(err, os.ErrDeadlineExceeded):
		return reasonReapedIdle, ""
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		return reasonReset, err.Error()
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, net.ErrClosed):
		return reasonClosed, err.Error()
	}
	return reasonError, err.Error()
}

// logRefusal writes the access log line of a connection that was not
// proxied (modes on and denied-only), rate-limited.
func (s *Server) logRefusal(rec *record) {
	switch {
	case s.opts.AccessLog == proxy.AccessLogOff:
		return
	case s.opts.AccessLog != proxy.AccessLogOn && rec.result == ResultPeerClosed:
		// A client that left before its hello is not a refusal: health
		// checks (the registration's TCP check every 10s) do exactly
		// that. Counted, logged only with -access-log on.
		return
	}
	if !s.lines.Allow() {
		s.suppressed.Add(1)
		s.m.IncrCounter(metrics.LogSuppressed, 1, []metrics.Label{{Name: "reason", Value: "gateway_refusal"}})
		return
	}
	s.writeLine(rec, s.suppressed.Swap(0))
}

func (s *Server) writeLine(rec *record, suppressed int64) {
	args := []any{
		"remote", rec.remote,
		"sni", rec.sni,
		"result", rec.result,
	}
	if rec.kind != "" {
		args = append(args, "route", rec.kind, "target", rec.target)
	}
	if rec.upstream != "" || rec.attempts > 0 {
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
	if suppressed > 0 {
		args = append(args, "suppressed_before", suppressed)
	}
	s.access.Info("connection", args...)
}

// flushLoop publishes the gauges once a second until Shutdown.
func (s *Server) flushLoop() {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		s.flush()
		select {
		case <-t.C:
		case <-s.flushC:
			s.flush()
			return
		}
	}
}

func (s *Server) flush() {
	s.mu.Lock()
	pending := s.pending
	s.mu.Unlock()
	s.m.SetGauge(metrics.GatewayActive, float32(s.active.Load()), nil)
	s.m.SetGauge(metrics.GatewayPending, float32(pending), nil)
}

// Shutdown stops accepting, lets live connections finish until ctx is
// done, then closes the rest and returns once every goroutine of the
// Server has exited. It is safe to call more than once.
func (s *Server) Shutdown(ctx context.Context) {
	s.mu.Lock()
	first := !s.stopped
	s.stopped = true
	lns := s.lns
	s.mu.Unlock()
	for _, ln := range lns {
		ln.Close()
	}
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		s.forced.Store(true)
		s.cancel()
		s.mu.Lock()
		n := len(s.conns)
		for c := range s.conns {
			c.Close()
		}
		s.mu.Unlock()
		if n > 0 {
			s.log.Warn("closed connections still open at the end of the drain", "connections", n)
		}
		<-done
	}
	s.cancel()
	if first {
		s.mu.Lock()
		started := s.started
		s.mu.Unlock()
		if started {
			close(s.flushC)
		}
	}
	s.flushWG.Wait()
}

// Stats are the Server's counters, for /routes and tests.
type Stats struct {
	Active     int64            `json:"active_connections"`
	Pending    int              `json:"pending_hellos"`
	Held       int              `json:"held_connections"`
	Results    map[string]int64 `json:"connections"`
	UnknownSNI map[string]int64 `json:"unknown_sni"`
	RxBytes    int64            `json:"rx_bytes"`
	TxBytes    int64            `json:"tx_bytes"`
	Listeners  []string         `json:"listeners"`
	Limits     Limits           `json:"limits"`
}

// Limits are the bounds in effect.
type Limits struct {
	MaxConnections int    `json:"max_connections"`
	MaxPending     int    `json:"max_pending"`
	HelloTimeout   string `json:"hello_timeout"`
}

// Stats returns the counters.
func (s *Server) Stats() Stats {
	st := Stats{
		Active: s.active.Load(), Results: map[string]int64{}, UnknownSNI: map[string]int64{},
		RxBytes: s.rx.Load(), TxBytes: s.tx.Load(),
		Limits: Limits{MaxConnections: s.opts.MaxConnections, MaxPending: s.opts.MaxPending, HelloTimeout: s.opts.HelloTimeout.String()},
	}
	s.mu.Lock()
	st.Pending, st.Held = s.pending, s.total
	for _, ln := range s.lns {
		st.Listeners = append(st.Listeners, ln.Addr().String())
	}
	s.mu.Unlock()
	for r, c := range s.results {
		st.Results[r] = c.Load()
	}
	for r, c := range s.unknown {
		st.UnknownSNI[r] = c.Load()
	}
	return st
}

func addrString(a net.Addr) string {
	if a == nil {
		return ""
	}
	return a.String()
}
