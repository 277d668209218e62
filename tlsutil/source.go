package tlsutil

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"

	"github.com/straitproxy/strait/internal/watch"
)

// Bundle is one consistent view of our identity material. It is immutable;
// a rotation replaces the whole Bundle.
type Bundle struct {
	Leaf        *tls.Certificate // Leaf.Leaf is parsed
	Identity    Identity         // from the leaf's URI SAN
	Roots       *x509.CertPool   // every root the agent lists, active or not
	RootIDs     []string         // CA root IDs, for status output
	TrustDomain string
	LeafSerial  string
	NotAfter    time.Time
	NotBefore   time.Time

	// verified remembers peer leaves that chained to these roots, so that
	// resumed sessions and repeat handshakes from the same peer skip the
	// chain's signature checks. It dies with the Bundle on rotation.
	verified verifyCache
}

// Source keeps the leaf certificate for one service and the CA roots current
// through blocking queries against the local agent. Reads are lock-free.
type Source struct {
	client  *api.Client
	service string
	q       api.QueryOptions // namespace / partition for the leaf
	curves  []tls.CurveID
	tunnels bool
	log     hclog.Logger
	now     func() time.Time
	rootsFn RootsFunc
	leafFn  LeafFunc

	mu    sync.Mutex // serialises updates of leaf/roots below
	leaf  *tls.Certificate
	roots *api.CARootList

	cur   atomic.Pointer[Bundle]
	ready chan struct{}
	once  sync.Once

	clientMu   sync.Mutex
	clientCfgs map[clientKey]*tls.Config
	peerCfgs   map[peerClientKey]*tls.Config

	// inbound are the cluster peers whose clients the public listener
	// accepts, by lower-case trust domain (SetInboundPeers).
	inbound atomic.Pointer[map[string]*PeerRoots]
}

// SourceOptions configure a Source. The zero value is valid.
type SourceOptions struct {
	Namespace, Partition string
	Logger               hclog.Logger
	// CurvePreferences for the key exchange of every handshake; nil means
	// Go's default, which puts the post-quantum hybrid X25519MLKEM768
	// first. See KeyExchange.
	CurvePreferences []tls.CurveID
	// Tunnels lets the public listener select ALPNMux when a client
	// offers it (see ServerConfig).
	Tunnels bool
	// Roots and Leaf replace the local agent as the source of the CA roots
	// and of the leaf certificate (agentless mode, package dataplane); nil
	// means the agent's /v1/agent/connect/ca/roots and .../leaf/<service>.
	Roots RootsFunc
	Leaf  LeafFunc
}

// RootsFunc returns the CA roots, blocking while index is still current
// (index 0 answers at once), and the index of what it returns.
type RootsFunc func(ctx context.Context, index uint64) (*api.CARootList, uint64, error)

// LeafFunc returns the leaf certificate and its private key (PEM), blocking
// while the leaf of index is still current (index 0 answers at once), and
// the index of what it returns.
type LeafFunc func(ctx context.Context, index uint64) (certPEM, keyPEM string, next uint64, err error)

// KeyExchange maps the -tls-kex flag to curve preferences: "hybrid" (Go's
// default: X25519MLKEM768, then classic curves) protects recorded traffic
// against a future quantum computer at roughly 25% more handshake CPU than
// "x25519" (X25519 first, no post-quantum share). Peers that do not offer
// the preferred group still negotiate another one.
func KeyExchange(name string) ([]tls.CurveID, error) {
	switch name {
	case "", "hybrid":
		return nil, nil
	case "x25519":
		return []tls.CurveID{tls.X25519, tls.CurveP256}, nil
	}
	return nil, fmt.Errorf("key exchange %q: want hybrid or x25519", name)
}

// NewSource returns a Source for service's leaf. Call Run to start it.
func NewSource(client *api.Client, service string, opts SourceOptions) *Source {
	log := opts.Logger
	if log == nil {
		log = hclog.NewNullLogger()
	}
	s := &Source{
		client:  client,
		service: service,
		q:       api.QueryOptions{Namespace: opts.Namespace, Partition: opts.Partition},
		curves:  opts.CurvePreferences,
		tunnels: opts.Tunnels,
		log:     log,
		now:     time.Now,
		ready:   make(chan struct{}),
		rootsFn: opts.Roots,
		leafFn:  opts.Leaf,
	}
	if s.rootsFn == nil {
		s.rootsFn = s.agentRoots
	}
	if s.leafFn == nil {
		s.leafFn = s.agentLeaf
	}
	return s
}

