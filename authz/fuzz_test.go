package authz

import (
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/hashicorp/consul/api"

	"github.com/straitproxy/strait/tlsutil"
)

// fuzzCase decodes data into a source identity and up to 32 intentions, each
// field drawn from a small alphabet so that matches and ties are common.
func fuzzCase(data []byte) (tlsutil.Identity, []*api.Intention) {
	next := func() byte {
		if len(data) == 0 {
			return 0
		}
		b := data[0]
		data = data[1:]
		return b
	}
	pick := func(b byte, from ...string) string { return from[int(b)%len(from)] }

	b := next()
	src := tlsutil.Identity{
		Kind:        tlsutil.Kind(b % 5), // 0 (zero identity) .. KindMeshGateway
		TrustDomain: "td.consul",
		Partition:   pick(b/5, "default", "ap1", ""),
		Datacenter:  "dc1",
	}
	b = next()
	if src.Kind == tlsutil.KindService {
		src.Namespace = pick(b, "default", "ns1", "")
		src.Service = pick(b/3, "web", "api", "db")
		src.Peer = pick(b/9, "", "", "peer1", "peer2")
	}

	var out []*api.Intention
	for len(data) > 0 && len(out) < 32 {
		b0, b1, b2, b3 := next(), next(), next(), next()
		if b0 == 0xff {
			out = append(out, nil)
			continue
		}
		x := &api.Intention{
			SourceNS:        pick(b0, "default", "ns1", "*", ""),
			SourceName:      pick(b0/4, "web", "api", "*", "db", ""),
			DestinationNS:   pick(b1, "default", "*", ""),
			DestinationName: pick(b1/3, "db", "*", "DB", "other"),
			SourcePartition: pick(b2, "", "default", "ap1", "AP1"),
			Action:          api.IntentionAction(pick(b3, "allow", "deny", "")),
		}
		switch (b2 / 4) % 6 {
		case 4:
			x.SourcePeer = "peer1"
		case 5:
			x.SourceSamenessGroup = "sg"
		}
		if (b3/3)%4 == 3 {
			x.Permissions = []*api.IntentionPermission{{Action: api.IntentionActionAllow}}
		}
		switch (b3 / 12) % 3 {
		case 0:
			x.Precedence = precedenceTable(x)
		case 1:
			// Left zero: the agent's value missing.
		case 2:
			x.Precedence = int(b3 % 11) // nonsense, but both sides must agree
		}
		x.ID = strconv.Itoa(len(out))
		out = append(out, x)
	}
	return src, out
}

// refMatch is a brute-force evaluator: it scans every intention and keeps
// the best-ranked one that can apply, ranking by precedence (highest first),
// Consul's lexical keys, then input position.
func refMatch(target string, ixns []*api.Intention, src tlsutil.Identity) (*api.Intention, verdict) {
	def := func(s string) string {
		if s == "" {
			return "default"
		}
		return s
	}
	prec := func(x *api.Intention) int {
		if x.Precedence != 0 {
			return x.Precedence
		}
		return precedenceTable(x)
	}
	keys := func(x *api.Intention) []string {
		return []string{x.SourceSamenessGroup, x.SourcePeer, x.SourcePartition, x.SourceNS, x.SourceName,
			x.DestinationPartition, x.DestinationNS, x.DestinationName}
	}
	var best *api.Intention
	for _, x := range ixns {
		switch {
		case x == nil,
			x.DestinationName != "*" && !strings.EqualFold(x.DestinationName, target),
			x.SourceSamenessGroup == "" && !strings.EqualFold(x.SourcePeer, src.Peer),
			x.SourceName == "",
			x.SourceNS != "*" && def(x.SourceNS) != def(src.Namespace),
			x.SourceName != "*" && x.SourceName != src.Service,
			x.SourceSamenessGroup == "" && !strings.EqualFold(def(x.SourcePartition), def(src.Partition)):
			continue
		}
		if best == nil {
			best = x
			continue
		}
		if p, q := prec(x), prec(best); p > q || (p == q && slices.Compare(keys(x), keys(best)) < 0) {
			best = x // ties on every key keep the earlier intention
		}
	}
	switch {
	case best == nil:
		return nil, noMatch
	case best.SourceSamenessGroup != "":
		return best, undecidable
	}
	return best, matched
}

