package tunnel

import (
	"context"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/yamux"
)

// ErrNoRoom means every tunnel to the peer is full and no more may be
// dialed; the caller falls back to a classic connection.
var ErrNoRoom = errors.New("tunnel: no room in the pool")

// Pool holds client tunnels per key (an endpoint). Safe for concurrent use.
type Pool struct {
	MaxTunnels  int           // per key; 0 means DefaultMaxTunnels
	MaxStreams  int           // per tunnel; 0 means DefaultMaxStreams
	IdleTimeout time.Duration // 0 means DefaultIdleTimeout

	mu   sync.Mutex
	keys map[string][]*tun

	open    atomic.Int64 // tunnels open
	streams atomic.Int64 // streams active
}

type tun struct {
	sess    *yamux.Session
	gen     any // what it was dialed with (the certificate bundle)
	streams int // under Pool.mu
	idle    *time.Timer
	dialing bool
	// goneAway: the server sent GoAway (it is shutting down); live
	// streams finish, new ones go elsewhere.
	goneAway bool
}

// usable reports whether t may take new streams for gen; p.mu is held.
func (t *tun) usable(gen any) bool { return t.gen == gen && !t.goneAway }

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
// there is room for one. Tunnels of another gen are drained: they take no
// new streams and close when their last stream ends. The stream header is
// written before Open returns.
func (p *Pool) Open(ctx context.Context, key string, gen any, service string, dial func(context.Context) (net.Conn, error)) (*Conn, error) {
	hdr, err := AppendHeader(nil, service)
	if err != nil {
		return nil, err
	}
	for range 3 {
		t, err := p.pick(ctx, key, gen, dial)
		if err != nil {
			return nil, err
		}
		c, err := p.openOn(key, t, hdr)
		if err == nil {
			return c, nil
		}
	}
	return nil, ErrNoRoom
}

// Adopt makes an already-handshaken connection that negotiated ALPNMux a
// tunnel of key and opens a stream on it.
func (p *Pool) Adopt(key string, gen any, conn net.Conn, service string) (*Conn, error) {
	hdr, err := AppendHeader(nil, service)
	if err != nil {
		conn.Close()
		return nil, err
	}
	t, err := p.newTun(conn, gen)
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	t.streams++ // reserved for our stream
	p.keysLocked()[key] = append(p.keys[key], t)
	p.mu.Unlock()
	return p.openReserved(key, t, hdr)
}

func (p *Pool) keysLocked() map[string][]*tun {
	if p.keys == nil {
		p.keys = make(map[string][]*tun)
	}
	return p.keys
}

func (p *Pool) newTun(conn net.Conn, gen any) (*tun, error) {
	sess, err := yamux.Client(newCoalescer(conn), YamuxConfig(p.maxStreams()))
	if err != nil {
		conn.Close()
		return nil, err
	}
	p.open.Add(1)
	t := &tun{sess: sess, gen: gen}
	go func() {
		<-sess.CloseChan()
		p.open.Add(-1)
	}()
	return t, nil
}

// pick returns a tunnel with a stream slot reserved for the caller.
func (p *Pool) pick(ctx context.Context, key string, gen any, dial func(context.Context) (net.Conn, error)) (*tun, error) {
	p.mu.Lock()
	ts := p.prune(key, gen)
	var best *tun
	usable := 0
	for _, t := range ts {
		if !t.usable(gen) {
			continue
		}
		usable++
		if t.dialing || t.streams >= p.maxStreams() {
			continue
		}
		if best == nil || t.streams < best.streams {
			best = t
		}
	}
	if best != nil {
		best.streams++
		p.stopIdle(best)
		p.mu.Unlock()
		return best, nil
	}
	if usable >= p.maxTunnels() || dial == nil {
		p.mu.Unlock()
		return nil, ErrNoRoom
	}
	// Hold a place for the tunnel being dialed.
	ph := &tun{gen: gen, dialing: true, streams: 1}
	p.keysLocked()[key] = append(ts, ph)
	p.mu.Unlock()

	conn, err := dial(ctx)
	var t *tun
	if err == nil {
		t, err = p.newTun(conn, gen)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if err != nil {
		p.remove(key, ph)
		return nil, err
	}
	ph.sess, ph.dialing = t.sess, false
	return ph, nil
}

// prune drops closed tunnels and idle drained ones; p.mu is held.
func (p *Pool) prune(key string, gen any) []*tun {
	ts := p.keys[key]
	out := ts[:0]
	for _, t := range ts {
		if !t.dialing && t.sess.IsClosed() {
			continue
		}
		if !t.dialing && !t.usable(gen) && t.streams == 0 {
			t.sess.Close()
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

func (p *Pool) openOn(key string, t *tun, hdr []byte) (*Conn, error) {
	c, err := p.openReserved(key, t, hdr)
	return c, err
}

// openReserved opens a stream on t, whose slot is already reserved.
func (p *Pool) openReserved(key string, t *tun, hdr []byte) (*Conn, error) {
	st, err := t.sess.OpenStream()
	if err == nil {
		if _, err = st.Write(hdr); err != nil {
			st.Close()
		}
	}
	if err != nil {
		if errors.Is(err, yamux.ErrRemoteGoAway) {
			p.mu.Lock()
			t.goneAway = true
			p.mu.Unlock()
		}
		p.done(key, t)
		return nil, err
	}
	p.streams.Add(1)
	return NewConn(st, func() {
		p.streams.Add(-1)
		p.done(key, t)
	}), nil
}

// done gives back t's stream slot and arms the idle timer at zero.
func (p *Pool) done(key string, t *tun) {
	p.mu.Lock()
	defer p.mu.Unlock()
	t.streams--
	if t.streams > 0 {
		return
	}
	if t.idle != nil {
		t.idle.Stop()
	}
	idle := p.IdleTimeout
	if idle <= 0 {
		idle = DefaultIdleTimeout
	}
	t.idle = time.AfterFunc(idle, func() {
		p.mu.Lock()
		defer p.mu.Unlock()
		if t.streams == 0 {
			t.sess.Close()
			p.remove(key, t)
		}
	})
}

// Close closes every tunnel.
func (p *Pool) Close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for k, ts := range p.keys {
		for _, t := range ts {
			if !t.dialing {
				t.sess.Close()
			}
			p.stopIdle(t)
		}
		delete(p.keys, k)
	}
}
