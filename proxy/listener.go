package proxy

import (
	"context"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
)

// server runs one accept loop and tracks the connections it handed out, so
// that it can stop accepting, let them finish, and force the rest closed.
type server struct {
	name   string
	ln     net.Listener
	handle handler
	log    hclog.Logger
	// admit, if set, decides on every accepted connection before a
	// goroutine is started for it; a refused one is closed at once.
	admit func() bool

	ctx    context.Context // cancelled when connections must be abandoned
	cancel context.CancelFunc

	mu     sync.Mutex
	conns  map[net.Conn]*liveConn // nil until the connection is proxied
	closed bool
	// drainCtx is cancelled when Shutdown starts: tunnels stop taking
	// streams.
	drainCtx   context.Context
	drainStart context.CancelFunc
	wg         sync.WaitGroup // accept loop + handlers

	accepted atomic.Int64
	refused  atomic.Int64 // by admit
	// forced is set when Shutdown's grace ran out and it closed the
	// connections still open, so that they are reported as "shutdown".
	forced atomic.Bool
}

// handler serves one accepted connection. It must call release exactly once
// when the connection is finished, from any goroutine; it may return before
// that (the copy loop runs on goroutines of its own).
type handler func(ctx context.Context, c net.Conn, release func())

func newServer(name string, ln net.Listener, log hclog.Logger, admit func() bool, handle handler) *server {
	ctx, cancel := context.WithCancel(context.Background())
	s := &server{name: name, ln: ln, handle: handle, admit: admit, log: log, ctx: ctx, cancel: cancel, conns: make(map[net.Conn]*liveConn)}
	s.drainCtx, s.drainStart = context.WithCancel(context.Background())
	s.wg.Add(1)
	go s.serve()
	return s
}

// Addr is the bound address.
func (s *server) Addr() net.Addr { return s.ln.Addr() }

func (s *server) serve() {
	defer s.wg.Done()
	var backoff time.Duration
	for {
		c, err := s.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// EMFILE and friends: back off as net/http does instead of
			// spinning, and keep serving.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.log.Error("accept failed", "listener", s.name, "error", err, "retry_in", backoff)
			select {
			case <-time.After(backoff):
				continue
			case <-s.ctx.Done():
				return
			}
		}
		backoff = 0
		// accepted is counted last, so that a reader who sees it has seen
		// the connection held or refused.
		if !s.track(c) {
			c.Close()
			return
		}
		if s.admit != nil && !s.admit() {
			s.untrack(c)
			s.refused.Add(1)
			s.accepted.Add(1)
			c.Close()
			continue
		}
		s.accepted.Add(1)
		s.wg.Add(1)
		var once sync.Once
		release := func() {
			once.Do(func() {
				s.untrack(c)
				s.wg.Done()
			})
		}
		go s.handle(s.ctx, c, release)
	}
}

func (s *server) track(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.conns[c] = nil
	return true
}

// attach records the live state of an accepted connection once it is
// proxied, for the shared metrics flush. c must be the accepted connection.
func (s *server) attach(c net.Conn, lc *liveConn) {
	s.mu.Lock()
	if _, ok := s.conns[c]; ok {
		s.conns[c] = lc
	}
	s.mu.Unlock()
}

// live returns the proxied connections' state.
func (s *server) live(buf []*liveConn) []*liveConn {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, lc := range s.conns {
		if lc != nil {
			buf = append(buf, lc)
		}
	}
	return buf
}

func (s *server) untrack(c net.Conn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
}

// Active returns the number of connections being handled.
func (s *server) Active() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

// Shutdown stops accepting, waits for live connections to finish until ctx
// is done, then closes whatever is left and waits for the handlers to
// return. It is safe to call more than once.
func (s *server) Shutdown(ctx context.Context) {
	s.mu.Lock()
	s.drainStart()
	s.closed = true
	s.mu.Unlock()
	s.ln.Close()
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
		s.cancel()
		return
	case <-ctx.Done():
	}
	s.forced.Store(true)
	s.cancel()
	s.mu.Lock()
	n := len(s.conns)
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	if n > 0 {
		s.log.Warn("closed connections still open at the end of the drain", "listener", s.name, "connections", n)
	}
	<-done
}
