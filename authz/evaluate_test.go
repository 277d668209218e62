package authz

import (
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/hashicorp/consul/api"

	"github.com/straitproxy/strait/tlsutil"
)

func svc(partition, namespace, name string) tlsutil.Identity {
	return tlsutil.ServiceID("11111111-2222-3333-4444-555555555555.consul", partition, namespace, "dc1", name)
}

// peerSvc is a default-tenancy service identity verified against the roots
// of the named cluster peer.
func peerSvc(peer, name string) tlsutil.Identity {
	id := tlsutil.ServiceID("99999999-2222-3333-4444-555555555555.consul", "", "", "dc2", name)
	id.Peer = peer
	return id
}

// ixn builds an intention with Consul's precedence for its fields.
func ixn(srcNS, src, dstNS, dst string, action api.IntentionAction) *api.Intention {
	x := &api.Intention{
		SourceNS: srcNS, SourceName: src, DestinationNS: dstNS, DestinationName: dst,
		SourceType: api.IntentionSourceConsul, Action: action,
	}
	x.Precedence = precedenceTable(x)
	return x
}

// precedenceTable is the 9-row table from Consul's docs, written out rather
// than computed so that it checks precedence().
func precedenceTable(x *api.Intention) int {
	kind := func(ns, name string) string {
		switch {
		case ns == "*":
			return "**"
		case name == "*":
			return "e*"
		}
		return "ee"
	}
	return map[string]int{
		"ee ee": 9, "e* ee": 8, "** ee": 7,
		"ee e*": 6, "e* e*": 5, "** e*": 4,
		"ee **": 3, "e* **": 2, "** **": 1,
	}[kind(x.SourceNS, x.SourceName)+" "+kind(x.DestinationNS, x.DestinationName)]
}

func TestPrecedenceTable(t *testing.T) {
	t.Parallel()
	// Rows in precedence order, 9 first. Actions alternate so that every
	// step changes the answer.
	rows := []*api.Intention{
		ixn("default", "web", "default", "db", api.IntentionActionAllow),
		ixn("default", "*", "default", "db", api.IntentionActionDeny),
		ixn("*", "*", "default", "db", api.IntentionActionAllow),
		ixn("default", "web", "default", "*", api.IntentionActionDeny),
		ixn("default", "*", "default", "*", api.IntentionActionAllow),
		ixn("*", "*", "default", "*", api.IntentionActionDeny),
		ixn("default", "web", "*", "*", api.IntentionActionAllow),
		ixn("default", "*", "*", "*", api.IntentionActionDeny),
		ixn("*", "*", "*", "*", api.IntentionActionAllow),
	}
	for i, r := range rows {
		if got, want := r.Precedence, 9-i; got != want {
			t.Fatalf("row %d: table precedence %d, want %d", i, got, want)
		}
		if got := precedence(&api.Intention{
			SourceNS: r.SourceNS, SourceName: r.SourceName, DestinationNS: r.DestinationNS, DestinationName: r.DestinationName,
		}); got != 9-i {
			t.Errorf("row %d: computed precedence %d, want %d", i, got, 9-i)
		}
	}
	web := svc("", "default", "web")
	rng := rand.New(rand.NewPCG(1, 2))
	for _, zeroPrecedence := range []bool{false, true} {
		for k := range rows {
			in := make([]*api.Intention, 0, len(rows)-k)
			for _, r := range rows[k:] {
				c := *r
				if zeroPrecedence {
					c.Precedence = 0
				}
				in = append(in, &c)
			}
			rng.Shuffle(len(in), func(i, j int) { in[i], in[j] = in[j], in[i] })
			rules := compile("db", in)
			i, v := match(rules, web)
			if v != matched {
				t.Fatalf("without top %d rows: verdict %v, want matched", k, v)
			}
			got, want := rules[i].ixn, rows[k]
			if got.SourceNS != want.SourceNS || got.SourceName != want.SourceName ||
				got.DestinationNS != want.DestinationNS || got.DestinationName != want.DestinationName {
				t.Errorf("without top %d rows (zero precedence %v): matched %s, want %s", k, zeroPrecedence, got, want)
			}
			if d := rules[i].decision; d.Allow != (want.Action == api.IntentionActionAllow) {
				t.Errorf("without top %d rows: allow %v for %s", k, d.Allow, want)
			}
		}
	}
}

