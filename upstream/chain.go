package upstream

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"
)

// DefaultChainConnectTimeout is the resolver connect timeout Consul compiles
// into a chain when neither the resolver nor the upstream sets one
// (agent/consul/discoverychain/compile.go).
const DefaultChainConnectTimeout = 5 * time.Second

// maxChainDepth bounds the walk of a chain's graph. Consul compiles a DAG
// a few nodes deep (router, splitters, resolvers); the bound only stops a
// malformed answer from recursing without end.
const maxChainDepth = 32

// Target is one target of a compiled discovery chain: a service (or a
// subset of one) in a datacenter, with everything needed to find and dial
// its instances.
type Target struct {
	// ID is Consul's target ID: [subset.]service.namespace.partition.dc, or
	// service.namespace.partition.external.peer for a peer's service.
	ID            string `json:"id"`
	Service       string `json:"service"`
	ServiceSubset string `json:"service_subset,omitempty"`
	Namespace     string `json:"namespace"`
	Partition     string `json:"partition"`
	Datacenter    string `json:"datacenter"`
	// Peer is the cluster peer the target lives in (api.DiscoveryTarget
	// lacks it; recovered from the ID). Peer targets are not dialed.
	Peer string `json:"peer,omitempty"`
	// MeshGateway is the target's mesh gateway mode as Consul resolved it
	// (upstream override, service-defaults, proxy-defaults).
	MeshGateway string `json:"mesh_gateway,omitempty"`
	// Filter and OnlyPassing are the subset's: a bexpr over the instances
	// and whether warning instances are excluded too.
	Filter      string `json:"filter,omitempty"`
	OnlyPassing bool   `json:"only_passing,omitempty"`
	// ConnectTimeout is the target's resolver's.
	ConnectTimeout time.Duration `json:"connect_timeout"`
	// SNI is what a connection to the target sends; the server must
	// present the SPIFFE ID of Service in Namespace and Datacenter.
	SNI      string `json:"sni"`
	External bool   `json:"external,omitempty"`
}

// targetOf converts Consul's target. The api type lacks Partition and Peer;
// both are in the ID, whose form Consul fixes (structs.ChainID):
// [subset.]svc.ns.partition.dc or svc.ns.partition.external.peer.
func targetOf(t *api.DiscoveryTarget) (Target, error) {
	out := Target{
		ID: t.ID, Service: t.Service, ServiceSubset: t.ServiceSubset, Namespace: t.Namespace,
		Datacenter: t.Datacenter, MeshGateway: string(t.MeshGateway.Mode),
		Filter: t.Subset.Filter, OnlyPassing: t.Subset.OnlyPassing,
		ConnectTimeout: t.ConnectTimeout, SNI: t.SNI, External: t.External,
	}
	if out.Service == "" {
		return Target{}, fmt.Errorf("target %q has no service", t.ID)
	}
	if out.Namespace == "" {
		out.Namespace = "default"
	}
	prefix := out.Service + "." + out.Namespace + "."
	if out.ServiceSubset != "" {
		prefix = out.ServiceSubset + "." + prefix
	}
	rest, ok := strings.CutPrefix(t.ID, prefix)
	if !ok {
		return Target{}, fmt.Errorf("target ID %q does not start with %q", t.ID, prefix)
	}
	parts := strings.Split(rest, ".")
	switch {
	case len(parts) == 2:
		out.Partition = parts[0]
		if parts[1] != out.Datacenter && out.Datacenter != "" {
			return Target{}, fmt.Errorf("target ID %q names datacenter %q, the target %q", t.ID, parts[1], out.Datacenter)
		}
	case len(parts) == 3 && parts[1] == "external":
		out.Partition, out.Peer = parts[0], parts[2]
	default:
		return Target{}, fmt.Errorf("target ID %q: unknown form", t.ID)
	}
	if out.ConnectTimeout <= 0 {
		out.ConnectTimeout = DefaultChainConnectTimeout
	}
	return out, nil
}

// Load balancing policies of a service-resolver's LoadBalancer.
const (
	PolicyRoundRobin   = "round_robin"
	PolicyRandom       = "random"
	PolicyLeastRequest = "least_request"
	PolicyRingHash     = "ring_hash"
	PolicyMaglev       = "maglev"
)

// Ring sizes of ring_hash, as Envoy defaults them, and strait's cap on the
// maximum: a ring is built per endpoint set, and 8M entries would cost
// 128 MiB per upstream.
const (
	defaultMinRingSize = 1024
	defaultMaxRingSize = 8 << 20
	capRingSize        = 1 << 16
	maglevTableSize    = 65537 // Envoy's default, a prime
)

// defaultBalancer is used when a resolver sets no policy: least request of
// two random choices, strait's balancing before chains.
var defaultBalancer = Balancer{Policy: PolicyLeastRequest, ChoiceCount: 2}

func balancerOf(lb *api.LoadBalancer) Balancer {
	if lb == nil || lb.Policy == "" {
		return defaultBalancer
	}
	b := Balancer{Policy: lb.Policy}
	switch lb.Policy {
	case PolicyLeastRequest:
		b.ChoiceCount = 2
		if lb.LeastRequestConfig != nil && lb.LeastRequestConfig.ChoiceCount > 0 {
			b.ChoiceCount = int(min(lb.LeastRequestConfig.ChoiceCount, 64))
		}
	case PolicyRingHash, PolicyMaglev:
		for _, hp := range lb.HashPolicies {
			if hp.SourceIP {
				b.SourceIP = true
			} else {
				b.Ignored = append(b.Ignored, "hash on "+hp.Field+" "+hp.FieldValue)
			}
		}
		if lb.Policy == PolicyRingHash {
			lo, hi := uint64(defaultMinRingSize), uint64(defaultMaxRingSize)
			if c := lb.RingHashConfig; c != nil {
				if c.MinimumRingSize > 0 {
					lo = c.MinimumRingSize
				}
				if c.MaximumRingSize > 0 {
					hi = c.MaximumRingSize
				}
			}
			b.RingSize = int(min(lo, hi, capRingSize))
		}
	case PolicyRoundRobin, PolicyRandom:
	default:
		b.Ignored = append(b.Ignored, "unknown policy "+lb.Policy)
		return Balancer{Policy: defaultBalancer.Policy, ChoiceCount: defaultBalancer.ChoiceCount, Ignored: b.Ignored}
	}
	return b
}

