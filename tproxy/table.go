package tproxy

import (
	"cmp"
	"context"
	"net"
	"net/netip"
	"slices"

	"github.com/straitproxy/strait/upstream"
)

// Dialer is what the outbound listener needs of an upstream
// (*upstream.Upstream).
type Dialer interface {
	DialConn(ctx context.Context, opts upstream.DialOptions) (net.Conn, upstream.DialResult, func(), error)
	Ready() <-chan struct{}
}

// Route is where the outbound listener sends a connection whose original
// destination IP is in the table.
type Route struct {
	// Upstream names the upstream (the destination service).
	Upstream string
	Dialer   Dialer
	// Direct is set when the destination is an instance registered with
	// DialedDirectly: the connection goes to that very address
	// (upstream.DialOptions.Direct) rather than through the chain.
	Direct bool
}

// Claim is one upstream's addresses, as it asks for them in the table.
type Claim struct {
	Name      string
	Dialer    Dialer
	Addresses upstream.Addresses
}

// Conflict is an address that two upstreams claim; Kept got it.
type Conflict struct {
	Addr          netip.Addr
	Kept, Dropped string
}

// Table routes by destination IP, whatever the port: Consul's outbound
// filter chains, one per upstream, each matching its addresses exactly.
// A Table is immutable; a new one replaces it when addresses change.
type Table struct {
	routes map[netip.Addr]Route
}

// NewTable builds the table of claims. An address claimed twice goes to
// a virtual claim over a direct one (a virtual IP names a service; an
// instance address only one of its instances), then to the upstream whose
// name sorts first, so that the outcome does not depend on map order; the
// loser is reported. IPv4-mapped IPv6 addresses are stored unmapped.
func NewTable(claims []Claim) (*Table, []Conflict) {
	claims = slices.Clone(claims)
	slices.SortFunc(claims, func(a, b Claim) int { return cmp.Compare(a.Name, b.Name) })
	t := &Table{routes: map[netip.Addr]Route{}}
	var conflicts []Conflict
	add := func(ip netip.Addr, r Route) {
		ip = ip.Unmap()
		if !ip.IsValid() {
			return
		}
		old, ok := t.routes[ip]
		switch {
		case !ok:
			t.routes[ip] = r
		case old.Upstream == r.Upstream:
			if old.Direct && !r.Direct {
				t.routes[ip] = r
			}
		case old.Direct && !r.Direct:
			t.routes[ip] = r
			conflicts = append(conflicts, Conflict{Addr: ip, Kept: r.Upstream, Dropped: old.Upstream})
		default:
			conflicts = append(conflicts, Conflict{Addr: ip, Kept: old.Upstream, Dropped: r.Upstream})
		}
	}
	for _, c := range claims {
		for _, ip := range c.Addresses.Virtual {
			add(ip, Route{Upstream: c.Name, Dialer: c.Dialer})
		}
	}
	for _, c := range claims {
		for _, ip := range c.Addresses.Direct {
			add(ip, Route{Upstream: c.Name, Dialer: c.Dialer, Direct: true})
		}
	}
	return t, conflicts
}

// Lookup returns the route of a destination IP.
func (t *Table) Lookup(ip netip.Addr) (Route, bool) {
	if t == nil {
		return Route{}, false
	}
	r, ok := t.routes[ip.Unmap()]
	return r, ok
}

// Len is the number of addresses routed.
func (t *Table) Len() int {
	if t == nil {
		return 0
	}
	return len(t.routes)
}

// RouteStatus is one routed address, for the admin listener.
type RouteStatus struct {
	Addr     string `json:"addr"`
	Upstream string `json:"upstream"`
	Direct   bool   `json:"direct,omitempty"`
}

// Routes lists the table by address.
func (t *Table) Routes() []RouteStatus {
	if t == nil {
		return nil
	}
	out := make([]RouteStatus, 0, len(t.routes))
	for ip, r := range t.routes {
		out = append(out, RouteStatus{Addr: ip.String(), Upstream: r.Upstream, Direct: r.Direct})
	}
	slices.SortFunc(out, func(a, b RouteStatus) int {
		return netip.MustParseAddr(a.Addr).Compare(netip.MustParseAddr(b.Addr))
	})
	return out
}