func TestMatch(t *testing.T) {
	t.Parallel()
	allow, deny := api.IntentionActionAllow, api.IntentionActionDeny
	with := func(x *api.Intention, f func(*api.Intention)) *api.Intention { f(x); return x }
	l7 := func(x *api.Intention) {
		x.Action = ""
		x.Permissions = []*api.IntentionPermission{{Action: allow, HTTP: &api.IntentionHTTPPermission{PathPrefix: "/"}}}
	}
	tests := []struct {
		name       string
		ixns       []*api.Intention
		src        tlsutil.Identity
		want       verdict
		wantAllow  bool
		wantReason string
	}{
		{
			name: "no intentions",
			src:  svc("", "default", "web"),
			want: noMatch,
		},
		{
			name:       "exact allow",
			ixns:       []*api.Intention{ixn("default", "web", "default", "db", allow)},
			src:        svc("", "default", "web"),
			want:       matched,
			wantAllow:  true,
			wantReason: "matched intention web => db (allow)",
		},
		{
			name:       "exact deny",
			ixns:       []*api.Intention{ixn("default", "web", "default", "db", deny)},
			src:        svc("", "default", "web"),
			want:       matched,
			wantReason: "matched intention web => db (deny)",
		},
		{
			name:       "unknown action denies",
			ixns:       []*api.Intention{ixn("default", "web", "default", "db", "")},
			src:        svc("", "default", "web"),
			want:       matched,
			wantReason: "matched intention web => db ()",
		},
		{
			name: "other source name",
			ixns: []*api.Intention{ixn("default", "web", "default", "db", allow)},
			src:  svc("", "default", "api"),
			want: noMatch,
		},
		{
			name: "other source namespace",
			ixns: []*api.Intention{ixn("default", "web", "default", "db", allow)},
			src:  svc("", "team", "web"),
			want: noMatch,
		},
		{
			name:       "empty SourceNS means default",
			ixns:       []*api.Intention{ixn("", "web", "", "db", allow)},
			src:        svc("", "default", "web"),
			want:       matched,
			wantAllow:  true,
			wantReason: "matched intention web => db (allow)",
		},
		{
			name:       "wildcard name within namespace",
			ixns:       []*api.Intention{ixn("team", "*", "default", "db", allow)},
			src:        svc("", "team", "anything"),
			want:       matched,
			wantAllow:  true,
			wantReason: "matched intention team/* => db (allow)",
		},
		{
			name: "wildcard name does not cross namespaces",
			ixns: []*api.Intention{ixn("team", "*", "default", "db", allow)},
			src:  svc("", "default", "web"),
			want: noMatch,
		},
		{
			name:       "full wildcard",
			ixns:       []*api.Intention{ixn("*", "*", "*", "*", deny)},
			src:        svc("", "team", "web"),
			want:       matched,
			wantReason: "matched intention */* => */* (deny)",
		},
		{
			name: "exact deny beats wildcard allow regardless of input order",
			ixns: []*api.Intention{
				ixn("*", "*", "default", "db", allow),
				ixn("default", "web", "default", "db", deny),
			},
			src:        svc("", "default", "web"),
			want:       matched,
			wantReason: "matched intention web => db (deny)",
		},
		{
			name:       "L7 intention denies at L4",
			ixns:       []*api.Intention{with(ixn("default", "web", "default", "db", allow), l7)},
			src:        svc("", "default", "web"),
			want:       matched,
			wantReason: "L7 intention web => db denies at L4",
		},
		{
			name: "L7 intention shadows a wildcard allow",
			ixns: []*api.Intention{
				ixn("*", "*", "*", "*", allow),
				with(ixn("default", "web", "default", "db", ""), l7),
			},
			src:        svc("", "default", "web"),
			want:       matched,
			wantReason: "L7 intention web => db denies at L4",
		},
		{
			name: "L7 intention of lower precedence is shadowed",
			ixns: []*api.Intention{
				with(ixn("*", "*", "default", "db", ""), l7),
				ixn("default", "web", "default", "db", allow),
			},
			src:        svc("", "default", "web"),
			want:       matched,
			wantAllow:  true,
			wantReason: "matched intention web => db (allow)",
		},
		{
			name: "source partition must match",
			ixns: []*api.Intention{
				with(ixn("default", "web", "default", "db", deny), func(x *api.Intention) { x.SourcePartition = "ap1" }),
			},
			src:  svc("", "default", "web"),
			want: noMatch,
		},
		{
			name: "source partition matches",
			ixns: []*api.Intention{
				with(ixn("default", "web", "default", "db", deny), func(x *api.Intention) { x.SourcePartition = "ap1" }),
			},
			src:        svc("ap1", "default", "web"),
			want:       matched,
			wantReason: "matched intention ap1/default/web => db (deny)",
		},
		{
			name: "source partition is case-insensitive",
			ixns: []*api.Intention{
				with(ixn("default", "web", "default", "db", allow), func(x *api.Intention) { x.SourcePartition = "AP1" }),
			},
			src:        svc("ap1", "default", "web"),
			want:       matched,
			wantAllow:  true,
			wantReason: "matched intention AP1/default/web => db (allow)",
		},
		{
			name: "explicit default partition matches identity without one",
			ixns: []*api.Intention{
				with(ixn("default", "web", "default", "db", allow), func(x *api.Intention) { x.SourcePartition = "default" }),
			},
			src:        tlsutil.Identity{Kind: tlsutil.KindService, Service: "web"},
			want:       matched,
			wantAllow:  true,
			wantReason: "matched intention web => db (allow)",
		},
		{
			name: "wildcards never cross partitions",
			ixns: []*api.Intention{ixn("*", "*", "*", "*", allow)},
			src:  svc("ap1", "default", "web"),
			want: noMatch,
		},
		{
			name: "peer intention never matches a local source",
			ixns: []*api.Intention{
				with(ixn("default", "web", "default", "db", deny), func(x *api.Intention) { x.SourcePeer = "cluster2" }),
				ixn("*", "*", "default", "db", allow),
			},
			src:        svc("", "default", "web"),
			want:       matched,
			wantAllow:  true,
			wantReason: "matched intention */* => db (allow)",
		},
		{
			name: "peer intention matches that peer's source only",
			ixns: []*api.Intention{
				with(ixn("default", "web", "default", "db", deny), func(x *api.Intention) { x.SourcePeer = "cluster2" }),
				ixn("*", "*", "default", "db", allow),
			},
			src:        peerSvc("cluster2", "web"),
			want:       matched,
			wantAllow:  false,
			wantReason: "matched intention peer:cluster2/default/web => db (deny)",
		},
		{
			name: "local intentions never match a peer's source",
			ixns: []*api.Intention{
				ixn("*", "*", "default", "db", allow),
				with(ixn("default", "web", "default", "db", deny), func(x *api.Intention) { x.SourcePeer = "cluster3" }),
			},
			src:  peerSvc("cluster2", "web"),
			want: noMatch,
		},
		{
			name: "sameness-group intention that may apply is left to the agent",
			ixns: []*api.Intention{
				with(ixn("default", "web", "default", "db", deny), func(x *api.Intention) { x.SourceSamenessGroup = "sg" }),
				ixn("*", "*", "default", "db", allow),
			},
			src:  svc("", "default", "web"),
			want: undecidable,
		},
		{
			name: "sameness-group intention for another source is skipped",
			ixns: []*api.Intention{
				with(ixn("default", "api", "default", "db", deny), func(x *api.Intention) { x.SourceSamenessGroup = "sg" }),
				ixn("*", "*", "default", "db", allow),
			},
			src:        svc("", "default", "web"),
			want:       matched,
			wantAllow:  true,
			wantReason: "matched intention */* => db (allow)",
		},
		{
			name: "sameness-group intention below a local match does not matter",
			ixns: []*api.Intention{
				with(ixn("*", "*", "default", "db", allow), func(x *api.Intention) { x.SourceSamenessGroup = "sg" }),
				ixn("default", "web", "default", "db", deny),
			},
			src:        svc("", "default", "web"),
			want:       matched,
			wantReason: "matched intention web => db (deny)",
		},
		{
			name: "intention for another destination is ignored",
			ixns: []*api.Intention{
				ixn("default", "web", "default", "other", deny),
				ixn("default", "web", "default", "*", allow),
			},
			src:        svc("", "default", "web"),
			want:       matched,
			wantAllow:  true,
			wantReason: "matched intention web => * (allow)",
		},
		{
			name:       "destination name compared case-insensitively",
			ixns:       []*api.Intention{ixn("default", "web", "default", "DB", deny)},
			src:        svc("", "default", "web"),
			want:       matched,
			wantReason: "matched intention web => DB (deny)",
		},
		{
			name: "nil and nameless intentions are skipped",
			ixns: []*api.Intention{nil, ixn("default", "", "default", "db", deny)},
			src:  svc("", "default", "web"),
			want: noMatch,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			in := slices.Clone(tc.ixns)
			rules := compile("db", in)
			if !slices.Equal(in, tc.ixns) {
				t.Fatal("compile modified its input")
			}
			i, v := match(rules, tc.src)
			if v != tc.want {
				t.Fatalf("verdict %v, want %v", v, tc.want)
			}
			if v != matched {
				return
			}
			d := rules[i].decision
			if d.Allow != tc.wantAllow || d.Reason != tc.wantReason || d.Default {
				t.Errorf("decision %+v, want allow=%v reason=%q", d, tc.wantAllow, tc.wantReason)
			}
		})
	}
}

