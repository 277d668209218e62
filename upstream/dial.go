package upstream

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/straitproxy/strait/tlsutil"
	"github.com/straitproxy/strait/tunnel"
)

// Ejection of failed endpoints: skipped for ejectBase after a failure,
// doubling with each consecutive failure, at most ejectMax. Health checks
// take the usual 10s+ to notice a dead instance; this stops every connection
// in between from paying for it.
const (
	ejectBase = time.Second
	ejectMax  = 30 * time.Second
)

// DialResult is what a Dial reached and what it took.
type DialResult struct {
	Endpoint // the endpoint connected to; zero when the Dial failed
	// Attempts counts the endpoints tried, also when the Dial failed;
	// those beyond the first are retries. One attempt may make more than
	// one handshake (a retry without ALPN, a classic connection when an
	// endpoint's tunnels are full) or none (a stream in a live tunnel).
	Attempts int
}

// DialOptions describe the connection a Dial is for.
type DialOptions struct {
	// Source is the proxied connection's remote address. ring_hash and
	// maglev with a SourceIP hash policy hash its IP; without one (a unix
	// socket client) they pick at random.
	Source net.Addr
	// Direct, when valid, is the original destination of a transparent
	// proxy's connection to an instance registered with DialedDirectly
	// (one of Addresses().Direct): the Dial goes to exactly this address,
	// over mTLS with the identity and SNI of the target the instance
	// belongs to, with no balancing or failover (Consul's passthrough
	// clusters).
	Direct netip.AddrPort
}

func (o DialOptions) sourceIP() netip.Addr {
	switch a := o.Source.(type) {
	case *net.TCPAddr:
		ip, _ := netip.AddrFromSlice(a.IP)
		return ip.Unmap()
	case nil:
		return netip.Addr{}
	}
	if ap, err := netip.ParseAddrPort(o.Source.String()); err == nil {
		return ap.Addr().Unmap()
	}
	return netip.Addr{}
}

// Dial picks an endpoint, dials it and completes the TLS handshake, verifying
// that the server is the endpoint's service. For a service upstream it
// follows the discovery chain: a splitter leg drawn by weight, then the
// leg's resolver's first target (primary, then failover targets in order)
// that has healthy endpoints. Dialing and handshaking all attempts share
// one deadline: ctx's, capped at the resolver's connect timeout (the
// upstream's ConnectTimeout for a prepared query). A failed attempt moves
// on to an endpoint of the target not yet tried in this Dial, up to
// MaxAttempts per target, then to the next target; an attempt on a target
// takes at most that target's own resolver timeout.
//
// The caller must call the returned release func once the proxied connection
// ends, to decrement the endpoint's active count; calling it again is a no-op.
// On error the conn and release func are nil.
func (u *Upstream) Dial(ctx context.Context, opts DialOptions) (*tlsutil.Conn, DialResult, func(), error) {
	c, res, release, err := u.dial(ctx, false, opts)
	if err != nil {
		return nil, res, nil, err
	}
	return c.(*tlsutil.Conn), res, release, nil
}

// DialConn is Dial, except that with a tunnel pool (Options.Tunnels) a
// strait peer that selects tlsutil.ALPNMux gets the connection as a stream
// in a tunnel (a *tunnel.Conn). The first connection to an endpoint is a
// classic one offering ALPNMux; if the peer selects it, that connection
// becomes the endpoint's first tunnel.
func (u *Upstream) DialConn(ctx context.Context, opts DialOptions) (net.Conn, DialResult, func(), error) {
	return u.dial(ctx, u.pool != nil, opts)
}

