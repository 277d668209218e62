// Package upstream discovers, balances and dials the endpoints of one
// upstream of a strait proxy. The loopback listener and the byte copy live in
// package proxy, which calls Dial for every accepted connection.
//
// Typical usage:
//
//	u, err := upstream.New(cfg, upstream.Options{Client: client, TLS: source, LocalDatacenter: "dc1"})
//	if err != nil { ... }
//	go u.Run(ctx)
//	<-u.Ready()
//	conn, res, release, err := u.Dial(ctx, upstream.DialOptions{Source: accepted.RemoteAddr()})
//	if err != nil { ... }
//	defer release()
//
// Discovery runs in Run and never on the connection path. A service
// upstream follows its compiled discovery chain (a blocking watch of
// POST /v1/discovery-chain/<name> with the upstream's protocol, connect
// timeout and mesh gateway overrides): a router contributes its default
// route, splitters become weighted legs drawn per connection, and each
// resolver has its targets in failover order. Every target's instances come
// from a blocking watch of /v1/health/connect/<service> with the target's
// datacenter and subset filter; targets in another datacenter are dialed at
// their WAN address, or through this datacenter's or the target
// datacenter's mesh gateways (blocking watches of the gateways, started only
// when a target needs them). Identical queries share one watch (Catalog).
// A prepared query upstream is executed once and then refreshed in the
// background when a Dial finds the cached answer older than
// Options.QueryTTL; the only Dial that talks to Consul is a prepared-query
// Dial that finds nothing cached at all. While the agent is unreachable the
// last good answers stay in use.
//
// Dial starts with the first target of its resolver that has healthy
// endpoints, balances among them by the resolver's LoadBalancer
// (least_request of two choices by default; round_robin, random,
// least_request, ring_hash and maglev on the source IP; instance weights in
// all of them), and fails over to other endpoints, then to the next
// targets, on connect or handshake errors, all within the resolver's
// connect timeout. The TLS server name and the SPIFFE ID required of the
// server are the target's, through gateways too. An endpoint that failed is
// skipped for a while (1s, doubling with each consecutive failure up to
// 30s) unless every remaining endpoint is in the same state.
package upstream