// agentRoots is the default RootsFunc: the local agent's cached roots.
func (s *Source) agentRoots(ctx context.Context, index uint64) (*api.CARootList, uint64, error) {
	q := &api.QueryOptions{WaitIndex: index, WaitTime: 10 * time.Minute}
	roots, meta, err := s.client.Agent().ConnectCARoots(q.WithContext(ctx))
	if err != nil {
		return nil, index, err
	}
	return roots, meta.LastIndex, nil
}

// agentLeaf is the default LeafFunc: the local agent's leaf, which the
// agent renews by itself.
func (s *Source) agentLeaf(ctx context.Context, index uint64) (string, string, uint64, error) {
	q := s.q
	q.WaitIndex, q.WaitTime = index, 10*time.Minute
	leaf, meta, err := s.client.Agent().ConnectCALeaf(s.service, q.WithContext(ctx))
	if err != nil {
		return "", "", index, err
	}
	return leaf.CertPEM, leaf.PrivateKeyPEM, meta.LastIndex, nil
}

// Ready is closed once a leaf and roots are present and the leaf chains to
// the roots.
func (s *Source) Ready() <-chan struct{} { return s.ready }

// Bundle returns the current material, or nil before Ready.
func (s *Source) Bundle() *Bundle { return s.cur.Load() }

// Generation names the identity material handshakes use now: our leaf
// (its serial) and the CA roots we trust (their IDs); "" before Ready. It
// changes when the leaf is renewed or the roots change, not when the agent
// hands out the same material again.
//
// A classic connection handshakes with the current material by itself; a
// tunnel authenticated its peer once, with the material of its day. So the
// upstream dialer tags tunnels with the Generation they were dialed under,
// and a tunnel of an older one drains: it takes no new streams and closes
// once its streams end, so that new connections are never carried by a
// handshake made with a retired leaf or a peer verified against a root
// that is no longer trusted.
func (s *Source) Generation() string {
	if b := s.cur.Load(); b != nil {
		return b.generation()
	}
	return ""
}

func (b *Bundle) generation() string { return b.LeafSerial + "|" + strings.Join(b.RootIDs, ",") }

// TrustDomain returns the mesh trust domain, or "" before Ready.
func (s *Source) TrustDomain() string {
	if b := s.cur.Load(); b != nil {
		return b.TrustDomain
	}
	return ""
}

// Run watches roots and leaf until ctx is done. Both watches survive agent
// restarts; the last good material stays in use while the agent is away.
func (s *Source) Run(ctx context.Context) {
	var wg sync.WaitGroup
	wg.Go(func() { watch.Loop(ctx, s.log, "ca-roots", watch.Backoff{}, s.watchRoots) })
	wg.Go(func() { watch.Loop(ctx, s.log, "leaf "+s.service, watch.Backoff{}, s.watchLeaf) })
	wg.Wait()
}

func (s *Source) watchRoots(ctx context.Context, index uint64) (uint64, error) {
	roots, last, err := s.rootsFn(ctx, index)
	if err != nil {
		return index, fmt.Errorf("fetching CA roots: %w", err)
	}
	if last != index || s.currentRoots() == nil {
		s.mu.Lock()
		s.roots = roots
		s.mu.Unlock()
		s.rebuild()
	}
	return last, nil
}

func (s *Source) currentRoots() *api.CARootList {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.roots
}

func (s *Source) watchLeaf(ctx context.Context, index uint64) (uint64, error) {
	wait := index
	if b := s.cur.Load(); b != nil && s.lateInLife(b) {
		// The agent renews well before expiry; if we are this late, it has
		// not. Poll rather than block so a renewal is picked up at once.
		remaining := b.NotAfter.Sub(s.now())
		if remaining <= 0 {
			s.log.Error("leaf certificate has EXPIRED and the agent has no newer one; refusing handshakes until it does",
				"service", s.service, "not_after", b.NotAfter)
		} else {
			s.log.Error("leaf certificate is in its last 10% of life and the agent has not renewed it",
				"service", s.service, "not_after", b.NotAfter, "remaining", remaining.Round(time.Second))
		}
		wait = 0
		if !watch.Sleep(ctx, 5*time.Second) {
			return index, ctx.Err()
		}
	}
	certPEM, keyPEM, last, err := s.leafFn(ctx, wait)
	if err != nil {
		return index, fmt.Errorf("fetching leaf certificate for %q: %w", s.service, err)
	}
	if last == index && s.cur.Load() != nil {
		return index, nil
	}
	cert, err := tls.X509KeyPair([]byte(certPEM), []byte(keyPEM))
	if err != nil {
		return index, fmt.Errorf("parsing leaf certificate for %q: %w", s.service, err)
	}
	s.mu.Lock()
	s.leaf = &cert
	s.mu.Unlock()
	s.rebuild()
	return last, nil
}

