package tproxy

import (
	"context"
	"net"
	"net/netip"
	"reflect"
	"testing"

	"github.com/hashicorp/consul/api"

	"github.com/straitproxy/strait/upstream"
)

type fakeDialer struct{ name string }

func (f *fakeDialer) DialConn(context.Context, upstream.DialOptions) (net.Conn, upstream.DialResult, func(), error) {
	return nil, upstream.DialResult{}, nil, nil
}
func (f *fakeDialer) Ready() <-chan struct{} { return nil }

func addrs(ss ...string) []netip.Addr {
	var out []netip.Addr
	for _, s := range ss {
		out = append(out, netip.MustParseAddr(s))
	}
	return out
}

func TestTableRoutesByIPAnyPort(t *testing.T) {
	db, web := &fakeDialer{"db"}, &fakeDialer{"web"}
	tb, conflicts := NewTable([]Claim{
		{Name: "db", Dialer: db, Addresses: upstream.Addresses{Virtual: addrs("240.0.0.1", "10.96.0.10"), Direct: addrs("10.0.0.5")}},
		{Name: "web", Dialer: web, Addresses: upstream.Addresses{Virtual: addrs("240.0.0.2", "fd00::2")}},
	})
	if len(conflicts) != 0 {
		t.Fatalf("conflicts: %v", conflicts)
	}
	cases := []struct {
		ip     string
		want   string
		direct bool
		ok     bool
	}{
		{"240.0.0.1", "db", false, true},
		{"10.96.0.10", "db", false, true},
		{"10.0.0.5", "db", true, true},
		{"240.0.0.2", "web", false, true},
		{"fd00::2", "web", false, true},
		{"::ffff:240.0.0.2", "web", false, true}, // IPv4-mapped, as an IPv6 socket reports it
		{"240.0.0.3", "", false, false},
		{"127.0.0.1", "", false, false},
	}
	for _, c := range cases {
		r, ok := tb.Lookup(netip.MustParseAddr(c.ip))
		if ok != c.ok || r.Upstream != c.want || r.Direct != c.direct {
			t.Errorf("Lookup(%s) = %+v, %v; want %s direct=%v ok=%v", c.ip, r, ok, c.want, c.direct, c.ok)
		}
		if ok && r.Dialer.(*fakeDialer).name != c.want {
			t.Errorf("Lookup(%s) dialer is %s's", c.ip, r.Dialer.(*fakeDialer).name)
		}
	}
	if tb.Len() != 5 {
		t.Errorf("Len = %d, want 5", tb.Len())
	}
	var nilTable *Table
	if _, ok := nilTable.Lookup(netip.MustParseAddr("240.0.0.1")); ok || nilTable.Len() != 0 {
		t.Error("a nil table routes something")
	}
}

