package integration

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// startPeers starts two independent dev agents (own CA and trust domain
// each; gRPC TLS on, which peering tokens require) and peers them on
// loopback: b generates a token for "cluster-a", a establishes it as
// "cluster-b". It waits until both sides see the peering active.
func startPeers(t *testing.T) (a, b *agent) {
	t.Helper()
	a = startAgentArgs(t, "-grpc-tls-port", strconv.Itoa(freePort(t)))
	b = startAgentArgs(t, "-datacenter", "dc2", "-grpc-tls-port", strconv.Itoa(freePort(t)))
	if a.trustDomain == b.trustDomain {
		t.Fatalf("both agents in trust domain %s", a.trustDomain)
	}
	var token string
	eventually(t, 30*time.Second, func() error {
		resp, _, err := b.client.Peerings().GenerateToken(ctxTimeout(t, 10*time.Second), api.PeeringGenerateTokenRequest{PeerName: "cluster-a"}, nil)
		if err != nil {
			return err
		}
		token = resp.PeeringToken
		return nil
	})
	if _, _, err := a.client.Peerings().Establish(ctxTimeout(t, 10*time.Second), api.PeeringEstablishRequest{PeerName: "cluster-b", PeeringToken: token}, nil); err != nil {
		t.Fatalf("establishing the peering: %v", err)
	}
	for _, side := range []struct {
		ag   *agent
		peer string
	}{{a, "cluster-b"}, {b, "cluster-a"}} {
		eventually(t, 60*time.Second, func() error {
			p, _, err := side.ag.client.Peerings().Read(ctxTimeout(t, 10*time.Second), side.peer, nil)
			if err != nil {
				return err
			}
			if p == nil || p.State != api.PeeringStateActive || len(p.PeerCAPems) == 0 {
				return fmt.Errorf("peering %s on %s not active with roots yet: %+v", side.peer, side.ag.dc, p)
			}
			return nil
		})
	}
	return a, b
}

