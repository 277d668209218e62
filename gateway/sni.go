package gateway

import (
	"slices"
	"strings"
)

// Route kinds: where a server name sends a connection.
const (
	// KindLocal is a service (or one of its subsets) of this datacenter:
	// the connection goes to its proxies' or Connect-native instances' LAN
	// addresses.
	KindLocal = "local"
	// KindRemote is any name in another datacenter: the connection goes
	// to that datacenter's mesh gateways' WAN addresses.
	KindRemote = "remote"
)

// Reasons a server name is not routed (the reason label of the
// gateway.unknown_sni metric and the access log's detail).
const (
	UnknownNoSNI            = "no_sni"             // the ClientHello carries no server name
	UnknownWrongTrustDomain = "wrong_trust_domain" // not under this mesh's trust domain
	UnknownNotService       = "not_service"        // in the trust domain but not a service or gateway name (prepared queries, peers, servers)
	UnknownPartition        = "partition"          // an admin partition name (.internal-v1.): Consul Enterprise only
	UnknownNamespace        = "namespace"          // a namespace other than default: Consul Enterprise only
	UnknownDatacenter       = "unknown_datacenter" // a datacenter not in /v1/catalog/datacenters
	UnknownService          = "unknown_service"    // not in this datacenter's catalog
	UnknownSubset           = "unknown_subset"     // the service's resolver defines no such subset
	UnknownNotExported      = "not_exported"       // a peered name of a service not exported to that peer
	UnknownMalformed        = "malformed"          // the labels do not make a service name
)

// UnknownReasons lists every reason, for declaring the metric's series.
var UnknownReasons = []string{UnknownNoSNI, UnknownWrongTrustDomain, UnknownNotService, UnknownPartition,
	UnknownNamespace, UnknownDatacenter, UnknownService, UnknownSubset, UnknownNotExported, UnknownMalformed}

// Name is what a server name addresses, as Consul builds them
// (agent/connect/sni.go): "<subset>.<service>.<namespace>.<dc>.internal.<td>"
// for a service, its subset optional, and any name ending in
// ".<dc>.internal.<td>" for another datacenter's gateways.
type Name struct {
	Kind       string // KindLocal or KindRemote
	Datacenter string
	// Local only.
	Service, Subset, Namespace string
	// Peer is set for a peered name,
	// "<service>.<namespace>.<partition>.<peer>.external.<td>": what a
	// cluster peer's proxies send for a service we export to it
	// (agent/connect/sni.go PeeredServiceSNI), <peer> being our name for
	// that peering. It routes to the local service, like a local name.
	Peer string
}

// Target is the route's name in logs, metrics and /routes: the
// datacenter for a remote name, "[subset.]service" for a local one.
func (n Name) Target() string {
	if n.Kind == KindRemote {
		return n.Datacenter
	}
	if n.Subset != "" {
		return n.Subset + "." + n.Service
	}
	return n.Service
}

// ParseName maps a server name (lowercase, as ReadHello returns it) to
// what it addresses for a gateway in datacenter localDC of the mesh with
// trust domain td. It does not look anything up: whether the datacenter,
// service or subset exists is the Catalog's business. On failure it
// returns one of the Unknown* reasons.
//
// Consul CE names only the default partition and the default namespace;
// names of other partitions (".internal-v1.") and namespaces are refused,
// as a CE gateway has no cluster for them.
func ParseName(sni, td, localDC string) (Name, string) {
	td = strings.ToLower(td)
	localDC = strings.ToLower(localDC)
	switch {
	case sni == "":
		return Name{}, UnknownNoSNI
	case !strings.HasSuffix(sni, "."+td):
		return Name{}, UnknownWrongTrustDomain
	case strings.HasSuffix(sni, ".internal-v1."+td):
		return Name{}, UnknownPartition
	case strings.HasSuffix(sni, ".external."+td):
		return parsePeered(strings.Split(strings.TrimSuffix(sni, ".external."+td), "."), localDC)
	case !strings.HasSuffix(sni, ".internal."+td):
		return Name{}, UnknownNotService
	}
	labels := strings.Split(strings.TrimSuffix(sni, ".internal."+td), ".")
	if len(labels) < 2 {
		return Name{}, UnknownMalformed // "<dc>.internal.<td>" alone names no service
	}
	dc := labels[len(labels)-1]
	if dc != localDC {
		return Name{Kind: KindRemote, Datacenter: dc}, ""
	}
	n := Name{Kind: KindLocal, Datacenter: dc}
	switch len(labels) {
	case 3: // service.namespace.dc
		n.Service, n.Namespace = labels[0], labels[1]
	case 4: // subset.service.namespace.dc
		n.Subset, n.Service, n.Namespace = labels[0], labels[1], labels[2]
	default:
		return Name{}, UnknownMalformed
	}
	if n.Namespace != "default" {
		return Name{}, UnknownNamespace
	}
	return n, ""
}

// parsePeered reads the labels of a peered name before ".external.<td>":
// service, namespace, partition, peer.
func parsePeered(labels []string, localDC string) (Name, string) {
	if len(labels) != 4 || slices.Contains(labels, "") {
		return Name{}, UnknownMalformed
	}
	n := Name{Kind: KindLocal, Datacenter: localDC, Service: labels[0], Namespace: labels[1], Peer: labels[3]}
	switch {
	case labels[2] != "default":
		return Name{}, UnknownPartition
	case n.Namespace != "default":
		return Name{}, UnknownNamespace
	}
	return n, ""
}
