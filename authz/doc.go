// Package authz decides whether a client identity may open a connection to
// the proxied (destination) service, following Consul's intention rules.
//
// Decisions are made locally from a cached copy of the destination service's
// intentions, kept current by a blocking query on the local agent's
// /v1/connect/intentions/match endpoint. On the steady path there is no
// per-connection HTTP call: when an intention matches, Authorize only walks an
// immutable, precedence-sorted slice.
//
// Consul does not publish the agent's default policy (default_intention_policy
// or the ACL default), so when no intention matches, Authorize asks the agent
// once via POST /v1/agent/connect/authorize and caches the answer per source
// identity. That cache is dropped whenever the intention set changes and each
// entry expires after Options.DefaultTTL, so a changed default policy is seen
// within that bound.
//
// Authorize trusts the identity it is given: the caller must already have
// verified the peer's chain against the mesh roots and its trust domain.
// Like Consul, it ignores the datacenter, and only service identities from
// local (non-peered) partitions can match an intention.
//
// Typical usage:
//
//	a := authz.New(client, authz.Options{Target: "db"})
//	go a.Run(ctx)
//	<-a.Ready()
//	d, err := a.Authorize(handshakeCtx, peerID, serial)
//	if err != nil || !d.Allow {
//		// refuse the connection
//	}
package authz
