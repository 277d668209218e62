package tunnel

import (
	"context"
	"errors"
	"io"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/straitproxy/strait/internal/yamux"
)

// ErrNoRoom means every tunnel to the peer is full and no more may be
// dialed; the caller falls back to a classic connection.
var ErrNoRoom = errors.New("tunnel: no room in the pool")

// ErrServerStream is reported to Pool.OnViolation when a server opens a
// stream on a client tunnel, which the protocol does not allow; the tunnel
// is closed for it.
var ErrServerStream = errors.New("tunnel: the server opened a stream")

// spreadStreams is the load at which the pool prefers a new tunnel (while
// it may dial one) to a busier existing one: 32 request/response streams
// on one tunnel queue behind its loops (p99 1.3x classic in make bench).
const spreadStreams = 8

// limitMemory is how long a tunnel keeps the stream count at which its
// server refused a stream as its limit.
const limitMemory = time.Second

// Pool holds client tunnels per key (an endpoint). Safe for concurrent use.
type Pool struct {
	MaxTunnels  int           // per key; 0 means DefaultMaxTunnels
	MaxStreams  int           // per tunnel; 0 means DefaultMaxStreams
	IdleTimeout time.Duration // 0 means DefaultIdleTimeout
	// Budget bounds each tunnel's receive-window growth (see Limits).
	Budget int64
	// OnViolation, if set, is told when a tunnel is closed because the
	// server broke the protocol (ErrServerStream).
	OnViolation func(key string, err error)

	mu     sync.Mutex
	keys   map[string][]*tun
	closed bool
	wg     sync.WaitGroup // one watcher per tunnel

	open    atomic.Int64 // tunnels open
	streams atomic.Int64 // streams handed out and not closed
}

type tun struct {
	sess *yamux.Session
	b    *budget // b.live: the streams yamux knows on this tunnel
	gen  any     // what it was dialed with (the certificate bundle)
	// pending: slots reserved by opens in progress (under Pool.mu).
	pending int
	// limit, when > 0, is a stream count the server refused at: until
	// limitUntil, no new streams while live streams are at or above it
	// (under Pool.mu).
	limit      int
	limitUntil time.Time
	idle       *time.Timer
	dialing    bool
	// draining: the server refused a stream because it is draining; live
	// streams finish, new ones go elsewhere (under Pool.mu).
	draining bool
}

// load is the tunnel's slots in use; p.mu is held.
func (t *tun) load() int {
	if t.dialing {
		return t.pending
	}
	return int(t.b.live.Load()) + t.pending
}

// usable reports whether t may take new streams for gen; p.mu is held.
func (t *tun) usable(gen any) bool { return t.gen == gen && !t.draining }

// Stats reports tunnels open and streams active.
func (p *Pool) Stats() (tunnels, streams int64) { return p.open.Load(), p.streams.Load() }

func (p *Pool) maxTunnels() int {
	if p.MaxTunnels > 0 {
		return p.MaxTunnels
	}
	return DefaultMaxTunnels
}

func (p *Pool) maxStreams() int {
	if p.MaxStreams > 0 {
		return p.MaxStreams
	}
	return DefaultMaxStreams
}

// Open opens a stream to service on the least-loaded live tunnel of key
// dialed with gen, dialing a new tunnel with dial when all are full and
// there is room for one, and returns it once the server has accepted it.
// A stream the server refuses (a limit, a drain) is retried on another
// tunnel; ErrNoRoom means none is left and the caller should dial a
// classic connection. ErrDenied and ErrUnavailable are the server's
// answers. Tunnels of another gen are drained: they take no new streams
// and close when their last stream ends. ctx bounds the whole open.
func (p *Pool) Open(ctx context.Context, key string, gen any, service string, dial func(context.Context) (net.Conn, error)) (*Conn, error) {
	hdr, err := AppendHeader(nil, service)
	if err != nil {
		return nil, err
	}
	var refusedBy []*tun // not asked again in this Open
	for range p.maxTunnels() + 1 {
		if err := ctx.Err(); err != nil {
			return nil, context.Cause(ctx)
		}
		t, err := p.pick(ctx, key, gen, dial, refusedBy)
		if err != nil {
			return nil, err
		}
		c, err := p.openOn(ctx, key, t, hdr)
		if err == nil || !errors.Is(err, errRefused) {
			return c, err
		}
		refusedBy = append(refusedBy, t)
	}
	return nil, ErrNoRoom
}

