package proxy

import (
	"context"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/straitproxy/strait/config"
	"github.com/straitproxy/strait/metrics"
	"github.com/straitproxy/strait/upstream"
)

// Listener kinds, as /stats shows them.
const (
	kindInbound  = "inbound"  // the public listener
	kindUpstream = "upstream" // an upstream listener
	kindOutbound = "outbound" // a transparent proxy's outbound listener
)

// listener is one bound listener, the public one or an upstream's: its
// accept loop, the connections it handed out (so that it can stop
// accepting, let them finish and force the rest closed), and its
// accounting, shared by its handlers, the shared flush and the admin
// endpoints. It outlives its place in the Proxy while its connections
// drain. What differs between the kinds is handle and the fields marked
// public or upstream.
type listener struct {
	name, kind, addr string
	ln               net.Listener
	log              hclog.Logger
	// handle serves every accepted connection; set before start.
	handle handler
	// admit, if set before start, decides on every accepted connection
	// before a goroutine is started for it; a refused one is closed at
	// once.
	admit func() bool

	// public: the app address and timeouts may change in place.
	cfg atomic.Pointer[config.Public]
	// upstream: its configuration, its endpoints, and the cancel of the
	// context its endpoint watch runs under.
	upCfg  config.Upstream
	up     *upstream.Upstream
	stopUp context.CancelFunc

	ctx    context.Context // cancelled when connections must be abandoned
	cancel context.CancelFunc
	// drainCtx is cancelled when Shutdown starts: tunnels stop taking
	// streams.
	drainCtx   context.Context
	drainStart context.CancelFunc

	mu      sync.Mutex
	conns   map[net.Conn]*liveConn // nil until the connection is proxied
	stopped bool
	started bool
	// wg counts the accept loop, the handler goroutines, and the
	// connections until their release.
	wg sync.WaitGroup

	accepted atomic.Int64
	refused  atomic.Int64 // by admit
	// forced is set when Shutdown's grace ran out and it closed the
	// connections still open, so that they are reported as "shutdown".
	forced atomic.Bool

	// Accounting, set by Proxy.register.
	labels       []metrics.Label
	gauge        *connGauge
	rxKey, txKey []string
	durKey       []string
	proxied      atomic.Int64
	rx, tx       atomic.Int64 // bytes reported so far
	draining     atomic.Bool
}

// handler serves one accepted connection. It must call release exactly once
// when the connection is finished, from any goroutine; it may return before
// that (the copy loop runs on goroutines of its own).
type handler func(ctx context.Context, c net.Conn, release func())

// newListener wraps a bound net.Listener. Nothing is accepted until start.
func newListener(kind, name string, ln net.Listener, log hclog.Logger) *listener {
	l := &listener{name: name, kind: kind, addr: ln.Addr().String(), ln: ln, log: log, conns: make(map[net.Conn]*liveConn)}
	l.ctx, l.cancel = context.WithCancel(context.Background())
	l.drainCtx, l.drainStart = context.WithCancel(context.Background())
	return l
}

// Addr is the bound address.
func (l *listener) Addr() net.Addr { return l.ln.Addr() }

// start runs the accept loop until Shutdown. A listener shut down before
// it started never accepts.
func (l *listener) start() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.stopped || l.started {
		return
	}
	l.started = true
	l.wg.Go(l.serve)
}

func (l *listener) serve() {
	var backoff time.Duration
	for {
		c, err := l.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// EMFILE and friends: back off as net/http does instead of
			// spinning, and keep serving.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			l.log.Error("accept failed", "listener", l.name, "error", err, "retry_in", backoff)
			t := time.NewTimer(backoff)
			select {
			case <-t.C:
				continue
			case <-l.ctx.Done():
				t.Stop()
				return
			}
		}
		backoff = 0
		// accepted is counted last, so that a reader who sees it has seen
		// the connection held or refused.
		if !l.track(c) {
			c.Close()
			return
		}
		if l.admit != nil && !l.admit() {
			l.untrack(c)
			l.refused.Add(1)
			l.accepted.Add(1)
			c.Close()
			continue
		}
		l.accepted.Add(1)
		l.wg.Add(1) // the connection, until release
		var once sync.Once
		release := func() {
			once.Do(func() {
				l.untrack(c)
				l.wg.Done()
			})
		}
		l.wg.Go(func() { l.handle(l.ctx, c, release) })
	}
}

func (l *listener) track(c net.Conn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.stopped {
		return false
	}
	l.conns[c] = nil
	return true
}

// attach records the live state of an accepted connection once it is
// proxied, for the shared metrics flush. c must be the accepted connection.
func (l *listener) attach(c net.Conn, lc *liveConn) {
	l.mu.Lock()
	if _, ok := l.conns[c]; ok {
		l.conns[c] = lc
	}
	l.mu.Unlock()
}

// live returns the proxied connections' state.
func (l *listener) live(buf []*liveConn) []*liveConn {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, lc := range l.conns {
		if lc != nil {
			buf = append(buf, lc)
		}
	}
	return buf
}

func (l *listener) untrack(c net.Conn) {
	l.mu.Lock()
	delete(l.conns, c)
	l.mu.Unlock()
}

// Active returns the number of connections being handled.
func (l *listener) Active() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.conns)
}

// Shutdown stops accepting, waits for live connections to finish until ctx
// is done, then closes whatever is left and waits for the accept loop, the
// handlers and the connections. It is safe to call more than once.
func (l *listener) Shutdown(ctx context.Context) {
	l.mu.Lock()
	l.drainStart()
	l.stopped = true
	l.mu.Unlock()
	l.ln.Close()
	done := make(chan struct{})
	go func() { l.wg.Wait(); close(done) }()
	select {
	case <-done:
		l.cancel()
		return
	case <-ctx.Done():
	}
	l.forced.Store(true)
	l.cancel()
	l.mu.Lock()
	n := len(l.conns)
	for c, lc := range l.conns {
		c.Close()
		if lc != nil && lc.peer != nil {
			lc.peer.Close()
		}
	}
	l.mu.Unlock()
	if n > 0 {
		l.log.Warn("closed connections still open at the end of the drain", "listener", l.name, "connections", n)
	}
	<-done
}
