package proxy

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/straitproxy/strait/metrics"
	"github.com/straitproxy/strait/tlsutil"
)

// revokeCheckTimeout bounds one re-check of a source: a cached intention
// set answers at once; a default decision may need the agent.
const revokeCheckTimeout = 2 * time.Second

// admitted is a proxied inbound connection (classic or tunnel stream) that
// intentions allowed. It stays registered while it is proxied, so that a
// change of the intentions can close it.
type admitted struct {
	src    tlsutil.Identity
	serial string
	kill   func() // abortive close of both sides
	// revoked is set before kill, so the close is logged as revoked.
	revoked atomic.Pointer[string]
}

// admittedSet is the proxy's live inbound connections by source.
type admittedSet struct {
	mu sync.Mutex
	m  map[*admitted]struct{}
}

func (s *admittedSet) add(a *admitted) {
	s.mu.Lock()
	if s.m == nil {
		s.m = make(map[*admitted]struct{})
	}
	s.m[a] = struct{}{}
	s.mu.Unlock()
}

func (s *admittedSet) remove(a *admitted) {
	s.mu.Lock()
	delete(s.m, a)
	s.mu.Unlock()
}

// bySource groups the live connections by source identity and serial
// (the agent's answer may depend on the certificate).
func (s *admittedSet) bySource() map[sourceKey][]*admitted {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[sourceKey][]*admitted)
	for a := range s.m {
		k := sourceKey{a.src, a.serial}
		out[k] = append(out[k], a)
	}
	return out
}

type sourceKey struct {
	id     tlsutil.Identity
	serial string
}

// revokeLoop re-checks every open inbound connection when the intentions
// change, and every DefaultTTL (which also notices a changed default
// policy), closing those whose source is now denied. The built-in proxy
// never re-checks, and Envoy drains the whole listener on any change; here
// only the connections that lost their authorization are closed.
func (p *Proxy) revokeLoop() {
	t := time.NewTicker(p.az.DefaultTTL())
	defer t.Stop()
	for {
		changed := p.az.Changed()
		select {
		case <-p.ctx.Done():
			return
		case <-changed:
		case <-t.C:
		}
		p.revalidate()
	}
}

// revalidate asks the authorizer about every source with open connections
// (one question per source) and closes the connections of those denied.
// A source that cannot be decided (agent unreachable, nothing cached)
// keeps its connections: they were allowed, and nothing says otherwise.
//
// Sources are checked revokeParallel at a time: most answers come from the
// local intention set at once, but sources that no intention matches need
// the agent, and one slow answer must not hold up the others.
func (p *Proxy) revalidate() {
	var g errgroup.Group
	g.SetLimit(revokeParallel)
	for k, conns := range p.admitted.bySource() {
		g.Go(func() error {
			p.recheck(k, conns)
			return nil
		})
	}
	g.Wait()
}

const revokeParallel = 8

func (p *Proxy) recheck(k sourceKey, conns []*admitted) {
	ctx, cancel := context.WithTimeout(p.ctx, revokeCheckTimeout)
	d, err := p.az.Authorize(ctx, k.id, k.serial)
	cancel()
	if err != nil {
		if p.ctx.Err() == nil {
			p.log.Warn("cannot re-check open connections; they stay open", "source", k.id.String(), "error", err)
		}
		return
	}
	if d.Allow {
		return
	}
	reason := d.Reason
	p.log.Info("intentions now deny open connections; closing them", "source", k.id.String(), "connections", len(conns), "reason", reason)
	p.metrics.IncrCounter(metrics.InboundRevoked, float32(len(conns)), []metrics.Label{{Name: "src", Value: k.id.Service}, {Name: "dst", Value: p.service}})
	for _, a := range conns {
		a.revoked.Store(&reason)
		a.kill()
	}
}
