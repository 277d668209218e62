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
//	conn, res, release, err := u.Dial(ctx) // res: the endpoint and the attempts it took
//	if err != nil { ... }
//	defer release()
//
// Discovery runs in Run and never on the connection path: a service upstream
// is a blocking watch of the agent's /v1/health/connect endpoint; a prepared
// query upstream is executed once and then refreshed in the background when
// a Dial finds the cached answer older than Options.QueryTTL. The only Dial
// that talks to Consul is a prepared-query Dial that finds nothing cached at
// all. While the agent is unreachable the last good endpoint set stays in use.
//
// Dial balances with the power of two random choices on the number of active
// connections, and fails over to other endpoints on connect or handshake
// errors, all within the upstream's ConnectTimeout. An endpoint that failed
// is skipped for a while (1s, doubling with each consecutive failure up to
// 30s) unless every remaining endpoint is in the same state.
package upstream
