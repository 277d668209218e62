// Package proxy runs strait's listeners: the public listener, which
// terminates inbound mTLS, authorizes the peer and only then dials the local
// application, and one loopback listener per upstream, which dials a healthy
// peer through package upstream. Both hand the two connections to Pipe, the
// half-close-aware copy loop.
//
// Each listener tracks its connections so that Shutdown can stop accepting,
// let live connections finish within a grace period and close the rest.
// Configuration changes are applied as a diff: only listeners whose
// configuration changed are touched.
//
// The proxy does not build its collaborators: the certificate source, the
// authorizer, the upstreams and the tunnel pool come from Options (Parts,
// Tunnels), which cmd/strait fills from its flags.
package proxy
