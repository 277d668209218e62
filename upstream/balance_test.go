package upstream

import (
	"fmt"
	"math"
	"net/netip"
	"slices"
	"testing"

	"github.com/hashicorp/consul/api"

	"github.com/straitproxy/strait/config"
)

// weightedSet is a set of n endpoints 10.0.0.<i>:1 with the given weights.
func weightedSet(t *testing.T, weights ...int) (*Upstream, *endpointSet) {
	t.Helper()
	f := newFixture(t)
	u := newUpstream(t, serviceUpstream("db"), f.options(t))
	var eps []Endpoint
	for i, w := range weights {
		eps = append(eps, Endpoint{Addr: fmt.Sprintf("10.0.0.%d:1", i+1), Service: "db", Weight: w})
	}
	return u, u.store(eps)
}

func share(counts []int, i, n int) float64 { return float64(counts[i]) / float64(n) }

func TestRoundRobinFollowsWeights(t *testing.T) {
	t.Parallel()
	u, set := weightedSet(t, 1, 3, 1)
	lb := Balancer{Policy: PolicyRoundRobin}
	tried := make([]bool, 3)
	counts := make([]int, 3)
	var seq []int
	for range 50 { // ten cycles of five
		i := u.pick(set, &lb, tried, netip.Addr{})
		counts[i]++
		seq = append(seq, i)
	}
	if !slices.Equal(counts, []int{10, 30, 10}) {
		t.Errorf("picks %v over 10 cycles, want exactly [10 30 10]", counts)
	}
	// Smooth: the heavy endpoint is never picked three times running.
	for k := 2; k < len(seq); k++ {
		if seq[k] == 1 && seq[k-1] == 1 && seq[k-2] == 1 {
			t.Fatalf("three picks of one endpoint in a row: %v", seq)
		}
	}
	// A tried endpoint is skipped.
	tried[1] = true
	for range 10 {
		if u.pick(set, &lb, tried, netip.Addr{}) == 1 {
			t.Fatal("round robin picked a tried endpoint")
		}
	}
}

func TestRandomAndLeastRequestFollowWeights(t *testing.T) {
	t.Parallel()
	const n = 20000
	for _, lb := range []Balancer{{Policy: PolicyRandom}, {Policy: PolicyLeastRequest, ChoiceCount: 2}, {Policy: PolicyLeastRequest, ChoiceCount: 3}} {
		u, set := weightedSet(t, 1, 1, 4)
		counts := make([]int, 3)
		tried := make([]bool, 3)
		for range n {
			counts[u.pick(set, &lb, tried, netip.Addr{})]++
		}
		// With no load, random follows the weights; least request
		// favours the heavy endpoint too (weighted draws, load per weight).
		if lb.Policy == PolicyRandom && math.Abs(share(counts, 2, n)-4.0/6) > 0.03 {
			t.Errorf("%+v: picks %v, want the heavy endpoint about 2/3 of the time", lb, counts)
		}
		if share(counts, 2, n) < share(counts, 0, n)*2 {
			t.Errorf("%+v: picks %v, the weight-4 endpoint not favoured", lb, counts)
		}
	}
}

// TestLeastRequestChoiceCount: with every endpoint drawn (ChoiceCount = n)
// the least loaded per unit of weight always wins.
func TestLeastRequestChoiceCount(t *testing.T) {
	t.Parallel()
	u, set := weightedSet(t, 1, 1, 1, 1)
	for i, n := range []int64{5, 3, 1, 4} {
		set.eps[i].st.active.Add(n)
	}
	lb := Balancer{Policy: PolicyLeastRequest, ChoiceCount: 4}
	for range 100 {
		if i := u.pick(set, &lb, make([]bool, 4), netip.Addr{}); i != 2 {
			t.Fatalf("picked %d, want the least loaded (2)", i)
		}
	}
	// Weight counts: 4 active over weight 8 beats 1 over weight 1.
	u, set = weightedSet(t, 1, 8)
	set.eps[0].st.active.Add(1)
	set.eps[1].st.active.Add(4)
	lb.ChoiceCount = 2
	for range 100 {
		if i := u.pick(set, &lb, make([]bool, 2), netip.Addr{}); i != 1 {
			t.Fatalf("picked %d, want the one with less load per weight (1)", i)
		}
	}
}

