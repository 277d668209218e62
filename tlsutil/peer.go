package tlsutil

import (
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"slices"
	"strings"
)

// Errors of cluster peer verification.
var (
	ErrNoPeerRoots   = errors.New("no CA roots for the cluster peer")
	ErrUntrustedPeer = errors.New("peer certificate does not chain to the cluster peer's CA")
)

// PeerRoots are the CA roots of one cluster peer, as Consul's peering
// replicates them (/v1/peering/<name> PeerCAPems). They are immutable; a
// change of the peer's roots makes a new PeerRoots.
type PeerRoots struct {
	// Name is our name for the peering.
	Name string
	// TrustDomain is the peer's, from the roots' SPIFFE URI SAN
	// (spiffe://<cluster-id>.consul), lower case.
	TrustDomain string
	Roots       *x509.CertPool
	// Fingerprint identifies the set of roots (a hash of their DER
	// bytes): it changes exactly when the roots do.
	Fingerprint string

	verified verifyCache
}

// NewPeerRoots parses a peer's root PEMs. The trust domain is the host of
// the first root's spiffe:// URI SAN (Consul's CA puts the signing ID
// spiffe://<cluster-id>.consul there); fallbackTD is used when no root
// has one (a Vault or external CA), e.g. the peering's PeerServerName
// with its "server.<dc>.peering." prefix removed.
func NewPeerRoots(name string, pems []string, fallbackTD string) (*PeerRoots, error) {
	p := &PeerRoots{Name: name, Roots: x509.NewCertPool()}
	h := sha256.New()
	var ders [][]byte
	for _, s := range pems {
		rest := []byte(s)
		for {
			var blk *pem.Block
			blk, rest = pem.Decode(rest)
			if blk == nil {
				break
			}
			c, err := x509.ParseCertificate(blk.Bytes)
			if err != nil {
				return nil, fmt.Errorf("peer %s: root certificate: %w", name, err)
			}
			p.Roots.AddCert(c)
			ders = append(ders, c.Raw)
			if p.TrustDomain == "" {
				for _, u := range c.URIs {
					if u.Scheme == "spiffe" && u.Host != "" {
						p.TrustDomain = strings.ToLower(u.Host)
						break
					}
				}
			}
		}
	}
	if len(ders) == 0 {
		return nil, fmt.Errorf("peer %s: %w", name, ErrNoPeerRoots)
	}
	if p.TrustDomain == "" {
		p.TrustDomain = strings.ToLower(fallbackTD)
	}
	if p.TrustDomain == "" {
		return nil, fmt.Errorf("peer %s: no trust domain in its roots' URI SANs", name)
	}
	slices.SortFunc(ders, func(a, b []byte) int { return strings.Compare(string(a), string(b)) })
	for _, d := range ders {
		h.Write(d)
	}
	p.Fingerprint = hex.EncodeToString(h.Sum(nil)[:12])
	return p, nil
}

// SetInboundPeers replaces the cluster peers whose services may connect
// to the public listener: a client certificate in one of their trust
// domains is verified against that peer's roots, and its identity
// carries the peer's name (Identity.Peer) for the authorizer. Consul
// trusts exactly the peers the service is exported to (their trust
// bundles, TrustBundleListByService). nil or empty trusts none.
func (s *Source) SetInboundPeers(peers []*PeerRoots) {
	m := make(map[string]*PeerRoots, len(peers))
	for _, p := range peers {
		if p != nil {
			m[p.TrustDomain] = p
		}
	}
	s.inbound.Store(&m)
}

// InboundPeers returns the peers SetInboundPeers installed, by name.
func (s *Source) InboundPeers() []string {
	m := s.inbound.Load()
	if m == nil {
		return nil
	}
	var out []string
	for _, p := range *m {
		out = append(out, p.Name)
	}
	slices.Sort(out)
	return out
}

// verifyClient verifies a client chain: against our roots when the leaf's
// SPIFFE ID is in our trust domain (or in none we know), against a peer's
// roots when it is in an inbound peer's.
func (s *Source) verifyClient(b *Bundle, certs []*x509.Certificate) (Identity, string, error) {
	if len(certs) > 0 && len(certs[0].URIs) > 0 {
		if m := s.inbound.Load(); m != nil && len(*m) > 0 {
			td := strings.ToLower(certs[0].URIs[0].Host)
			if p := (*m)[td]; p != nil && !strings.EqualFold(td, b.TrustDomain) {
				return verifyPeerChain(p, certs, x509.ExtKeyUsageClientAuth)
			}
		}
	}
	return verifyPeer(b, certs, x509.ExtKeyUsageClientAuth)
}