// Adopt makes an already-handshaken connection that negotiated ALPNMux a
// tunnel of key and opens a stream on it.
func (p *Pool) Adopt(ctx context.Context, key string, gen any, conn net.Conn, service string) (*Conn, error) {
	hdr, err := AppendHeader(nil, service)
	if err != nil {
		conn.Close()
		return nil, err
	}
	t, err := p.newTun(key, conn, gen)
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		t.sess.Close()
		return nil, ErrNoRoom
	}
	t.pending++ // reserved for our stream
	p.keysLocked()[key] = append(p.keys[key], t)
	p.mu.Unlock()
	c, err := p.openOn(ctx, key, t, hdr)
	if errors.Is(err, errRefused) {
		return nil, ErrNoRoom
	}
	return c, err
}

func (p *Pool) keysLocked() map[string][]*tun {
	if p.keys == nil {
		p.keys = make(map[string][]*tun)
	}
	return p.keys
}

// newTun starts a client session on conn and its watcher, which closes
// the tunnel if the server opens a stream and counts the tunnel open
// until its session ends.
func (p *Pool) newTun(key string, conn net.Conn, gen any) (*tun, error) {
	b := newBudget(p.Budget)
	// One incoming stream is let through to the watcher, which reports
	// it and closes the tunnel; yamux resets any beyond it.
	sess, err := yamux.Client(conn, yamuxConfig(1), b.span)
	if err != nil {
		conn.Close()
		return nil, err
	}
	// Under mu, so that no watcher starts once Close waits for them.
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		sess.Close() // waits for the session's loops: not under mu
		return nil, ErrNoRoom
	}
	defer p.mu.Unlock()
	p.open.Add(1)
	p.wg.Go(func() {
		defer p.open.Add(-1)
		st, err := sess.AcceptStream()
		if err != nil {
			return // the session ended
		}
		st.Reset()
		sess.Close()
		if p.OnViolation != nil {
			p.OnViolation(key, ErrServerStream)
		}
	})
	return &tun{sess: sess, b: b, gen: gen}, nil
}

// pick returns a tunnel with a stream slot reserved for the caller.
func (p *Pool) pick(ctx context.Context, key string, gen any, dial func(context.Context) (net.Conn, error), skip []*tun) (*tun, error) {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil, ErrNoRoom
	}
	ts := p.prune(key, gen)
	var best *tun
	usable, dialing := 0, false
	for _, t := range ts {
		if !t.usable(gen) {
			continue
		}
		usable++
		dialing = dialing || t.dialing
		load := t.load()
		if t.dialing || slices.Contains(skip, t) || load >= p.maxStreams() || (t.limit > 0 && load >= t.limit && time.Now().Before(t.limitUntil)) {
			continue
		}
		if best == nil || load < best.load() {
			best = t
		}
	}
	// Spread busy tunnels: while the least-loaded one already carries
	// spreadStreams streams and there is room, dial another rather than
	// queue more streams behind one tunnel's send and receive loops.
	spread := best != nil && best.load() >= spreadStreams && !dialing && usable < p.maxTunnels() && dial != nil
	if best != nil && !spread {
		best.pending++
		p.stopIdle(best)
		p.mu.Unlock()
		return best, nil
	}
	if usable >= p.maxTunnels() || dial == nil {
		p.mu.Unlock()
		return nil, ErrNoRoom
	}
	// Hold a place for the tunnel being dialed.
	ph := &tun{gen: gen, dialing: true, pending: 1}
	p.keysLocked()[key] = append(ts, ph)
	p.mu.Unlock()

	conn, err := dial(ctx)
	var t *tun
	if err == nil {
		t, err = p.newTun(key, conn, gen)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if err != nil {
		p.remove(key, ph)
		return nil, err
	}
	ph.sess, ph.b, ph.dialing = t.sess, t.b, false
	if p.closed {
		ph.sess.Close()
	}
	return ph, nil
}

// prune drops closed tunnels and idle drained ones; p.mu is held.
func (p *Pool) prune(key string, gen any) []*tun {
	ts := p.keys[key]
	out := ts[:0]
	for _, t := range ts {
		if !t.dialing && t.sess.IsClosed() {
			p.stopIdle(t)
			continue
		}
		if !t.dialing && !t.usable(gen) && t.load() == 0 {
			p.stopIdle(t)
			p.wg.Go(func() { t.sess.Close() }) // Close waits for the session's loops; not under p.mu
			continue
		}
		out = append(out, t)
	}
	clear(ts[len(out):])
	if len(out) == 0 {
		delete(p.keys, key)
		return nil
	}
	p.keys[key] = out
	return out
}

