package tlsutil

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Authorizer decides whether an authenticated peer may connect. It runs
// inside the handshake (VerifyConnection), so it must be fast; ctx is the
// handshake's context and bounds any fallback call it makes. A non-nil error
// refuses the connection and is what the peer's handshake fails with.
type Authorizer func(ctx context.Context, peer Identity, serial string) error

// cipherSuites are the TLS 1.2 suites Consul's built-in proxy and Envoy
// agree on (TLS 1.3 suites are not configurable in Go).
var cipherSuites = []uint16{
	tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
	tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
	tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
	tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
	tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
	tls.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
}

// Errors from peer verification, for callers that count reasons.
var (
	ErrNotReady        = errors.New("certificates not ready")
	ErrLeafExpired     = errors.New("our leaf certificate has expired")
	ErrNoPeerCert      = errors.New("peer sent no certificate")
	ErrUntrustedChain  = errors.New("peer certificate does not chain to the mesh CA")
	ErrWrongTrustDom   = errors.New("peer is in another trust domain")
	ErrWrongIdentity   = errors.New("peer identity is not the expected one")
	ErrNotServiceIdent = errors.New("peer identity is not a service")
)

// ALPNStrait is the ALPN protocol id by which two strait proxies recognise
// each other. A strait client offers it; a strait server selects it only when
// offered and otherwise offers no ALPN at all, so built-in proxies, Envoy
// and Connect-native peers see exactly what they see today. Selecting it
// promises that the server authorizes every connection, resumed TLS sessions
// included, which is what lets strait clients resume sessions with it.
const ALPNStrait = "strait/1"

// ALPNMux is the ALPN protocol id of a strait tunnel: a long-lived mTLS
// connection carrying many application connections as yamux streams (see
// package tunnel). A strait client with tunnels enabled offers it before
// ALPNStrait; a strait server with tunnels enabled selects it when offered.
// Selecting it carries ALPNStrait's promise and more: the server authorizes
// every stream against intentions with the tunnel's verified peer identity.
const ALPNMux = "strait-mux/2"

// ServerConfig returns the public listener's TLS config. Every handshake
// gets a config built from the material current at that moment, so a
// rotated leaf or root set applies to new handshakes at once while existing
// connections are untouched. Client certificates are required, verified
// against the roots for ClientAuth, must be in our trust domain, and are
// then authorized (a client of a cluster peer the service is exported to
// is verified against that peer's roots instead, see SetInboundPeers); all
// of this runs in VerifyConnection, which Go calls on
// resumed sessions too. No ALPN protocol is offered.
func (s *Source) ServerConfig(authorize Authorizer) *tls.Config {
	base := &tls.Config{MinVersion: tls.VersionTLS12}
	base.GetConfigForClient = func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
		b := s.cur.Load()
		if b == nil {
			return nil, ErrNotReady
		}
		ctx := hello.Context()
		var protos []string
		if s.tunnels && slices.Contains(hello.SupportedProtos, ALPNMux) {
			protos = []string{ALPNMux}
		} else if slices.Contains(hello.SupportedProtos, ALPNStrait) {
			protos = []string{ALPNStrait}
		}
		return &tls.Config{
			NextProtos:       protos,
			CurvePreferences: s.curves,
			MinVersion:       tls.VersionTLS12,
			CipherSuites:     cipherSuites,
			ClientAuth:       tls.RequireAnyClientCert,
			GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
				return s.presentable(b)
			},
			VerifyConnection: func(cs tls.ConnectionState) error {
				id, serial, err := s.verifyClient(b, cs.PeerCertificates)
				if err != nil {
					return err
				}
				if authorize == nil {
					return nil
				}
				return authorize(ctx, id, serial)
			},
		}, nil
	}
	return base
}

// ClientOptions select how a dial presents itself.
type ClientOptions struct {
	// NoALPN offers no ALPN protocol. Go servers that advertise only h2
	// (Connect-native services by default) refuse a client whose only
	// offer is ALPNStrait, so such peers are dialed without it.
	NoALPN bool
	// ResumeKey, when set, gives the config a session cache of its own
	// (one per key, normally per endpoint address). Only set it for a peer
	// that selected ALPNStrait: Consul's built-in proxy and Connect-native
	// servers authorize in VerifyPeerCertificate, which Go skips on resumed
	// sessions, so resuming with them would walk past a deny intention.
	ResumeKey string
	// Mux offers ALPNMux before ALPNStrait. The caller must then check
	// NegotiatedProtocol: ALPNMux means the connection is a tunnel.
	Mux bool
}

type clientKey struct {
	expected Identity
	sni      string
	opts     ClientOptions
}

