package integration

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// Discovery chains across two WAN-federated datacenters (startFederation):
// failover to dc2 and back, and the mesh gateway modes through strait
// mesh gateways.

// TestChainFailoverToDC2: a resolver failing over to dc2 sends new
// connections to dc2's instance (dialed at its WAN address, mode none,
// presenting dc2's SPIFFE ID) while dc1's is critical, and back to dc1
// when it passes again.
func TestChainFailoverToDC2(t *testing.T) {
	t.Parallel()
	dc1, dc2 := startFederation(t)
	db := uniq("db")
	const key1, key2 = 0x81, 0x82
	check1 := startChainInstance(t, dc1, db, nil, key1)
	startChainInstance(t, dc2, db, nil, key2)
	dc1.setEntry(t, &api.ServiceResolverConfigEntry{
		Kind: api.ServiceResolver, Name: db,
		Failover: map[string]api.ServiceResolverFailover{"*": {Datacenters: []string{"dc2"}}},
	})
	client, addr := startChainClient(t, dc1, db)
	eventually(t, 30*time.Second, func() error { return allAnsweredBy(addr, 10, key1) })
	eventually(t, 30*time.Second, func() error {
		c, err := upstreamChain(client)
		if err != nil {
			return err
		}
		if len(c.Legs) != 1 || len(c.Legs[0].Targets) != 2 || c.Legs[0].Targets[1] != db+".default.default.dc2" {
			return fmt.Errorf("chain %+v, want the dc2 target second", c)
		}
		for _, tg := range c.Targets {
			if len(tg.Endpoints) != 1 {
				return fmt.Errorf("target %s has %d endpoints", tg.ID, len(tg.Endpoints))
			}
		}
		return nil
	})

	if err := dc1.client.Agent().UpdateTTL(check1, "down", api.HealthCritical); err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, func() error { return allAnsweredBy(addr, 10, key2) })
	if err := dc1.client.Agent().UpdateTTL(check1, "up", api.HealthPassing); err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, func() error { return allAnsweredBy(addr, 10, key1) })
}

// TestChainMeshGatewayModes: a strait sidecar in dc1 (agent mode) has two
// upstreams to a service in dc2, one with mesh gateway mode local, one
// with remote, and strait mesh gateways run in both datacenters. Both
// reach the service, TLS end to end (strait checks dc2's SPIFFE ID). The
// local one goes through dc1's gateway, the remote one straight to dc2's
// gateway's WAN address: stopping dc1's gateway breaks the local upstream
// and not the remote one.
func TestChainMeshGatewayModes(t *testing.T) {
	t.Parallel()
	dc1, dc2 := startFederation(t)
	db := uniq("db")
	const key = 0x91
	startChainInstance(t, dc2, db, nil, key)

	ports := freePorts(t, 5)
	gw2LAN, gw2WAN, gw1Addr := hostPort(ports[0]), hostPort(ports[1]), hostPort(ports[2])
	pLocal, pRemote := ports[3], ports[4]
	startGateway(t, dc2, "-register", "-address", gw2LAN, "-wan-address", gw2WAN, "-access-log", "on")
	gw1 := startGateway(t, dc1, "-register", "-address", gw1Addr, "-access-log", "on")

	// Consul refuses two upstreams to one service and datacenter in one
	// registration: one sidecar per mode.
	sidecar := func(mode api.MeshGatewayMode, port int) *proc {
		web := uniq("web")
		err := dc1.client.Agent().ServiceRegister(&api.AgentServiceRegistration{
			ID: web, Name: web, Address: "127.0.0.1", Port: freePort(t),
			Connect: &api.AgentServiceConnect{SidecarService: &api.AgentServiceRegistration{
				Address: "127.0.0.1", Port: freePort(t),
				Proxy: &api.AgentServiceConnectProxyConfig{Upstreams: []api.Upstream{
					{DestinationName: db, Datacenter: "dc2", LocalBindAddress: "127.0.0.1", LocalBindPort: port,
						MeshGateway: api.MeshGatewayConfig{Mode: mode}},
				}},
			}},
		})
		if err != nil {
			t.Fatal(err)
		}
		return startStrait(t, dc1, "-sidecar-for", web)
	}
	local, remote := sidecar(api.MeshGatewayModeLocal, pLocal), sidecar(api.MeshGatewayModeRemote, pRemote)
	eventually(t, 60*time.Second, func() error { return allAnsweredBy(hostPort(pLocal), 5, key) })
	eventually(t, 60*time.Second, func() error { return allAnsweredBy(hostPort(pRemote), 5, key) })

	// The endpoints are the gateways: dc1's at its LAN address, dc2's at
	// its WAN address.
	for p, want := range map[*proc]struct{ via, addr string }{
		local: {"local", gw1Addr}, remote: {"remote", gw2WAN},
	} {
		c, err := upstreamChain(p)
		if err != nil {
			t.Fatal(err)
		}
		if len(c.Targets) != 1 || c.Targets[0].Via != want.via || len(c.Targets[0].Endpoints) != 1 ||
			c.Targets[0].Endpoints[0].Addr != want.addr {
			t.Errorf("chain %+v, want one target via %s gateways at %s", c, want.via, want.addr)
		}
	}
	if !strings.Contains(gw1.Output(), "route=remote target=dc2") {
		t.Errorf("dc1's gateway logged no connection routed to dc2")
	}

	// Without dc1's gateway, local mode has no way to dc2; remote mode
	// does not need it.
	gw1.stop(t)
	eventually(t, 30*time.Second, func() error {
		if _, err := answeredBy(hostPort(pLocal), ""); err == nil {
			return errors.New("the local-mode upstream still works without dc1's gateway")
		}
		return nil
	})
	if err := allAnsweredBy(hostPort(pRemote), 10, key); err != nil {
		t.Fatalf("remote mode without dc1's gateway: %v", err)
	}
}