// TestHashPoliciesAreSticky: with ring_hash and maglev on the source IP, a
// source keeps its endpoint; sources spread over the endpoints by weight;
// when an endpoint leaves (or is tried) only its sources move; without a
// source address the pick is random.
func TestHashPoliciesAreSticky(t *testing.T) {
	t.Parallel()
	for _, policy := range []string{PolicyRingHash, PolicyMaglev} {
		t.Run(policy, func(t *testing.T) {
			t.Parallel()
			lb := Balancer{Policy: policy, SourceIP: true, RingSize: defaultMinRingSize}
			u, set := weightedSet(t, 1, 1, 1, 3)
			srcs := make([]netip.Addr, 600)
			for i := range srcs {
				srcs[i] = netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)})
			}
			first := map[netip.Addr]string{}
			counts := map[string]int{}
			for _, s := range srcs {
				for k := range 5 {
					e := set.eps[u.pick(set, &lb, make([]bool, 4), s)].Addr
					if k == 0 {
						first[s] = e
						counts[e]++
					} else if e != first[s] {
						t.Fatalf("source %s went to %s then %s", s, first[s], e)
					}
				}
			}
			if len(counts) != 4 || counts["10.0.0.4:1"] < counts["10.0.0.1:1"]*2 {
				t.Errorf("sources per endpoint %v: want all used, the weight-3 one about 3x", counts)
			}

			// The same endpoints in a new set (a refresh): same choices.
			u2, set2 := weightedSet(t, 1, 1, 1, 3)
			for _, s := range srcs[:50] {
				if e := set2.eps[u2.pick(set2, &lb, make([]bool, 4), s)].Addr; e != first[s] {
					t.Fatalf("source %s: %s in a rebuilt set, %s before", s, e, first[s])
				}
			}

			// Endpoint 2 leaves: only its sources move (ring_hash); a few
			// others may too with maglev, whose disruption is minimal but
			// not zero.
			var eps []Endpoint
			for _, e := range set.eps {
				if e.Addr != "10.0.0.2:1" {
					eps = append(eps, e.Endpoint)
				}
			}
			smaller := u.store(eps)
			moved, strays := 0, 0
			for _, s := range srcs {
				e := smaller.eps[u.pick(smaller, &lb, make([]bool, 3), s)].Addr
				if first[s] == "10.0.0.2:1" {
					moved++
					continue
				}
				if e != first[s] {
					strays++
				}
			}
			if moved == 0 {
				t.Error("no source was on the endpoint that left")
			}
			if allowed := map[string]int{PolicyRingHash: 0, PolicyMaglev: len(srcs) / 20}[policy]; strays > allowed {
				t.Errorf("%d sources moved though their endpoint stayed, want at most %d", strays, allowed)
			}

			// A tried endpoint is passed over to the next one.
			s := srcs[0]
			i := u.pick(set, &lb, make([]bool, 4), s)
			tried := make([]bool, 4)
			tried[i] = true
			if j := u.pick(set, &lb, tried, s); j == i {
				t.Error("the tried endpoint was picked again")
			}

			// No source address: random, so all endpoints get some.
			seen := map[int]bool{}
			for range 200 {
				seen[u.pick(set, &lb, make([]bool, 4), netip.Addr{})] = true
			}
			if len(seen) < 3 {
				t.Errorf("without a source only %d endpoints were picked", len(seen))
			}
		})
	}
}

func TestInstanceHealthRules(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name        string
		in          instance
		onlyPassing bool
		healthy     bool
		weight      int
	}{
		{"passing", instance{passing: true}, false, true, 1},
		{"warning allowed", instance{warning: true}, false, true, 1},
		{"warning with OnlyPassing", instance{warning: true}, true, false, 1},
		{"critical", instance{critical: true}, false, false, 1},
		{"weights", instance{passing: true, weightPassing: 5, weightWarning: 2}, false, true, 5},
		{"warning weight", instance{warning: true, weightPassing: 5, weightWarning: 2}, false, true, 2},
		{"zero warning weight", instance{warning: true, weightPassing: 5, weightWarning: 0}, false, false, 1},
		{"capped", instance{passing: true, weightPassing: 1000, weightWarning: 1}, false, true, 128},
	} {
		h, w := tc.in.health(tc.onlyPassing)
		if h != tc.healthy || w != tc.weight {
			t.Errorf("%s: healthy %v weight %d, want %v %d", tc.name, h, w, tc.healthy, tc.weight)
		}
	}
}