func (u *Upstream) dial(ctx context.Context, mux bool, opts DialOptions) (net.Conn, DialResult, func(), error) {
	if opts.Direct.IsValid() {
		return u.dialDirect(ctx, mux, opts.Direct)
	}
	caller := ctx
	rt, err := u.route(ctx)
	if err != nil {
		return nil, DialResult{}, nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, rt.timeout)
	defer cancel()

	td := u.tls.TrustDomain()
	if td == "" {
		return nil, DialResult{}, nil, fmt.Errorf("upstream %s: trust domain not known yet", u.name)
	}
	var obuf [8]*targetSnap
	order := rt.order(u.mono(), obuf[:0])
	if len(order) == 0 {
		return nil, DialResult{}, nil, fmt.Errorf("upstream %s: %w%s", u.name, ErrNoEndpoints, rt.describe())
	}
	// budget is the attempts a target gets: one per endpoint, at most
	// MaxAttempts; the last target may retry endpoints up to MaxAttempts.
	budget := func(k int) int {
		if k == len(order)-1 {
			return u.maxAttempts
		}
		return min(u.maxAttempts, len(order[k].set.eps))
	}
	// later[k] is the distinct endpoints planned after target k.
	var lbuf [8]int
	later := lbuf[:min(len(order), len(lbuf))]
	if len(order) > len(lbuf) {
		later = make([]int, len(order))
	}
	for k := len(order) - 2; k >= 0; k-- {
		later[k] = later[k+1] + min(u.maxAttempts, len(order[k+1].set.eps))
	}
	planned := 0
	for k := range order {
		planned += budget(k)
	}
	src := opts.sourceIP()
	var errs []error
	attempt := 0
	stop := false
	for k, t := range order {
		set := t.set
		tried := make([]bool, len(set.eps))
		untried := len(set.eps)
		b := budget(k)
		for n := 0; n < b && ctx.Err() == nil; n++ {
			attempt++
			i := u.pick(set, &rt.lb, tried, src)
			e := set.eps[i]
			// Split what is left of the deadline among the endpoints still to
			// be tried, in this target and the next ones, so that one that
			// black-holes the dial or stalls the handshake cannot use up the
			// time of every failover. The last planned attempt, and any
			// retry of a tried endpoint, get all that is left.
			share := max(1, min(b-n, untried)+later[k])
			if !tried[i] {
				tried[i] = true
				untried--
			}

			e.st.active.Add(1)
			c, err := u.dialOne(ctx, e, td, share, t.ConnectTimeout, mux)
			if err == nil {
				u.succeeded(e.st)
				var once atomic.Bool
				return c, DialResult{e.Endpoint, attempt}, func() {
					if once.CompareAndSwap(false, true) {
						e.st.active.Add(-1)
					}
				}, nil
			}
			e.st.active.Add(-1)
			errs = append(errs, fmt.Errorf("attempt %d to %s: %w", attempt, e.Endpoint, err))
			if caller.Err() != nil || errors.Is(err, tunnel.ErrDenied) {
				stop = true // the caller gave up, or intentions deny us: not the endpoint's fault
				break
			}
			u.failed(e, attempt, err)
		}
		if stop || ctx.Err() != nil {
			break
		}
	}
	if attempt < planned || caller.Err() != nil {
		errs = append(errs, fmt.Errorf("gave up after %d of %d attempts: %w", attempt, planned, context.Cause(ctx)))
	}
	return nil, DialResult{Attempts: attempt}, nil, fmt.Errorf("upstream %s: dial failed: %w", u.name, errors.Join(errs...))
}

// route returns what a Dial uses: for a service upstream a leg of its chain
// (drawn by the splitter's weights), for a prepared query its one endpoint
// set. Only a prepared query with nothing cached makes it wait for Consul.
func (u *Upstream) route(ctx context.Context) (*route, error) {
	if !u.isQuery() {
		snap := u.snap.Load()
		if snap == nil {
			return nil, fmt.Errorf("upstream %s: %w: discovery chain not known yet", u.name, ErrNoEndpoints)
		}
		return snap.pickLeg(), nil
	}
	set, err := u.current(ctx)
	if err != nil {
		return nil, err
	}
	return &route{
		name: u.name, timeout: u.cfg.ConnectTimeoutOrDefault(), lb: defaultBalancer,
		targets: []*targetSnap{{set: set}},
	}, nil
}

// describe says, for an error, which targets were considered.
func (r *route) describe() string {
	if len(r.targets) == 1 && r.targets[0].ID == "" {
		return ""
	}
	var ids []string
	for _, t := range r.targets {
		ids = append(ids, t.ID)
	}
	return " in targets " + strings.Join(ids, ", ")
}

// current returns the endpoint set of a prepared query. Only one with
// nothing cached makes it wait for Consul.
func (u *Upstream) current(ctx context.Context) (*endpointSet, error) {
	set := u.set.Load()
	switch {
	case set == nil:
		var err error
		if set, err = u.firstQuery(ctx); err != nil {
			return nil, err
		}
	case time.Since(set.fetched) >= u.queryTTL:
		select {
		case u.kick <- struct{}{}:
		default: // a refresh is already asked for
		}
	}
	if set == nil {
		return nil, fmt.Errorf("upstream %s: %w: endpoints not discovered yet", u.name, ErrNoEndpoints)
	}
	if len(set.eps) == 0 {
		return nil, fmt.Errorf("upstream %s: %w", u.name, ErrNoEndpoints)
	}
	return set, nil
}

// errNotMux: a tunnel dial to a peer that selected ALPNMux before did not
// get it this time.
var errNotMux = errors.New("peer no longer selects " + tlsutil.ALPNMux)