func (p *Pool) remove(key string, t *tun) {
	ts := p.keys[key]
	for i, x := range ts {
		if x == t {
			ts = append(ts[:i], ts[i+1:]...)
			break
		}
	}
	if len(ts) == 0 {
		delete(p.keys, key)
	} else {
		p.keys[key] = ts
	}
}

func (p *Pool) stopIdle(t *tun) {
	if t.idle != nil {
		t.idle.Stop()
		t.idle = nil
	}
}

// openOn opens a stream on t, whose slot is reserved, writes the header
// and waits for the server's answer within ctx.
func (p *Pool) openOn(ctx context.Context, key string, t *tun, hdr []byte) (*Conn, error) {
	st, err := t.sess.OpenStream(ctx)
	p.mu.Lock()
	t.pending--
	p.mu.Unlock()
	if err != nil {
		p.idleCheck(key, t)
		return nil, errors.Join(errRefused, err) // the tunnel is gone or full: try another
	}
	answer, err := handshakeStream(ctx, st, hdr)
	if err != nil {
		st.Reset()
		var se *yamux.StreamError
		switch {
		case errors.As(err, &se) && se.Remote && se.ErrorCode == StatusDenied:
			err = ErrDenied
		case errors.As(err, &se) && se.Remote && se.ErrorCode == StatusUnavailable:
			err = ErrUnavailable
		case errors.As(err, &se) && se.Remote && se.ErrorCode == StatusDraining:
			p.mu.Lock()
			t.draining = true
			p.mu.Unlock()
			err = errors.Join(errRefused, err)
		case errors.As(err, &se) && se.Remote && (se.ErrorCode == StatusRate || se.ErrorCode == StatusBusy):
			err = errors.Join(errRefused, err)
		case errors.As(err, &se) && se.Remote:
			// The server's stream limit (StatusRefused, or yamux's own
			// reset, code 0): it has fewer slots than we thought. Learn
			// them; the retry goes to another tunnel.
			p.mu.Lock()
			t.limit, t.limitUntil = max(int(t.b.live.Load()), 1), time.Now().Add(limitMemory)
			p.mu.Unlock()
			err = errors.Join(errRefused, err)
		case ctx.Err() == nil:
			err = errors.Join(errRefused, err) // the tunnel broke: try another
		}
		p.idleCheck(key, t)
		return nil, err
	}
	if answer != StatusOK {
		st.Reset()
		p.idleCheck(key, t)
		return nil, errors.New("tunnel: server answered with an unknown status")
	}
	p.streams.Add(1)
	return NewConn(st, func() {
		p.streams.Add(-1)
		p.idleCheck(key, t)
	}), nil
}

// handshakeStream writes hdr on st and reads the server's answer, within
// ctx.
func handshakeStream(ctx context.Context, st *yamux.Stream, hdr []byte) (byte, error) {
	if dl, ok := ctx.Deadline(); ok {
		st.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { st.SetDeadline(time.Now()) })
	var b [1]byte
	_, err := st.Write(hdr)
	if err == nil {
		_, err = io.ReadFull(st, b[:])
	}
	if !stop() {
		// ctx ended: the deadline may be cut at any moment, so the
		// stream is not handed out even if the answer came in time.
		return 0, context.Cause(ctx)
	}
	if err != nil {
		return 0, err
	}
	st.SetDeadline(time.Time{})
	return b[0], nil
}

// idleCheck arms t's idle timer when it carries no stream.
func (p *Pool) idleCheck(key string, t *tun) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if t.load() > 0 || p.closed {
		return
	}
	p.stopIdle(t)
	idle := p.IdleTimeout
	if idle <= 0 {
		idle = DefaultIdleTimeout
	}
	t.idle = time.AfterFunc(idle, func() {
		p.mu.Lock()
		close := t.load() == 0 && !t.dialing && !p.closed
		if close {
			p.remove(key, t)
			p.wg.Add(1) // Close waits for this close too
		}
		p.mu.Unlock()
		if close {
			t.sess.Close()
			p.wg.Done()
		}
	})
}

// Close closes every tunnel and waits for their watchers.
func (p *Pool) Close() {
	p.mu.Lock()
	p.closed = true
	var sessions []*yamux.Session
	for k, ts := range p.keys {
		for _, t := range ts {
			if !t.dialing {
				sessions = append(sessions, t.sess)
			}
			p.stopIdle(t)
		}
		delete(p.keys, k)
	}
	p.mu.Unlock()
	for _, s := range sessions {
		s.Close()
	}
	p.wg.Wait()
}