func TestInstanceAddresses(t *testing.T) {
	t.Parallel()
	e := &api.ServiceEntry{
		Node: &api.Node{Node: "n", Address: "10.0.0.1", TaggedAddresses: map[string]string{"wan": "198.51.100.1"}},
		Service: &api.AgentService{
			Kind: api.ServiceKindConnectProxy, Port: 21000, Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceName: "db"},
		},
	}
	in, ok := instanceOf(e)
	if !ok || in.lan != "10.0.0.1:21000" || in.wan != "198.51.100.1:21000" || in.service != "db" {
		t.Errorf("node addresses: %+v", in)
	}
	e.Service.Address = "10.0.0.2"
	in, _ = instanceOf(e)
	if in.lan != "10.0.0.2:21000" || in.wan != "10.0.0.2:21000" {
		t.Errorf("service address: %+v", in)
	}
	e.Service.TaggedAddresses = map[string]api.ServiceAddress{"wan": {Address: "203.0.113.9", Port: 443}}
	in, _ = instanceOf(e)
	if in.lan != "10.0.0.2:21000" || in.wan != "203.0.113.9:443" {
		t.Errorf("service wan address: %+v", in)
	}
}

// TestAddressPerGatewayMode: a local target is dialed on the LAN; a target
// in dc2 at its WAN address (mode none), through dc1's gateways on their
// LAN address (local) or dc2's on their WAN address (remote), with the
// target's SNI and service identity in every mode; through gateways only
// while the target has a healthy instance.
func TestAddressPerGatewayMode(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	u := newUpstream(t, serviceUpstream("db"), f.options(t))
	mk := func(lan, wan string) instance {
		return instance{lan: lan, wan: wan, node: "n", service: "db", passing: true}
	}
	feedOf := func(ins ...instance) *feed {
		f := &feed{subs: map[chan struct{}]int{}}
		f.publish(&ins)
		return f
	}
	inst := mk("10.2.0.1:21000", "198.51.100.1:21000")
	gw1 := mk("10.1.0.9:8443", "192.0.2.9:8443")
	gw2 := mk("10.2.0.9:8443", "198.51.100.9:8443")
	for _, tc := range []struct {
		dc, mode, want, gateway string
	}{
		{"dc1", config.MeshGatewayRemote, "10.2.0.1:21000", ""}, // local target: LAN, mode ignored
		{"dc2", config.MeshGatewayDefault, "198.51.100.1:21000", ""},
		{"dc2", config.MeshGatewayNone, "198.51.100.1:21000", ""},
		{"dc2", config.MeshGatewayLocal, "10.1.0.9:8443", "local"},
		{"dc2", config.MeshGatewayRemote, "198.51.100.9:8443", "remote"},
	} {
		tg, _ := targetOf(tgt("db", "v1", tc.dc))
		tg.MeshGateway = tc.mode
		fs := &feeds{health: map[string]*feed{tg.ID: feedOf(inst)}, gateways: map[string]*feed{"dc1": feedOf(gw1), "dc2": feedOf(gw2)}}
		eps, why, settled := u.endpointsOf(tg, fs)
		if why != "" || !settled || len(eps) != 1 {
			t.Fatalf("%s %q: %v %q %v", tc.dc, tc.mode, eps, why, settled)
		}
		e := eps[0]
		if e.Addr != tc.want || e.Gateway != tc.gateway || e.SNI != tg.SNI || e.Service != "db" || e.Datacenter != tc.dc || e.Target != tg.ID {
			t.Errorf("%s %q: endpoint %+v, want %s via %q", tc.dc, tc.mode, e, tc.want, tc.gateway)
		}
		// No healthy instance: no gateway either.
		down := inst
		down.critical, down.passing = true, false
		fs.health[tg.ID] = feedOf(down)
		if eps, _, _ := u.endpointsOf(tg, fs); len(eps) != 0 {
			t.Errorf("%s %q: endpoints %v with the target down", tc.dc, tc.mode, eps)
		}
	}
}