// dialOne makes one attempt on ep with 1/share of what is left of ctx's
// deadline, and at most limit (a failover target's own resolver timeout;
// 0: no limit).
func (u *Upstream) dialOne(ctx context.Context, ep *endpoint, td string, share int, limit time.Duration, mux bool) (net.Conn, error) {
	if dl, ok := ctx.Deadline(); ok && (share > 1 || limit > 0) {
		d := time.Until(dl) / time.Duration(max(share, 1))
		if limit > 0 {
			d = min(d, limit)
		}
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, d)
		defer cancel()
	}
	e := ep.Endpoint
	id := tlsutil.ServiceID(td, e.Partition, e.Namespace, e.Datacenter, e.Service)
	// Prepared query endpoints get their service's SNI too, not the query SNI (<query>.default.<dc>.query.<td>):
	// the peer presents a certificate for its service, sidecar public
	// listeners ignore SNI, and a gateway on the path routes service SNIs,
	// while a query SNI only means something to an Envoy cluster built for
	// that query.
	//
	// A chain target's endpoints carry the target's SNI (a subset's
	// starts with the subset name), which mesh gateways route on.
	sni := e.SNI
	if sni == "" {
		sni = tlsutil.ServiceSNI(e.Service, e.Namespace, e.Partition, e.Datacenter, td)
	}
	var opts tlsutil.ClientOptions
	gen := u.tls.Generation() // a rotation drains the tunnels of the old one
	// One tunnel per address, identity and SNI: through a mesh gateway the
	// SNI picks the instances (a subset), so streams for two subsets must
	// not share a tunnel.
	key := e.Addr + "|" + id.String() + "|" + sni
	cfgFor := func(o tlsutil.ClientOptions) (*tls.Config, error) { return u.tls.ClientConfig(id, sni, o), nil }
	if e.Peer != "" {
		// A peer's service: its roots, the identities its PeerMeta lists.
		var roots *tlsutil.PeerRoots
		if u.peers != nil {
			roots = u.peers.PeerRoots(e.Peer)
		}
		if roots == nil {
			return nil, fmt.Errorf("%w: peer %s (not known yet, or no such peering)", tlsutil.ErrNoPeerRoots, e.Peer)
		}
		accept := strings.Split(e.PeerIDs, ",")
		gen += "|" + roots.Fingerprint
		key = e.Addr + "|peer " + e.Peer + "|" + e.PeerIDs + "|" + sni
		cfgFor = func(o tlsutil.ClientOptions) (*tls.Config, error) {
			return u.tls.PeerClientConfig(roots, accept, sni, o)
		}
	}
	switch ep.st.peer.kind() {
	case peerStrait:
		opts.ResumeKey = e.Addr
	case peerNoALPN:
		opts.NoALPN = true
	case peerMux:
		opts.ResumeKey = e.Addr
		if !mux {
			break
		}
		c, err := u.pool.Open(ctx, key, gen, e.Service, func(ctx context.Context) (net.Conn, error) {
			cfg, err := cfgFor(tlsutil.ClientOptions{Mux: true})
			if err != nil {
				return nil, err
			}
			tc, err := u.handshake(ctx, e.Addr, cfg)
			if err != nil {
				return nil, err
			}
			if tc.ConnectionState().NegotiatedProtocol != tlsutil.ALPNMux {
				tc.Close()
				ep.st.peer.lostMux()
				return nil, errNotMux
			}
			return tc, nil
		})
		if err == nil {
			return c, nil
		}
		if !errors.Is(err, tunnel.ErrNoRoom) && !errors.Is(err, errNotMux) {
			return nil, err
		}
		u.log.Trace("tunnel unavailable; dialing a classic connection", "addr", e.Addr, "reason", err)
		mux = false // a classic connection, not one more tunnel
	}
	if mux && !opts.NoALPN {
		opts.Mux = true
	}
	cfg, err := cfgFor(opts)
	if err != nil {
		return nil, err
	}
	c, err := u.handshake(ctx, e.Addr, cfg)
	if err != nil && !opts.NoALPN && isALPNRefused(err) {
		// A Go server advertising only h2 (Connect-native services by
		// default) refuses a client that offers only our protocol id.
		ep.st.peer.refusedALPN()
		opts = tlsutil.ClientOptions{NoALPN: true}
		if cfg, err = cfgFor(opts); err != nil {
			return nil, err
		}
		c, err = u.handshake(ctx, e.Addr, cfg)
	}
	if err != nil {
		return nil, err
	}
	cs := c.ConnectionState()
	u.log.Trace("handshake done", "addr", e.Addr, "alpn", cs.NegotiatedProtocol, "resumed", cs.DidResume, "resume_key", opts.ResumeKey != "")
	if opts.NoALPN {
		return c, nil
	}
	if cs.NegotiatedProtocol == tlsutil.ALPNMux && !opts.Mux { // a server must not select what we did not offer
		c.Close()
		return nil, errors.New("peer selected " + tlsutil.ALPNMux + " unoffered")
	}
	ep.st.peer.negotiated(cs.NegotiatedProtocol, opts.Mux)
	if cs.NegotiatedProtocol == tlsutil.ALPNMux {
		tc, err := u.pool.Adopt(ctx, key, gen, c, e.Service)
		if err != nil {
			return nil, err
		}
		return tc, nil
	}
	return c, nil
}