// verifyPeerChain checks a chain against a cluster peer's roots and
// returns the service identity it names, in the peer's trust domain,
// with Peer set.
func verifyPeerChain(p *PeerRoots, certs []*x509.Certificate, usage x509.ExtKeyUsage) (Identity, string, error) {
	id, serial, err := verifyChainIdentity(p.Roots, &p.verified, certs, usage)
	if err != nil {
		if errors.Is(err, ErrUntrustedChain) {
			return Identity{}, "", fmt.Errorf("%w %s: %w", ErrUntrustedPeer, p.Name, errors.Unwrap(err))
		}
		return Identity{}, "", err
	}
	if !strings.EqualFold(id.TrustDomain, p.TrustDomain) {
		return Identity{}, "", fmt.Errorf("%w: %s, peer %s's is %s", ErrWrongTrustDom, id.TrustDomain, p.Name, p.TrustDomain)
	}
	id.Peer = p.Name
	return id, serial, nil
}

// verifyChainIdentity verifies certs against roots (cache in c) and parses
// the leaf's first URI SAN, which must be a service or a mesh gateway
// identity.
func verifyChainIdentity(roots *x509.CertPool, c *verifyCache, certs []*x509.Certificate, usage x509.ExtKeyUsage) (Identity, string, error) {
	if len(certs) == 0 {
		return Identity{}, "", ErrNoPeerCert
	}
	leaf := certs[0]
	if v, ok := c.get(leaf, usage); ok {
		return v.id, v.serial, nil
	}
	var inter *x509.CertPool
	if len(certs) > 1 {
		inter = x509.NewCertPool()
		for _, x := range certs[1:] {
			inter.AddCert(x)
		}
	}
	chains, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{usage}})
	if err != nil {
		return Identity{}, "", fmt.Errorf("%w: %w", ErrUntrustedChain, err)
	}
	if len(leaf.URIs) == 0 {
		return Identity{}, "", fmt.Errorf("%w: no URI SAN", ErrNotServiceIdent)
	}
	id, err := parseURI(leaf.URIs[0])
	if err != nil {
		return Identity{}, "", err
	}
	if id.Kind != KindService && id.Kind != KindMeshGateway {
		return Identity{}, "", fmt.Errorf("%w: %s", ErrNotServiceIdent, id)
	}
	serial := FormatSerial(leaf.SerialNumber.Bytes())
	c.put(leaf, usage, verified{id: id, serial: serial, notAfter: chainNotAfter(chains)})
	return id, serial, nil
}

type peerClientKey struct {
	roots  *PeerRoots
	accept string
	sni    string
	opts   ClientOptions
}

// maxPeerClientConfigs bounds the cache of peer client configs; beyond it
// the cache starts over (it is rebuilt from use).
const maxPeerClientConfigs = 256

// PeerClientConfig returns the config for dialing a service of cluster
// peer p: the server must chain to p's roots and present exactly one of
// the SPIFFE IDs in accept (the instance's PeerMeta.SpiffeID: the
// service's and its mesh gateway's); sni is PeerMeta.SNI. We present our
// own leaf, which the peer verifies against our roots (its trust bundle
// of us). Configs are shared per (p, accept, sni, opts); a PeerRoots of
// new roots gets configs of its own.
func (s *Source) PeerClientConfig(p *PeerRoots, accept []string, sni string, opts ClientOptions) (*tls.Config, error) {
	if p == nil {
		return nil, ErrNoPeerRoots
	}
	ids := make([]Identity, 0, len(accept))
	for _, a := range accept {
		id, err := ParseID(a)
		if err != nil {
			return nil, fmt.Errorf("peer %s: accepted identity: %w", p.Name, err)
		}
		ids = append(ids, id)
	}
	if len(ids) == 0 {
		return nil, fmt.Errorf("peer %s: no SPIFFE ID to accept", p.Name)
	}
	k := peerClientKey{p, strings.Join(accept, ","), sni, opts}
	s.clientMu.Lock()
	defer s.clientMu.Unlock()
	if c, ok := s.peerCfgs[k]; ok {
		return c, nil
	}
	c := &tls.Config{
		MinVersion:         tls.VersionTLS12,
		CipherSuites:       cipherSuites,
		ServerName:         sni,
		InsecureSkipVerify: true, // verification is done in VerifyConnection below
		NextProtos:         []string{ALPNStrait},
		CurvePreferences:   s.curves,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			b := s.cur.Load()
			if b == nil {
				return nil, ErrNotReady
			}
			return s.presentable(b)
		},
		VerifyConnection: func(cs tls.ConnectionState) error {
			id, _, err := verifyPeerChain(p, cs.PeerCertificates, x509.ExtKeyUsageServerAuth)
			if err != nil {
				return err
			}
			for _, want := range ids {
				if sameIdentity(id, want) {
					return nil
				}
			}
			return fmt.Errorf("%w: got %s, want one of %s", ErrWrongIdentity, id, strings.Join(accept, ", "))
		},
	}
	if opts.NoALPN {
		c.NextProtos = nil
	} else if opts.Mux {
		c.NextProtos = []string{ALPNMux, ALPNStrait}
	}
	if opts.ResumeKey != "" {
		c.ClientSessionCache = tls.NewLRUClientSessionCache(4)
	}
	if s.peerCfgs == nil || len(s.peerCfgs) >= maxPeerClientConfigs {
		s.peerCfgs = make(map[peerClientKey]*tls.Config)
	}
	s.peerCfgs[k] = c
	return c, nil
}