func TestSortTieBreak(t *testing.T) {
	t.Parallel()
	// Same precedence; Consul orders these lexically by source then
	// destination, and the first that matches wins.
	a := ixn("default", "*", "default", "db", api.IntentionActionAllow)
	b := ixn("alpha", "*", "default", "db", api.IntentionActionDeny)
	c := ixn("default", "*", "default", "db", api.IntentionActionDeny)
	c.SourcePartition = "default"
	rules := compile("db", []*api.Intention{a, c, b})
	var got []*api.Intention
	for _, r := range rules {
		got = append(got, r.ixn)
	}
	if want := []*api.Intention{b, a, c}; !slices.Equal(got, want) {
		t.Errorf("order %v, want %v", got, want)
	}
	// a and c both match a default-namespace source; a sorts first.
	if i, _ := match(rules, svc("", "default", "x")); rules[i].ixn != a {
		t.Errorf("matched %v, want %v", rules[i].ixn, a)
	}
}

func TestNonServiceDecision(t *testing.T) {
	t.Parallel()
	for _, k := range []tlsutil.Kind{0, tlsutil.KindAgent, tlsutil.KindServer, tlsutil.KindMeshGateway} {
		d := nonServiceDecision(k)
		if d.Allow || d.Default || !strings.Contains(d.Reason, "only service identities") {
			t.Errorf("kind %v: %+v", k, d)
		}
	}
}

func (v verdict) String() string {
	switch v {
	case noMatch:
		return "noMatch"
	case matched:
		return "matched"
	case undecidable:
		return "undecidable"
	}
	return "?"
}
