// Package gateway is strait's mesh gateway (strait -gateway mesh): the
// data plane that joins Consul datacenters, in place of Envoy run by
// `consul connect envoy -gateway=mesh`.
//
// A Server accepts TCP connections and reads exactly one TLS record, which
// must hold the whole ClientHello (ReadHello: at most 16 KiB plus the
// header, within a hello timeout; the connections waiting for a hello and
// all connections held are capped). It routes by the hello's server name,
// as Consul's gateway listener does (agent/xds/listeners.go,
// makeMeshGatewayListener):
//
//   - "*.<other-dc>.internal.<trust-domain>": that datacenter's mesh
//     gateways, at their WAN addresses;
//   - "[<subset>.]<service>.<namespace>.<our-dc>.internal.<trust-domain>":
//     the service's connect proxies and Connect-native instances in this
//     datacenter, at their LAN addresses; a subset (or the resolver's
//     DefaultSubset) filters them with the service-resolver's subset
//     Filter, and OnlyPassing is honoured;
//   - "<service>.default.default.<peer>.external.<trust-domain>", a
//     cluster peer's proxies reaching a service we export to that peer:
//     the service's instances as for a local name, but only while
//     /v1/exported-services lists <peer> (our name for the peering) as a
//     consumer of the service (else not_exported);
//   - anything else is closed and counted (gateway.unknown_sni).
//
// It then dials the least-loaded healthy endpoint (the next one on a
// failed dial, within the connect timeout), replays the hello and hands
// both sockets to proxy's copy loop, which moves the bytes by splice(2)
// with half-close honoured. TLS is never terminated: the gateway has no
// certificate, and the SPIFFE checks stay end to end between the client
// and the final service.
//
// Routes come from a Router; Catalog is the one backed by the local Consul
// agent's blocking queries, so no connection costs a Consul request.
// Register keeps the gateway's registration (Kind mesh-gateway, or the
// other kinds').
//
// Terminating (strait -gateway terminating) is the terminating gateway:
// it terminates mesh mTLS with each linked service's own leaf, authorizes
// with that service's intentions and dials its instances, originating TLS
// when the link asks. IngressWatch (strait -gateway ingress) turns an
// ingress gateway's tcp listeners into a proxy configuration that the
// sidecar proxy's upstream machinery runs with the gateway's identity.
package gateway
