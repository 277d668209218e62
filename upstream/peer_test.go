package upstream

import (
	"testing"

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