// ClientConfig returns the config for dialing a peer that must present
// exactly the expected identity. Configs are shared per (expected, sni,
// opts). The server check runs on every handshake, resumed or not.
func (s *Source) ClientConfig(expected Identity, sni string, opts ClientOptions) *tls.Config {
	k := clientKey{expected, sni, opts}
	s.clientMu.Lock()
	defer s.clientMu.Unlock()
	if c, ok := s.clientCfgs[k]; ok {
		return c
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
			b := s.cur.Load()
			if b == nil {
				return ErrNotReady
			}
			id, _, err := verifyPeer(b, cs.PeerCertificates, x509.ExtKeyUsageServerAuth)
			if err != nil {
				return err
			}
			if !sameIdentity(id, expected) {
				return fmt.Errorf("%w: got %s, want %s", ErrWrongIdentity, id, expected)
			}
			return nil
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
	if s.clientCfgs == nil {
		s.clientCfgs = make(map[clientKey]*tls.Config)
	}
	s.clientCfgs[k] = c
	return c
}

// presentable returns b's leaf unless it has expired: presenting an expired
// certificate only moves the failure to the peer and hides it from us.
func (s *Source) presentable(b *Bundle) (*tls.Certificate, error) {
	if s.now().After(b.NotAfter) {
		return nil, fmt.Errorf("%w (not after %s)", ErrLeafExpired, b.NotAfter)
	}
	return b.Leaf, nil
}

// verifyPeer checks a peer chain against b's roots for the given usage and
// returns the peer's service identity and serial.
func verifyPeer(b *Bundle, certs []*x509.Certificate, usage x509.ExtKeyUsage) (Identity, string, error) {
	if len(certs) == 0 {
		return Identity{}, "", ErrNoPeerCert
	}
	leaf := certs[0]
	if v, ok := b.verified.get(leaf, usage); ok {
		return v.id, v.serial, nil
	}
	var inter *x509.CertPool
	if len(certs) > 1 {
		inter = x509.NewCertPool()
		for _, c := range certs[1:] {
			inter.AddCert(c)
		}
	}
	chains, err := leaf.Verify(x509.VerifyOptions{Roots: b.Roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{usage}})
	if err != nil {
		return Identity{}, "", fmt.Errorf("%w: %w", ErrUntrustedChain, err)
	}
	id, serial, err := peerIdentity(b, leaf)
	if err != nil {
		return Identity{}, "", err
	}
	b.verified.put(leaf, usage, verified{id: id, serial: serial, notAfter: chainNotAfter(chains)})
	return id, serial, nil
}

// peerIdentity extracts and checks the service identity of a verified leaf.
func peerIdentity(b *Bundle, leaf *x509.Certificate) (Identity, string, error) {
	if len(leaf.URIs) == 0 {
		return Identity{}, "", fmt.Errorf("%w: no URI SAN", ErrNotServiceIdent)
	}
	id, err := parseURI(leaf.URIs[0])
	if err != nil {
		return Identity{}, "", err
	}
	if id.Kind != KindService {
		return Identity{}, "", fmt.Errorf("%w: %s", ErrNotServiceIdent, id)
	}
	if !strings.EqualFold(id.TrustDomain, b.TrustDomain) {
		return Identity{}, "", fmt.Errorf("%w: %s, ours is %s", ErrWrongTrustDom, id.TrustDomain, b.TrustDomain)
	}
	return id, FormatSerial(leaf.SerialNumber.Bytes()), nil
}

// sameIdentity compares identities as Consul names them: trust domains and
// datacenters are case-insensitive DNS names, the rest exact.
func sameIdentity(a, b Identity) bool {
	return a.Kind == b.Kind && strings.EqualFold(a.TrustDomain, b.TrustDomain) &&
		a.Partition == b.Partition && a.Namespace == b.Namespace &&
		strings.EqualFold(a.Datacenter, b.Datacenter) && a.Service == b.Service
}

// verifyCache maps a peer leaf (its DER bytes) and key usage to the result
// of verifying it against one Bundle's roots. Entries expire with the
// earliest NotAfter of the verified chain; the cache stops growing at
// verifyCacheMax entries (a mesh has far fewer distinct peer leaves). n
// counts the entries: it changes only with an insert or delete that
// happened, so it never drifts from the map's size.
type verifyCache struct {
	m sync.Map // verifyKey -> verified
	n atomic.Int64
}

const verifyCacheMax = 4096

type verifyKey struct {
	der   string
	usage x509.ExtKeyUsage
}

type verified struct {
	id       Identity
	serial   string
	notAfter time.Time
}

func (c *verifyCache) get(leaf *x509.Certificate, usage x509.ExtKeyUsage) (verified, bool) {
	v, ok := c.m.Load(verifyKey{string(leaf.Raw), usage})
	if !ok {
		return verified{}, false
	}
	e := v.(verified)
	if !time.Now().Before(e.notAfter) {
		// Only the caller that removes this very entry counts it: another
		// may have removed it already, or replaced it with a fresh one.
		if c.m.CompareAndDelete(verifyKey{string(leaf.Raw), usage}, e) {
			c.n.Add(-1)
		}
		return verified{}, false
	}
	return e, true
}

func (c *verifyCache) put(leaf *x509.Certificate, usage x509.ExtKeyUsage, v verified) {
	// Reserve a slot first, so that racing puts cannot overshoot the bound.
	if c.n.Add(1) > verifyCacheMax {
		c.n.Add(-1)
		return
	}
	if _, loaded := c.m.LoadOrStore(verifyKey{string(leaf.Raw), usage}, v); loaded {
		c.n.Add(-1)
	}
}

// chainNotAfter is the earliest expiry along the first verified chain.
func chainNotAfter(chains [][]*x509.Certificate) time.Time {
	var t time.Time
	if len(chains) == 0 {
		return t
	}
	for i, c := range chains[0] {
		if i == 0 || c.NotAfter.Before(t) {
			t = c.NotAfter
		}
	}
	return t
}

// PeerOf returns the verified service identity and serial of a connection's
// client certificate, checked against the current bundle. Tunnels use it to
// authorize each stream with the tunnel's peer.
func (s *Source) PeerOf(cs tls.ConnectionState) (Identity, string, error) {
	b := s.cur.Load()
	if b == nil {
		return Identity{}, "", ErrNotReady
	}
	return s.verifyClient(b, cs.PeerCertificates)
}
