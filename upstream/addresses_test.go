package upstream

import (
	"context"
	"errors"
	"net/netip"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/straitproxy/strait/config"
	"github.com/straitproxy/strait/internal/testutil"
)

// TestAddressesForTransparentProxy: an implicit upstream's Addresses are
// its chain's virtual IPs and its instances' consul-virtual and virtual
// tagged addresses (any health), plus the addresses of DialedDirectly
// instances; OnAddresses fires when they change; a Direct dial goes to the
// given address with the target's identity, and only to a listed one.
func TestAddressesForTransparentProxy(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	srv := startTLSServer(t, f.ca, "db")
	f.agent.mu.Lock()
	f.agent.vips = map[string][]string{"db": {"240.0.0.6"}} // the chain's AutoVirtualIPs
	f.agent.mu.Unlock()
	direct := proxyEntry("n1", "db", srv.port, api.HealthPassing)
	direct.Service.TaggedAddresses = map[string]api.ServiceAddress{
		"consul-virtual": {Address: "240.0.0.5", Port: srv.port},
		"virtual":        {Address: "10.96.0.10", Port: 5432},
	}
	direct.Service.Proxy.TransparentProxy = &api.TransparentProxyConfig{DialedDirectly: true}
	other := proxyEntry("n2", "db", 1, api.HealthCritical)
	other.Node.Address = "127.0.0.9"
	other.Service.TaggedAddresses = map[string]api.ServiceAddress{"virtual": {Address: "10.96.0.11"}}
	f.agent.setEntries(direct, other)

	var changes atomic.Int64
	opts := f.options(t)
	opts.OnAddresses = func() { changes.Add(1) }
	u := newUpstream(t, config.Upstream{DestinationName: "db", Implicit: true}, opts)
	run(t, u)
	waitReady(t, u)
	want := Addresses{
		Virtual: []netip.Addr{netip.MustParseAddr("10.96.0.10"), netip.MustParseAddr("10.96.0.11"), netip.MustParseAddr("240.0.0.5"), netip.MustParseAddr("240.0.0.6")},
		Direct:  []netip.Addr{netip.MustParseAddr("127.0.0.1")},
	}
	if got := u.Addresses(); !got.Equal(want) {
		t.Fatalf("Addresses = %+v, want %+v", got, want)
	}
	if changes.Load() < 1 {
		t.Error("OnAddresses not called")
	}

	// A direct dial of the listed instance: its address, the target's SNI.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	dst := netip.MustParseAddrPort(srv.addr)
	c, res, release, err := u.DialConn(ctx, DialOptions{Direct: dst})
	if err != nil {
		t.Fatalf("direct dial: %v", err)
	}
	c.Close()
	release()
	if res.Addr != srv.addr || res.Target != "db.default.default.dc1" {
		t.Errorf("direct dial reached %+v", res.Endpoint)
	}
	if snis := srv.sawSNIs(); len(snis) != 1 || snis[0] != "db.default.dc1.internal."+testTD {
		t.Errorf("SNIs %v", snis)
	}
	if _, _, _, err := u.DialConn(ctx, DialOptions{Direct: netip.MustParseAddrPort("127.0.0.9:1")}); err == nil {
		t.Error("a direct dial of an instance not dialed directly succeeded")
	}

	// The tagged address goes away: the addresses change, and say so.
	before := changes.Load()
	direct.Service.TaggedAddresses = nil
	f.agent.setEntries(direct, other)
	testutil.EventuallyNil(t, func() error {
		if slices.Contains(u.Addresses().Virtual, netip.MustParseAddr("10.96.0.10")) || changes.Load() == before {
			return errors.New("tagged address still routed")
		}
		return nil
	})
}