func (u *Upstream) handshake(ctx context.Context, addr string, cfg *tls.Config) (*tlsutil.Conn, error) {
	if cfg == nil {
		return nil, errors.New("no client TLS configuration (leaf certificate not loaded?)")
	}
	raw, err := u.netDialer.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	c := tlsutil.Client(raw, cfg)
	if err := c.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, err
	}
	return c, nil
}

// alertNoApplicationProtocol is the TLS alert a server sends when it
// supports none of the protocols offered by ALPN (RFC 7301).
const alertNoApplicationProtocol = 120

// isALPNRefused recognises the no_application_protocol alert by its code.
// crypto/tls wraps tls.AlertError only on QUIC connections; over TCP a
// received alert is the Err of a *net.OpError, of crypto/tls's unexported
// alert type (golang/go#35234), whose kind is its wire form: one byte.
func isALPNRefused(err error) bool {
	if a, ok := errors.AsType[tls.AlertError](err); ok {
		return a == alertNoApplicationProtocol
	}
	oe, ok := errors.AsType[*net.OpError](err)
	if !ok || oe.Err == nil {
		return false
	}
	v := reflect.ValueOf(oe.Err)
	return v.Type().PkgPath() == "crypto/tls" && v.Kind() == reflect.Uint8 && v.Uint() == alertNoApplicationProtocol
}

func (u *Upstream) succeeded(st *endpointStats) {
	if st.consecutive.Load() != 0 {
		st.consecutive.Store(0)
		st.ejectedUntil.Store(0)
	}
}

func (u *Upstream) failed(e *endpoint, attempt int, err error) {
	st := e.st
	n := st.consecutive.Add(1)
	eject := min(ejectBase<<min(n-1, 5), ejectMax)
	st.ejectedUntil.Store(u.mono() + int64(eject))
	st.mu.Lock()
	st.total++
	st.lastErr = err.Error()
	st.lastFailure = time.Now()
	st.mu.Unlock()

	// Loud once per outage of an endpoint, quiet while it stays down.
	log := u.log.Debug
	if n == 1 {
		log = u.log.Warn
	}
	log("dial attempt failed", "addr", e.Addr, "service", e.Service, "node", e.Node,
		"attempt", attempt, "consecutive_failures", n, "skipped_for", eject, "error", err)
}

// dialDirect dials dst, an instance of one of the chain's targets that is
// dialed directly (see DialOptions.Direct), with its target's identity,
// within the target's connect timeout. The connection is counted on the
// instance's endpoint when it is a healthy one of the target.
func (u *Upstream) dialDirect(ctx context.Context, mux bool, dst netip.AddrPort) (net.Conn, DialResult, func(), error) {
	snap := u.snap.Load()
	if snap == nil || !slices.Contains(snap.addrs.Direct, dst.Addr()) {
		return nil, DialResult{}, nil, fmt.Errorf("upstream %s: %s is not an instance dialed directly", u.name, dst)
	}
	td := u.tls.TrustDomain()
	if td == "" {
		return nil, DialResult{}, nil, fmt.Errorf("upstream %s: trust domain not known yet", u.name)
	}
	var ep *endpoint
	for _, t := range snap.targets {
		if t.set == nil {
			continue
		}
		for _, e := range t.set.eps {
			if ap, err := netip.ParseAddrPort(e.Addr); err == nil && ap.Addr().Unmap() == dst.Addr() && e.Gateway == "" {
				ep = &endpoint{Endpoint: e.Endpoint, st: e.st}
				break
			}
		}
		if ep != nil {
			break
		}
	}
	if ep == nil {
		// Not healthy, or not in a set: dial it all the same, as Consul's
		// passthrough does, with the first target's identity.
		t := snap.targets[0]
		ep = &endpoint{Endpoint: Endpoint{Service: t.Service, Namespace: t.Namespace, Partition: t.Partition,
			Datacenter: t.Datacenter, Target: t.ID, SNI: t.SNI}, st: new(endpointStats)}
	}
	ep.Addr = dst.String()
	timeout := DefaultChainConnectTimeout
	if t := snap.byID[ep.Target]; t != nil {
		timeout = t.ConnectTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	ep.st.active.Add(1)
	c, err := u.dialOne(ctx, ep, td, 1, 0, mux)
	if err != nil {
		ep.st.active.Add(-1)
		return nil, DialResult{Attempts: 1}, nil, fmt.Errorf("upstream %s: direct dial of %s: %w", u.name, dst, err)
	}
	var once atomic.Bool
	return c, DialResult{ep.Endpoint, 1}, func() {
		if once.CompareAndSwap(false, true) {
			ep.st.active.Add(-1)
		}
	}, nil
}