// lateInLife reports whether b's leaf is in the last 10% of its validity.
func (s *Source) lateInLife(b *Bundle) bool {
	life := b.NotAfter.Sub(b.NotBefore)
	return s.now().After(b.NotAfter.Add(-life / 10))
}

// rebuild assembles a new Bundle from the latest leaf and roots and publishes
// it if it is consistent.
func (s *Source) rebuild() {
	s.mu.Lock()
	leaf, roots := s.leaf, s.roots
	s.mu.Unlock()
	if leaf == nil || roots == nil {
		return
	}
	b, err := NewBundle(leaf, roots)
	if err != nil {
		// A leaf signed by a root we do not have yet (or the reverse) is a
		// normal transient during CA rotation: the other watch catches up.
		s.log.Warn("certificate material not consistent yet; keeping the previous set", "error", err)
		return
	}
	prev := s.cur.Swap(b)
	s.clientMu.Lock()
	s.clientCfgs = nil // new trust material: drop session caches with it
	s.clientMu.Unlock()
	if prev == nil {
		s.log.Info("certificates ready", "id", b.Identity.String(), "serial", b.LeafSerial, "not_after", b.NotAfter, "roots", len(b.RootIDs))
	} else if prev.LeafSerial != b.LeafSerial || strings.Join(prev.RootIDs, ",") != strings.Join(b.RootIDs, ",") {
		s.log.Info("certificates rotated", "serial", b.LeafSerial, "not_after", b.NotAfter, "roots", strings.Join(b.RootIDs, ","))
	}
	s.once.Do(func() { close(s.ready) })
}

// NewBundle checks that leaf chains to one of roots and builds a Bundle.
func NewBundle(leaf *tls.Certificate, roots *api.CARootList) (*Bundle, error) {
	if len(leaf.Certificate) == 0 {
		return nil, errors.New("empty leaf certificate")
	}
	x, err := x509.ParseCertificate(leaf.Certificate[0])
	if err != nil {
		return nil, fmt.Errorf("parsing leaf: %w", err)
	}
	if len(x.URIs) == 0 {
		return nil, errors.New("leaf has no URI SAN")
	}
	id, err := parseURI(x.URIs[0])
	if err != nil {
		return nil, fmt.Errorf("leaf identity: %w", err)
	}
	b := &Bundle{
		Identity:    id,
		Roots:       x509.NewCertPool(),
		TrustDomain: roots.TrustDomain,
		LeafSerial:  FormatSerial(x.SerialNumber.Bytes()),
		NotAfter:    x.NotAfter,
		NotBefore:   x.NotBefore,
	}
	for _, r := range roots.Roots {
		if !addPEM(b.Roots, r.RootCertPEM) {
			return nil, fmt.Errorf("CA root %s: no certificate in PEM", r.ID)
		}
		b.RootIDs = append(b.RootIDs, r.ID)
	}
	if b.TrustDomain == "" {
		b.TrustDomain = id.TrustDomain
	}
	if !strings.EqualFold(id.TrustDomain, b.TrustDomain) {
		return nil, fmt.Errorf("leaf trust domain %q is not the mesh's %q", id.TrustDomain, b.TrustDomain)
	}
	// Consul's CertPEM carries the intermediates after the leaf.
	inter := x509.NewCertPool()
	for _, der := range leaf.Certificate[1:] {
		if c, err := x509.ParseCertificate(der); err == nil {
			inter.AddCert(c)
		}
	}
	if _, err := x.Verify(x509.VerifyOptions{Roots: b.Roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return nil, fmt.Errorf("leaf does not chain to the CA roots: %w", err)
	}
	l := *leaf
	l.Leaf = x
	b.Leaf = &l
	return b, nil
}

func addPEM(pool *x509.CertPool, s string) bool {
	ok := false
	rest := []byte(s)
	for {
		var blk *pem.Block
		blk, rest = pem.Decode(rest)
		if blk == nil {
			return ok
		}
		if c, err := x509.ParseCertificate(blk.Bytes); err == nil {
			pool.AddCert(c)
			ok = true
		}
	}
}

// FormatSerial renders a serial as Consul does: colon-separated hex bytes.
func FormatSerial(b []byte) string {
	const hex = "0123456789abcdef"
	out := make([]byte, 0, len(b)*3)
	for i, c := range b {
		if i > 0 {
			out = append(out, ':')
		}
		out = append(out, hex[c>>4], hex[c&0xf])
	}
	return string(out)
}
