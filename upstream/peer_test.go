package upstream

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"testing"

	"github.com/straitproxy/strait/internal/testutil"
	"github.com/straitproxy/strait/tlsutil"
)

// TestPeerStateTransitions covers every transition from every state.
func TestPeerStateTransitions(t *testing.T) {
	t.Parallel()
	all := []peerKind{peerUnknown, peerStrait, peerNoALPN, peerMux}
	for _, tc := range []struct {
		event string
		apply func(*peerState)
		want  func(from peerKind) peerKind
	}{
		{"refusedALPN", (*peerState).refusedALPN, func(peerKind) peerKind { return peerNoALPN }},
		{"lostMux", (*peerState).lostMux, func(peerKind) peerKind { return peerUnknown }},
		{"negotiated mux", func(p *peerState) { p.negotiated(tlsutil.ALPNMux, true) },
			func(peerKind) peerKind { return peerMux }},
		{"negotiated strait, mux offered", func(p *peerState) { p.negotiated(tlsutil.ALPNStrait, true) },
			func(peerKind) peerKind { return peerStrait }},
		// A classic connection to a mux peer does not forget its tunnels.
		{"negotiated strait, mux not offered", func(p *peerState) { p.negotiated(tlsutil.ALPNStrait, false) },
			func(from peerKind) peerKind {
				if from == peerMux {
					return peerMux
				}
				return peerStrait
			}},
		{"negotiated nothing", func(p *peerState) { p.negotiated("", true) },
			func(peerKind) peerKind { return peerUnknown }},
		{"negotiated nothing, mux not offered", func(p *peerState) { p.negotiated("", false) },
			func(peerKind) peerKind { return peerUnknown }},
		{"negotiated a foreign protocol", func(p *peerState) { p.negotiated("h2", false) },
			func(peerKind) peerKind { return peerUnknown }},
	} {
		for _, from := range all {
			var p peerState
			p.v.Store(int32(from))
			tc.apply(&p)
			if got, want := p.kind(), tc.want(from); got != want {
				t.Errorf("%s from %s: %s, want %s", tc.event, from, got, want)
			}
		}
	}
	var zero peerState
	if k := zero.kind(); k != peerUnknown {
		t.Errorf("zero peerState is %s, want unknown", k)
	}
}

// TestIsALPNRefused: the no_application_protocol alert is recognised by its
// code, in TLS 1.2 and 1.3, and neither another alert nor an error that
// merely says so in its text is taken for it.
func TestIsALPNRefused(t *testing.T) {
	t.Parallel()
	ca := testutil.NewCA(t, testTD)
	cert := ca.Leaf(t, "db", testutil.LeafOptions{}).Cert
	handshake := func(t *testing.T, version uint16, serverProtos []string, clientCert bool) error {
		a, b := net.Pipe()
		done := make(chan struct{})
		go func() {
			defer close(done)
			cfg := &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: serverProtos, MaxVersion: version}
			if clientCert {
				cfg.ClientAuth = tls.RequireAnyClientCert
			}
			_ = tls.Server(a, cfg).Handshake()
			a.Close()
		}()
		defer func() { b.Close(); <-done }()
		err := tls.Client(b, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{tlsutil.ALPNStrait}}).Handshake()
		if err == nil {
			t.Fatal("handshake succeeded")
		}
		return err
	}
	for _, v := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
		if err := handshake(t, v, []string{"h2"}, false); !isALPNRefused(err) {
			t.Errorf("TLS %x: %v not recognised as an ALPN refusal", v, err)
		}
	}
	// TLS 1.2: the client learns of a missing certificate in the handshake.
	if err := handshake(t, tls.VersionTLS12, nil, true); isALPNRefused(err) {
		t.Errorf("%v taken for an ALPN refusal", err)
	}
	for _, err := range []error{
		errors.New("remote error: tls: no application protocol"),
		fmt.Errorf("dial: %w", tls.AlertError(40)),
	} {
		if isALPNRefused(err) {
			t.Errorf("%v taken for an ALPN refusal", err)
		}
	}
	if err := fmt.Errorf("quic: %w", tls.AlertError(120)); !isALPNRefused(err) {
		t.Errorf("%v not recognised as an ALPN refusal", err)
	}
}
