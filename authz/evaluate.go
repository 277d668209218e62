package authz

import (
	"cmp"
	"slices"
	"strings"

	"github.com/hashicorp/consul/api"

	"github.com/straitproxy/strait/tlsutil"
)

const (
	wildcard         = "*"
	defaultTenancy   = "default" // Consul's default namespace and partition
	reasonNonService = "only service identities may connect"
)

// verdict is the outcome of evaluating a rule list for one source.
type verdict uint8

const (
	noMatch verdict = iota
	matched
	// undecidable means a sameness-group intention may apply. Membership of
	// a sameness group is not visible through the match endpoint, so only
	// the agent can decide.
	undecidable
)

// rule is an intention compiled for matching local sources. Rules are built
// once per intention set and never modified, so the hot path only compares
// strings and returns a precomputed Decision.
type rule struct {
	partition string // lower case, "default" when empty
	namespace string // "default" when empty; may be "*"
	name      string // may be "*"
	// peer is SourcePeer, lower case: the rule matches only identities
	// verified against that peer's roots (tlsutil.Identity.Peer), and a
	// rule without one only identities of our own mesh, as Envoy's RBAC
	// principals are built (agent/xds/rbac.go: a peer's trust domain).
	peer     string
	sameness bool
	// ignored is non-empty (the reason) when the rule can never match a
	// local source of Target.
	ignored  string
	decision Decision
	ixn      *api.Intention
}

// compile sorts intentions by precedence and compiles them for target. The
// input is not modified.
func compile(target string, in []*api.Intention) []rule {
	ixns := make([]*api.Intention, 0, len(in))
	for _, ixn := range in {
		if ixn != nil {
			ixns = append(ixns, ixn)
		}
	}
	slices.SortStableFunc(ixns, compareIntentions)
	rules := make([]rule, len(ixns))
	for i, ixn := range ixns {
		rules[i] = compileOne(target, ixn)
	}
	return rules
}

func compileOne(target string, ixn *api.Intention) rule {
	r := rule{
		partition: strings.ToLower(orDefault(ixn.SourcePartition)),
		namespace: orDefault(ixn.SourceNS),
		name:      ixn.SourceName,
		peer:      strings.ToLower(ixn.SourcePeer),
		sameness:  ixn.SourceSamenessGroup != "",
		ixn:       ixn,
	}
	src, dst := sourceString(ixn), ixn.DestinationString()
	switch {
	case ixn.DestinationName != wildcard && !strings.EqualFold(ixn.DestinationName, target):
		// The match endpoint filters by destination; this guards against
		// a confused or stale agent. Consul's lookup is case-insensitive.
		r.ignored = "destination is not " + target
	case ixn.SourceName == "":
		r.ignored = "no source name"
	}
	switch {
	case len(ixn.Permissions) > 0:
		r.decision = Decision{Reason: "L7 intention " + src + " => " + dst + " denies at L4"}
	case ixn.Action == api.IntentionActionAllow:
		r.decision = Decision{Allow: true, Reason: "matched intention " + src + " => " + dst + " (allow)"}
	default:
		// Anything but "allow" denies, as in Consul.
		r.decision = Decision{Reason: "matched intention " + src + " => " + dst + " (" + string(ixn.Action) + ")"}
	}
	return r
}

// match returns the first rule that applies to src. It allocates nothing.
func match(rules []rule, src tlsutil.Identity) (int, verdict) {
	ns := orDefault(src.Namespace)
	ap := orDefault(src.Partition)
	for i := range rules {
		r := &rules[i]
		if r.ignored != "" || (!r.sameness && r.peer != src.Peer) ||
			(r.namespace != wildcard && r.namespace != ns) ||
			(r.name != wildcard && r.name != src.Service) {
			continue
		}
		if r.sameness {
			return i, undecidable
		}
		if !strings.EqualFold(r.partition, ap) {
			continue
		}
		return i, matched
	}
	return -1, noMatch
}

// precedence is the intention's Precedence, or when the agent left it zero,
// the value Consul would compute (agent/structs/intention.go UpdatePrecedence).
func precedence(ixn *api.Intention) int {
	if ixn.Precedence != 0 {
		return ixn.Precedence
	}
	return 3 + 3*countExact(ixn.DestinationNS, ixn.DestinationName) -
		(2 - countExact(ixn.SourceNS, ixn.SourceName))
}

func countExact(ns, name string) int {
	switch {
	case ns == wildcard:
		return 0
	case name == wildcard:
		return 1
	}
	return 2
}

// compareIntentions orders by precedence, highest first, then by Consul's
// lexical tie-break (agent/structs/intention.go IntentionPrecedenceSorter).
func compareIntentions(a, b *api.Intention) int {
	if c := cmp.Compare(precedence(b), precedence(a)); c != 0 {
		return c
	}
	return cmp.Or(
		strings.Compare(a.SourceSamenessGroup, b.SourceSamenessGroup),
		strings.Compare(a.SourcePeer, b.SourcePeer),
		strings.Compare(a.SourcePartition, b.SourcePartition),
		strings.Compare(a.SourceNS, b.SourceNS),
		strings.Compare(a.SourceName, b.SourceName),
		strings.Compare(a.DestinationPartition, b.DestinationPartition),
		strings.Compare(a.DestinationNS, b.DestinationNS),
		strings.Compare(a.DestinationName, b.DestinationName),
	)
}

// sourceString is api.Intention.SourceString with the partition, peer or
// sameness group prepended when there is one.
func sourceString(ixn *api.Intention) string {
	switch {
	case ixn.SourcePeer != "":
		return "peer:" + ixn.SourcePeer + "/" + orDefault(ixn.SourceNS) + "/" + ixn.SourceName
	case ixn.SourceSamenessGroup != "":
		return "sameness-group:" + ixn.SourceSamenessGroup + "/" + orDefault(ixn.SourceNS) + "/" + ixn.SourceName
	case ixn.SourcePartition != "" && !strings.EqualFold(ixn.SourcePartition, defaultTenancy):
		return ixn.SourcePartition + "/" + orDefault(ixn.SourceNS) + "/" + ixn.SourceName
	}
	return ixn.SourceString()
}

func orDefault(s string) string {
	if s == "" {
		return defaultTenancy
	}
	return s
}

// nonServiceDecision denies identities that are not services; the agent
// would answer 400 for them.
func nonServiceDecision(k tlsutil.Kind) Decision {
	switch k {
	case tlsutil.KindAgent:
		return Decision{Reason: "agent identity: " + reasonNonService}
	case tlsutil.KindServer:
		return Decision{Reason: "server identity: " + reasonNonService}
	case tlsutil.KindMeshGateway:
		return Decision{Reason: "mesh-gateway identity: " + reasonNonService}
	}
	return Decision{Reason: "unknown identity: " + reasonNonService}
}