// plan is a compiled chain reduced to what an L4 proxy applies: the legs
// of its splitter (one leg without one), each a resolver with its targets
// in failover order.
type plan struct {
	protocol string
	legs     []leg
	// targets are every target the legs use, by ID.
	targets map[string]Target
	// routerMatches counts a router's routes other than the default one:
	// their matches need L7 and do not apply.
	routerMatches int
	// lbIgnored describes load balancer settings that do not apply.
	lbIgnored []string
	// vips are the chain's AutoVirtualIPs and ManualVirtualIPs, sorted;
	// nil when the chain was fetched with overrides (see getChain).
	vips []netip.Addr
}

// leg is one way a connection can go: a resolver, chosen with probability
// weight (the legs' weights sum to 1).
type leg struct {
	weight float64
	res    *resolverPlan
}

// resolverPlan is one resolver node: its targets, primary first, then the
// failover targets in order.
type resolverPlan struct {
	name           string
	connectTimeout time.Duration
	targets        []string // target IDs
	lb             Balancer
}

// compile walks chain from its start node. A router contributes its last
// route (Consul appends the catch-all default route last); splitters are
// flattened, their weights (percentages) multiplied along the path; each
// resolver reached becomes a leg (legs reaching the same resolver merge).
func compile(chain *api.CompiledDiscoveryChain) (*plan, error) {
	if chain == nil {
		return nil, errors.New("empty discovery chain")
	}
	p := &plan{protocol: chain.Protocol, targets: map[string]Target{}}
	byName := map[string]int{} // resolver node name -> index in p.legs
	var walk func(name string, weight float64, depth int) error
	walk = func(name string, weight float64, depth int) error {
		if depth > maxChainDepth {
			return fmt.Errorf("chain deeper than %d nodes at %q", maxChainDepth, name)
		}
		n := chain.Nodes[name]
		if n == nil {
			return fmt.Errorf("chain node %q missing", name)
		}
		switch n.Type {
		case api.DiscoveryGraphNodeTypeRouter:
			if len(n.Routes) == 0 || n.Routes[len(n.Routes)-1] == nil {
				return fmt.Errorf("router %q has no default route", name)
			}
			p.routerMatches += len(n.Routes) - 1
			return walk(n.Routes[len(n.Routes)-1].NextNode, weight, depth+1)
		case api.DiscoveryGraphNodeTypeSplitter:
			for _, s := range n.Splits {
				if s == nil || s.Weight <= 0 {
					continue
				}
				if err := walk(s.NextNode, weight*float64(s.Weight)/100, depth+1); err != nil {
					return err
				}
			}
			return nil
		case api.DiscoveryGraphNodeTypeResolver:
			if i, ok := byName[name]; ok {
				p.legs[i].weight += weight
				return nil
			}
			r, err := p.resolver(chain, n)
			if err != nil {
				return err
			}
			byName[name] = len(p.legs)
			p.legs = append(p.legs, leg{weight: weight, res: r})
			return nil
		}
		return fmt.Errorf("chain node %q has unknown type %q", name, n.Type)
	}
	if err := walk(chain.StartNode, 1, 0); err != nil {
		return nil, fmt.Errorf("discovery chain %s: %w", chain.ServiceName, err)
	}
	var total float64
	for _, l := range p.legs {
		total += l.weight
	}
	if len(p.legs) == 0 || total <= 0 {
		return nil, fmt.Errorf("discovery chain %s: no resolver with a positive weight", chain.ServiceName)
	}
	for i := range p.legs {
		p.legs[i].weight /= total
	}
	return p, nil
}

func (p *plan) resolver(chain *api.CompiledDiscoveryChain, n *api.DiscoveryGraphNode) (*resolverPlan, error) {
	r := n.Resolver
	if r == nil || r.Target == "" {
		return nil, fmt.Errorf("resolver %q has no target", n.Name)
	}
	rp := &resolverPlan{name: n.Name, connectTimeout: r.ConnectTimeout, lb: balancerOf(n.LoadBalancer)}
	if rp.connectTimeout <= 0 {
		rp.connectTimeout = DefaultChainConnectTimeout
	}
	for _, s := range rp.lb.Ignored {
		p.lbIgnored = append(p.lbIgnored, n.Name+": "+s)
	}
	ids := []string{r.Target}
	if r.Failover != nil {
		ids = append(ids, r.Failover.Targets...)
	}
	for _, id := range ids {
		if slices.Contains(rp.targets, id) {
			continue
		}
		if _, ok := p.targets[id]; !ok {
			ct := chain.Targets[id]
			if ct == nil {
				return nil, fmt.Errorf("resolver %q: target %q missing", n.Name, id)
			}
			t, err := targetOf(ct)
			if err != nil {
				return nil, err
			}
			p.targets[id] = t
		}
		rp.targets = append(rp.targets, id)
	}
	return rp, nil
}
