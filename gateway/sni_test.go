package gateway

import (
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

const testTD = "11111111-2222-3333-4444-555555555555.consul"

func TestParseName(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		sni    string
		want   Name
		reason string
	}{
		{"web.default.dc1.internal." + testTD, Name{Kind: KindLocal, Datacenter: "dc1", Service: "web", Namespace: "default"}, ""},
		{"v1.web.default.dc1.internal." + testTD, Name{Kind: KindLocal, Datacenter: "dc1", Service: "web", Subset: "v1", Namespace: "default"}, ""},
		{"db.default.dc2.internal." + testTD, Name{Kind: KindRemote, Datacenter: "dc2"}, ""},
		{"v2.db.default.dc2.internal." + testTD, Name{Kind: KindRemote, Datacenter: "dc2"}, ""},
		{"anything.dc3.internal." + testTD, Name{Kind: KindRemote, Datacenter: "dc3"}, ""},
		{"", Name{}, UnknownNoSNI},
		{"web.default.dc1.internal.other.consul", Name{}, UnknownWrongTrustDomain},
		{"web.default.dc1.internal." + testTD + ".evil", Name{}, UnknownWrongTrustDomain},
		{"x" + testTD, Name{}, UnknownWrongTrustDomain},
		{"web.default.ap1.dc1.internal-v1." + testTD, Name{}, UnknownPartition},
		{"web.default.dc1.query." + testTD, Name{}, UnknownNotService},
		{"web.default.default.peer1.external." + testTD, Name{Kind: KindLocal, Datacenter: "dc1", Service: "web", Namespace: "default", Peer: "peer1"}, ""},
		{"web.default.ap1.peer1.external." + testTD, Name{}, UnknownPartition},
		{"web.ns1.default.peer1.external." + testTD, Name{}, UnknownNamespace},
		{"web.default.peer1.external." + testTD, Name{}, UnknownMalformed},
		{"web.default.default.peer1.external.other.consul", Name{}, UnknownWrongTrustDomain},
		{"dc1.internal." + testTD, Name{}, UnknownMalformed},
		{"default.dc1.internal." + testTD, Name{}, UnknownMalformed},
		{"a.b.c.default.dc1.internal." + testTD, Name{}, UnknownMalformed},
		{"web.team.dc1.internal." + testTD, Name{}, UnknownNamespace},
	} {
		got, reason := ParseName(tc.sni, testTD, "DC1")
		if got != tc.want || reason != tc.reason {
			t.Errorf("ParseName(%q) = %+v, %q; want %+v, %q", tc.sni, got, reason, tc.want, tc.reason)
		}
	}
}

func entry(addr string, port int, statuses ...string) *api.ServiceEntry {
	e := &api.ServiceEntry{
		Node:    &api.Node{Node: "n1", Address: "10.0.0.1", TaggedAddresses: map[string]string{"wan": "203.0.113.1"}},
		Service: &api.AgentService{ID: "s1", Address: addr, Port: port, Kind: api.ServiceKindMeshGateway},
	}
	for _, s := range statuses {
		e.Checks = append(e.Checks, &api.HealthCheck{Status: s})
	}
	return e
}

func TestHealthy(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		statuses    []string
		onlyPassing bool
		want        bool
	}{
		{nil, false, true},
		{[]string{api.HealthPassing}, true, true},
		{[]string{api.HealthPassing, api.HealthWarning}, false, true},
		{[]string{api.HealthPassing, api.HealthWarning}, true, false},
		{[]string{api.HealthPassing, api.HealthCritical}, false, false},
		{[]string{api.HealthMaint}, false, false},
	} {
		if got := healthy(entry("", 1, tc.statuses...), tc.onlyPassing); got != tc.want {
			t.Errorf("healthy(%v, onlyPassing %v) = %v, want %v", tc.statuses, tc.onlyPassing, got, tc.want)
		}
	}
}

func TestAddresses(t *testing.T) {
	t.Parallel()
	e := entry("", 8443)
	if ep, _ := lanEndpoint(e); ep.Addr != "10.0.0.1:8443" {
		t.Errorf("LAN without a service address: %s, want the node's", ep.Addr)
	}
	if ep, _ := wanEndpoint(e); ep.Addr != "203.0.113.1:8443" {
		t.Errorf("WAN without service addresses: %s, want the node's wan address", ep.Addr)
	}
	e = entry("10.0.0.9", 8443)
	if ep, _ := lanEndpoint(e); ep.Addr != "10.0.0.9:8443" {
		t.Errorf("LAN: %s, want the service address", ep.Addr)
	}
	if ep, _ := wanEndpoint(e); ep.Addr != "10.0.0.9:8443" {
		t.Errorf("WAN with a service address and no wan tag: %s, want the service address", ep.Addr)
	}
	e.Service.TaggedAddresses = map[string]api.ServiceAddress{"wan": {Address: "198.51.100.2", Port: 443}}
	if ep, _ := wanEndpoint(e); ep.Addr != "198.51.100.2:443" {
		t.Errorf("WAN: %s, want the wan tagged address and port", ep.Addr)
	}
	if _, ok := lanEndpoint(entry("10.0.0.9", 0)); ok {
		t.Error("an instance without a port is not an endpoint")
	}
}

func TestSubsetSelection(t *testing.T) {
	t.Parallel()
	c := NewCatalog(CatalogOptions{})
	c.resolvers["api"] = &api.ServiceResolverConfigEntry{
		Name: "api", DefaultSubset: "v1", ConnectTimeout: 3 * time.Second,
		Subsets: map[string]api.ServiceResolverSubset{
			"v1": {Filter: `Service.Meta.version == "v1"`},
			"v2": {Filter: `Service.Meta.version == "v2"`, OnlyPassing: true},
		},
	}
	for _, tc := range []struct {
		service, subset string
		filter          string
		onlyPassing     bool
		ok              bool
	}{
		{"api", "", `Service.Meta.version == "v1"`, false, true}, // DefaultSubset
		{"api", "v2", `Service.Meta.version == "v2"`, true, true},
		{"api", "v3", "", false, false},
		{"web", "", "", false, true}, // no resolver
		{"web", "v1", "", false, false},
	} {
		filter, onlyPassing, _, ok := c.subsetLocked(tc.service, tc.subset)
		if filter != tc.filter || onlyPassing != tc.onlyPassing || ok != tc.ok {
			t.Errorf("%s subset %q: %q %v %v; want %q %v %v", tc.service, tc.subset, filter, onlyPassing, ok, tc.filter, tc.onlyPassing, tc.ok)
		}
	}
	if _, _, timeout, _ := c.subsetLocked("api", "v2"); timeout != 3*time.Second {
		t.Errorf("connect timeout %s, want the resolver's 3s", timeout)
	}
}