// TestPeeringUpstreamThroughMeshGateway: a strait upstream in cluster A
// (-upstream db@cluster-b) reaches db in cluster B, an independent
// cluster peered on loopback, through B's strait mesh gateway: A's agent
// lists B's gateway (WAN address) as db's imported instance with the
// peered SNI and db's SPIFFE ID in B's trust domain; B's gateway routes
// that SNI because the exported-services entry offers db to cluster-a;
// B's strait sidecar verifies A's client against A's roots. A local deny
// for web does not touch A's web; a SourcePeer deny refuses it.
func TestPeeringUpstreamThroughMeshGateway(t *testing.T) {
	t.Parallel()
	a, b := startPeers(t)
	const key = 0x3c
	app := startApp(t, modeEcho, key)
	db, web := uniq("db"), uniq("web")

	// Cluster B: db's sidecar, db itself, its mesh gateway, the export.
	pub := hostPort(freePort(t))
	sidecar := startStrait(t, b, "-service", db, "-listen", pub, "-service-addr", app.Addr(), "-register")
	if err := b.client.Agent().ServiceRegister(&api.AgentServiceRegistration{
		ID: db, Name: db, Address: "127.0.0.1", Port: app.Port(),
	}); err != nil {
		t.Fatal(err)
	}
	ports := freePorts(t, 2)
	gwLAN, gwWAN := hostPort(ports[0]), hostPort(ports[1])
	gw := startGateway(t, b, "-register", "-address", gwLAN, "-wan-address", gwWAN, "-access-log", "on")
	if _, _, err := b.client.ConfigEntries().Set(&api.ExportedServicesConfigEntry{
		Name:     "default",
		Services: []api.ExportedService{{Name: db, Consumers: []api.ServiceConsumer{{Peer: "cluster-a"}}}},
	}, nil); err != nil {
		t.Fatalf("exported-services: %v", err)
	}

	// Cluster A sees db imported: B's gateway's WAN address, the peered
	// SNI (B's name for A, B's trust domain) and db's identity in B.
	wantSNI := fmt.Sprintf("%s.default.default.cluster-a.external.%s", db, b.trustDomain)
	eventually(t, 60*time.Second, func() error {
		var entries []struct {
			Service struct {
				Port            int
				TaggedAddresses map[string]api.ServiceAddress
				Connect         struct {
					PeerMeta struct{ SNI, SpiffeID []string }
				}
			}
		}
		q := (&api.QueryOptions{Peer: "cluster-b"}).WithContext(ctxTimeout(t, 10*time.Second))
		if _, err := a.client.Raw().Query("/v1/health/connect/"+db, &entries, q); err != nil {
			return err
		}
		if len(entries) != 1 {
			return fmt.Errorf("%d imported instances of %s", len(entries), db)
		}
		s := entries[0].Service
		if w := s.TaggedAddresses["wan"]; hostPort(w.Port) != gwWAN {
			return fmt.Errorf("imported instance's wan address %+v, want B's gateway %s", w, gwWAN)
		}
		pm := s.Connect.PeerMeta
		if len(pm.SNI) != 1 || pm.SNI[0] != wantSNI {
			return fmt.Errorf("PeerMeta.SNI %v, want %s", pm.SNI, wantSNI)
		}
		if want := fmt.Sprintf("spiffe://%s/ns/default/dc/dc2/svc/%s", b.trustDomain, db); len(pm.SpiffeID) == 0 || pm.SpiffeID[0] != want {
			return fmt.Errorf("PeerMeta.SpiffeID %v, want %s first", pm.SpiffeID, want)
		}
		return nil
	})

	// Cluster A: web with an upstream in the peer.
	up := hostPort(freePort(t))
	client := startStrait(t, a, "-service", web, "-upstream", db+"@cluster-b:"+strings.TrimPrefix(up, "127.0.0.1:"), "-access-log", "on")
	eventually(t, 60*time.Second, func() error { return echoVia("tcp", up, 4096, key) })

	// The path: B's gateway routed the peered SNI to the sidecar, which
	// saw A's web, verified against A's roots, as a client from cluster-a.
	wantSrc := fmt.Sprintf("spiffe://%s/ns/default/dc/%s/svc/%s", a.trustDomain, a.dc, web)
	// (The connection is a strait tunnel: the gateway logs it when it
	// ends; its route is counted at once.)
	if v := metricValue(t, gw, `gateway_connections_total{result="routed"}`); v < 1 {
		t.Errorf("B's gateway routed %v connections", v)
	}
	eventually(t, 10*time.Second, func() error {
		if !strings.Contains(client.Output(), "endpoint="+gwWAN+" ") || !strings.Contains(client.Output(), "target="+db+".default.default.external.cluster-b") {
			return errors.New("A's client logged no connection to B's gateway's WAN address for the peer target")
		}
		if !strings.Contains(sidecar.Output(), "inbound peers trusted") || !strings.Contains(sidecar.Output(), "cluster-a/"+a.trustDomain) {
			return errors.New("B's sidecar logged no trust of cluster-a's roots")
		}
		if !strings.Contains(client.Output(), "peer roots") {
			return errors.New("A's client logged no peer roots")
		}
		return nil
	})
	if err := echoVia("tcp", up, 1<<20, key); err != nil {
		t.Fatalf("1 MiB through the peering: %v", err)
	}

	// A name db is not exported under is not routed by B's gateway.
	if err := refusedAtGateway(gwWAN, fmt.Sprintf("%s.default.default.cluster-z.external.%s", db, b.trustDomain)); err != nil {
		t.Errorf("peered name for a peer db is not exported to: %v", err)
	}
	if v := metricValue(t, gw, `gateway_unknown_sni_total{reason="not_exported"}`); v != 1 {
		t.Errorf("not_exported %v, want 1", v)
	}

	// A deny for B's own web does not apply to cluster-a's web.
	setSources(t, b, db, &api.SourceIntention{Name: web, Action: api.IntentionActionDeny})
	consistently(t, 3*time.Second, func() error { return echoVia("tcp", up, 1024, key) })

	// A deny with SourcePeer cluster-a refuses it.
	setSources(t, b, db,
		&api.SourceIntention{Name: web, Action: api.IntentionActionDeny},
		&api.SourceIntention{Name: web, Peer: "cluster-a", Action: api.IntentionActionDeny})
	eventually(t, 30*time.Second, func() error { return refusedVia("tcp", up) })
	eventually(t, 10*time.Second, func() error {
		line := "reason=denied"
		for _, l := range strings.Split(sidecar.Output(), "\n") {
			if strings.Contains(l, line) && strings.Contains(l, wantSrc) && strings.Contains(l, "peer:cluster-a") {
				return nil
			}
		}
		return fmt.Errorf("B's sidecar logged no denial of %s by the cluster-a intention", wantSrc)
	})
}

// setSources replaces dst's service-intentions entry in ag with sources.
func setSources(t *testing.T, ag *agent, dst string, sources ...*api.SourceIntention) {
	t.Helper()
	if _, _, err := ag.client.ConfigEntries().Set(&api.ServiceIntentionsConfigEntry{
		Kind: api.ServiceIntentions, Name: dst, Sources: sources,
	}, nil); err != nil {
		t.Fatalf("service-intentions for %s: %v", dst, err)
	}
}
