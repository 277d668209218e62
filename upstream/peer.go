package upstream

import (
	"sync/atomic"

	"github.com/straitproxy/strait/tlsutil"
)

// peerKind is what handshakes taught us about an endpoint's server; it
// decides what the next dial offers by ALPN.
type peerKind int32

const (
	// peerUnknown: nothing learned yet, or a server that selects no
	// protocol (the built-in proxy, Envoy). Offer ALPNStrait (and ALPNMux
	// with tunnels); never resume a session.
	peerUnknown peerKind = iota
	// peerStrait: selected ALPNStrait, so it re-authorizes resumed
	// sessions and resuming is safe.
	peerStrait
	// peerNoALPN: refused our offer with no_application_protocol (a Go
	// server advertising only h2, as Connect-native services do by
	// default). Dial it without ALPN from now on.
	peerNoALPN
	// peerMux: selected ALPNMux: carry connections in its tunnels.
	peerMux
)

func (k peerKind) String() string {
	switch k {
	case peerUnknown:
		return "unknown"
	case peerStrait:
		return "strait"
	case peerNoALPN:
		return "no-alpn"
	case peerMux:
		return "mux"
	}
	return "invalid"
}

// peerState holds an endpoint's peerKind. It changes only by the named
// transitions below, each the lesson of one handshake; concurrent dials
// may race, and the last lesson wins.
type peerState struct{ v atomic.Int32 }

func (p *peerState) kind() peerKind { return peerKind(p.v.Load()) }

// refusedALPN: the server answered our offer with no_application_protocol.
// Final: a server that refuses us is never offered ALPN again.
func (p *peerState) refusedALPN() { p.v.Store(int32(peerNoALPN)) }

// lostMux: a dial for a new tunnel to a peerMux server did not get ALPNMux
// (it was replaced by an older strait, or its tunnels were turned off).
// Forget everything: the next handshake learns the peer afresh.
func (p *peerState) lostMux() { p.v.Store(int32(peerUnknown)) }

// negotiated records the protocol a handshake that offered ALPN selected;
// offeredMux says whether the offer included ALPNMux. ALPNMux makes the peer
// peerMux, no protocol (or a foreign one) peerUnknown. ALPNStrait makes it
// peerStrait, except that a peerMux peer stays one when ALPNMux was not
// offered (a classic connection beside full tunnels, or a Dial without
// tunnels): selecting ALPNStrait then says nothing about its tunnels.
func (p *peerState) negotiated(proto string, offeredMux bool) {
	switch proto {
	case tlsutil.ALPNMux:
		p.v.Store(int32(peerMux))
	case tlsutil.ALPNStrait:
		if offeredMux {
			p.v.Store(int32(peerStrait))
			return
		}
		for {
			cur := p.v.Load()
			if peerKind(cur) == peerMux || p.v.CompareAndSwap(cur, int32(peerStrait)) {
				return
			}
		}
	default:
		p.v.Store(int32(peerUnknown)) // not (or no longer) strait: never resume
	}
}