func FuzzMatch(f *testing.F) {
	f.Add([]byte{})
	f.Add([]byte{1, 0})
	f.Add([]byte{1, 0, 0, 0, 0, 0})
	f.Add([]byte{1, 0, 0, 0, 0, 1, 2, 1, 0, 1, 10, 1, 2, 2, 4, 3, 0, 0, 16, 0})
	f.Add([]byte{6, 4, 0, 0, 2, 0, 8, 3, 20, 1, 2, 2, 2, 9, 0xff, 0, 0, 0, 0, 0})
	f.Add([]byte{1, 1, 2, 0, 20, 24, 1, 0, 0, 0, 3, 3, 16, 36})
	f.Add([]byte("arbitrary bytes make a longer list of intentions to sort and match"))
	f.Fuzz(func(t *testing.T, data []byte) {
		src, ixns := fuzzCase(data)
		input := slices.Clone(ixns)
		rules := compile("db", ixns)
		if !slices.Equal(input, ixns) {
			t.Fatal("compile modified its input")
		}
		if len(rules) != len(ixns)-countNil(ixns) {
			t.Fatalf("%d rules from %d intentions", len(rules), len(ixns))
		}

		if src.Kind != tlsutil.KindService {
			if d := nonServiceDecision(src.Kind); d.Allow {
				t.Fatalf("non-service %v allowed", src.Kind)
			}
			return
		}

		i, v := match(rules, src)
		want, wantV := refMatch("db", ixns, src)
		if v != wantV {
			t.Fatalf("verdict %v, reference %v (src %+v)", v, wantV, src)
		}
		if v == noMatch {
			if i != -1 {
				t.Fatalf("noMatch with index %d", i)
			}
			return
		}
		got := rules[i].ixn
		if got != want {
			t.Fatalf("matched %v (id %s), reference %v (id %s)", got, got.ID, want, want.ID)
		}
		if v == matched {
			d := rules[i].decision
			wantAllow := got.Action == api.IntentionActionAllow && len(got.Permissions) == 0
			if d.Allow != wantAllow || d.Default {
				t.Fatalf("decision %+v for %v", d, got)
			}
			if len(got.Permissions) > 0 && !strings.Contains(d.Reason, "L7") {
				t.Fatalf("L7 reason %q", d.Reason)
			}
		}

		// Deterministic, and independent of input order whenever Consul's
		// sort keys are unique (Consul allows one intention per pair).
		if j, w := match(compile("db", ixns), src); j != i || w != v {
			t.Fatalf("second evaluation gave %d/%v, first %d/%v", j, w, i, v)
		}
		if uniqueKeys(ixns) {
			rev := slices.Clone(ixns)
			slices.Reverse(rev)
			rr := compile("db", rev)
			j, w := match(rr, src)
			if w != v || rr[j].ixn != got {
				t.Fatalf("reversed input gave %d/%v, want %v/%v", j, w, got, v)
			}
		}
	})
}

func countNil(ixns []*api.Intention) int {
	n := 0
	for _, x := range ixns {
		if x == nil {
			n++
		}
	}
	return n
}

func uniqueKeys(ixns []*api.Intention) bool {
	seen := map[string]bool{}
	for _, x := range ixns {
		if x == nil {
			continue
		}
		k := strings.Join([]string{strconv.Itoa(precedence(x)), x.SourceSamenessGroup, x.SourcePeer, x.SourcePartition,
			x.SourceNS, x.SourceName, x.DestinationPartition, x.DestinationNS, x.DestinationName}, "\x00")
		if seen[k] {
			return false
		}
		seen[k] = true
	}
	return true
}
