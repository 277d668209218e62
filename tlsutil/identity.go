package tlsutil

import (
	"errors"
	"fmt"
	"net/url"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Kind says which of Consul's SPIFFE ID forms an Identity came from.
type Kind uint8

const (
	// KindService is spiffe://<td>[/ap/<ap>]/ns/<ns>/dc/<dc>/svc/<name>.
	KindService Kind = iota + 1
	// KindAgent is spiffe://<td>[/ap/<ap>]/agent/client/dc/<dc>/id/<node-id>.
	KindAgent
	// KindServer is spiffe://<td>/agent/server/dc/<dc>.
	KindServer
	// KindMeshGateway is spiffe://<td>[/ap/<ap>]/gateway/mesh/dc/<dc>.
	KindMeshGateway
)

func (k Kind) String() string {
	switch k {
	case KindService:
		return "service"
	case KindAgent:
		return "agent"
	case KindServer:
		return "server"
	case KindMeshGateway:
		return "mesh-gateway"
	}
	return "unknown"
}

// Identity is a parsed Consul SPIFFE ID. The zero value is "no identity".
// Partition and Namespace are always set for service identities ("default"
// when the ID omits them), so two Identities compare equal exactly when they
// name the same workload.
type Identity struct {
	Kind        Kind
	TrustDomain string // e.g. "11111111-2222-3333-4444-555555555555.consul"
	Partition   string // lower case; "default" when the ID has no /ap/ segment
	Namespace   string // service identities only
	Datacenter  string
	Service     string // service identities only
	NodeID      string // agent identities only
	// Peer is the cluster peer whose trust domain issued the identity,
	// by our name for the peering; empty for our own mesh. It is set only
	// on identities verified against a peer's roots (a client of the
	// public listener), never by ParseID.
	Peer string
}

// Errors returned by ParseID, for callers that branch on the reason.
var (
	ErrNotSPIFFE   = errors.New("not a valid SPIFFE ID")
	ErrUnknownForm = errors.New("SPIFFE ID path is not a Consul service, agent, server or mesh gateway form")
)

// ParseID parses a SPIFFE ID as Consul issues them. Syntax (scheme, trust
// domain, path characters) is checked by go-spiffe; the path must then be one
// of Consul's forms. Consul %-escapes nothing in practice (names are DNS-safe),
// and go-spiffe rejects '%', so escaped IDs are refused rather than guessed at.
func ParseID(s string) (Identity, error) {
	id, err := spiffeid.FromString(s)
	if err != nil {
		return Identity{}, fmt.Errorf("%w: %q: %w", ErrNotSPIFFE, s, err)
	}
	return fromSPIFFE(id)
}

// parseURI is ParseID for a certificate's URI SAN.
func parseURI(u *url.URL) (Identity, error) {
	if u == nil {
		return Identity{}, fmt.Errorf("%w: no URI", ErrNotSPIFFE)
	}
	return ParseID(u.String())
}

func fromSPIFFE(id spiffeid.ID) (Identity, error) {
	out := Identity{TrustDomain: id.TrustDomain().Name(), Partition: "default"}
	segs := strings.Split(strings.TrimPrefix(id.Path(), "/"), "/")
	hasAP := len(segs) >= 2 && segs[0] == "ap"
	if hasAP {
		out.Partition = strings.ToLower(segs[1])
		segs = segs[2:]
	}
	switch {
	case len(segs) == 6 && segs[0] == "ns" && segs[2] == "dc" && segs[4] == "svc":
		out.Kind, out.Namespace, out.Datacenter, out.Service = KindService, segs[1], segs[3], segs[5]
	case len(segs) == 6 && segs[0] == "agent" && segs[1] == "client" && segs[2] == "dc" && segs[4] == "id":
		out.Kind, out.Datacenter, out.NodeID = KindAgent, segs[3], segs[5]
	case len(segs) == 4 && segs[0] == "agent" && segs[1] == "server" && segs[2] == "dc" && !hasAP:
		out.Kind, out.Datacenter = KindServer, segs[3]
	case len(segs) == 4 && segs[0] == "gateway" && segs[1] == "mesh" && segs[2] == "dc":
		out.Kind, out.Datacenter = KindMeshGateway, segs[3]
	default:
		return Identity{}, fmt.Errorf("%w: %q", ErrUnknownForm, id.String())
	}
	return out, nil
}

// ServiceID builds the identity Consul gives a service. Empty namespace and
// partition mean "default".
func ServiceID(trustDomain, partition, namespace, datacenter, service string) Identity {
	if partition == "" {
		partition = "default"
	}
	if namespace == "" {
		namespace = "default"
	}
	return Identity{
		Kind: KindService, TrustDomain: trustDomain, Partition: strings.ToLower(partition),
		Namespace: namespace, Datacenter: datacenter, Service: service,
	}
}

// IsZero reports whether id is the zero Identity.
func (id Identity) IsZero() bool { return id == Identity{} }

// String renders the SPIFFE ID in Consul's canonical form (no /ap/ segment
// for the default partition).
func (id Identity) String() string {
	if id.IsZero() {
		return ""
	}
	var b strings.Builder
	b.WriteString("spiffe://")
	b.WriteString(id.TrustDomain)
	if id.Partition != "" && id.Partition != "default" {
		b.WriteString("/ap/")
		b.WriteString(id.Partition)
	}
	switch id.Kind {
	case KindService:
		fmt.Fprintf(&b, "/ns/%s/dc/%s/svc/%s", id.Namespace, id.Datacenter, id.Service)
	case KindAgent:
		fmt.Fprintf(&b, "/agent/client/dc/%s/id/%s", id.Datacenter, id.NodeID)
	case KindServer:
		fmt.Fprintf(&b, "/agent/server/dc/%s", id.Datacenter)
	case KindMeshGateway:
		fmt.Fprintf(&b, "/gateway/mesh/dc/%s", id.Datacenter)
	}
	return b.String()
}

// ServiceSNI returns the SNI Consul and Envoy use to reach a service:
// <svc>.<ns>.<dc>.internal.<td>, or <svc>.<ns>.<ap>.<dc>.internal-v1.<td> in
// a non-default partition. Mesh and terminating gateways route on it.
func ServiceSNI(service, namespace, partition, datacenter, trustDomain string) string {
	if namespace == "" {
		namespace = "default"
	}
	if partition == "" || strings.EqualFold(partition, "default") {
		return service + "." + namespace + "." + datacenter + ".internal." + trustDomain
	}
	return service + "." + namespace + "." + strings.ToLower(partition) + "." + datacenter + ".internal-v1." + trustDomain
}