func TestTableConflicts(t *testing.T) {
	a, b := &fakeDialer{"a"}, &fakeDialer{"b"}
	// Claim order must not matter: both orders give the same table.
	for _, claims := range [][]Claim{
		{{Name: "b", Dialer: b, Addresses: upstream.Addresses{Virtual: addrs("240.0.0.9"), Direct: addrs("10.0.0.1")}},
			{Name: "a", Dialer: a, Addresses: upstream.Addresses{Virtual: addrs("240.0.0.9", "10.0.0.1")}}},
		{{Name: "a", Dialer: a, Addresses: upstream.Addresses{Virtual: addrs("240.0.0.9", "10.0.0.1")}},
			{Name: "b", Dialer: b, Addresses: upstream.Addresses{Virtual: addrs("240.0.0.9"), Direct: addrs("10.0.0.1")}}},
	} {
		tb, conflicts := NewTable(claims)
		// The same virtual IP twice: the name that sorts first keeps it.
		if r, _ := tb.Lookup(netip.MustParseAddr("240.0.0.9")); r.Upstream != "a" {
			t.Errorf("240.0.0.9 routed to %q, want a", r.Upstream)
		}
		// A virtual claim beats a direct one.
		if r, _ := tb.Lookup(netip.MustParseAddr("10.0.0.1")); r.Upstream != "a" || r.Direct {
			t.Errorf("10.0.0.1 routed to %+v, want a (virtual)", r)
		}
		want := []Conflict{
			{Addr: netip.MustParseAddr("240.0.0.9"), Kept: "a", Dropped: "b"},
			{Addr: netip.MustParseAddr("10.0.0.1"), Kept: "a", Dropped: "b"},
		}
		if !reflect.DeepEqual(conflicts, want) {
			t.Errorf("conflicts = %v, want %v", conflicts, want)
		}
	}
	// One upstream listing an address as virtual and direct: virtual, no conflict.
	tb, conflicts := NewTable([]Claim{{Name: "a", Dialer: a, Addresses: upstream.Addresses{Virtual: addrs("10.0.0.1"), Direct: addrs("10.0.0.1")}}})
	if r, _ := tb.Lookup(netip.MustParseAddr("10.0.0.1")); r.Direct || len(conflicts) != 0 {
		t.Errorf("self-overlap: %+v, conflicts %v", r, conflicts)
	}
}

func TestTableRoutesListing(t *testing.T) {
	tb, _ := NewTable([]Claim{
		{Name: "web", Addresses: upstream.Addresses{Virtual: addrs("240.0.0.2")}},
		{Name: "db", Addresses: upstream.Addresses{Virtual: addrs("240.0.0.1"), Direct: addrs("10.0.0.5")}},
	})
	want := []RouteStatus{{Addr: "10.0.0.5", Upstream: "db", Direct: true}, {Addr: "240.0.0.1", Upstream: "db"}, {Addr: "240.0.0.2", Upstream: "web"}}
	if got := tb.Routes(); !reflect.DeepEqual(got, want) {
		t.Errorf("Routes = %v, want %v", got, want)
	}
}

func TestAllowedUpstreams(t *testing.T) {
	ixn := func(dst string, action api.IntentionAction, l7 bool) *api.Intention {
		i := &api.Intention{SourceName: "web", DestinationName: dst, Action: action}
		if l7 {
			i.Action = ""
			i.Permissions = []*api.IntentionPermission{{Action: api.IntentionActionDeny}}
		}
		return i
	}
	candidates := []string{"api", "billing", "consul", "db", "web", "cache"}
	cases := []struct {
		name         string
		ixns         []*api.Intention
		defaultAllow bool
		want         []string
	}{
		{"default allow: every service but ourselves and consul", nil, true, []string{"api", "billing", "cache", "db"}},
		{"default deny: nothing", nil, false, nil},
		{"default deny, allow db", []*api.Intention{ixn("db", api.IntentionActionAllow, false)}, false, []string{"db"}},
		{"default allow, deny db", []*api.Intention{ixn("db", api.IntentionActionDeny, false)}, true, []string{"api", "billing", "cache"}},
		{"precedence: exact deny before wildcard allow", []*api.Intention{
			ixn("db", api.IntentionActionDeny, false), ixn("*", api.IntentionActionAllow, false)}, false, []string{"api", "billing", "cache"}},
		{"wildcard deny after exact allow", []*api.Intention{
			ixn("cache", api.IntentionActionAllow, false), ixn("*", api.IntentionActionDeny, false)}, true, []string{"cache"}},
		{"an L7 intention counts as allowing", []*api.Intention{ixn("api", "", true)}, false, []string{"api"}},
		{"another namespace does not match", []*api.Intention{{DestinationName: "db", DestinationNS: "team-a", Action: api.IntentionActionAllow}}, false, nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got := allowedUpstreams("web", candidates, c.ixns, c.defaultAllow)
			if !reflect.DeepEqual(got, c.want) {
				t.Errorf("got %v, want %v", got, c.want)
			}
		})
	}
}
