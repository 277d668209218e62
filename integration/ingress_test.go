package integration

// Ingress gateways (strait -gateway ingress) against a real agent: clients
// outside the mesh reach mesh services on the listeners of the gateway's
// config entry.

import (
	"fmt"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

func (a *agent) setIngress(t testing.TB, gw string, ports map[int]string) {
	t.Helper()
	e := &api.IngressGatewayConfigEntry{Kind: api.IngressGateway, Name: gw}
	for port, svc := range ports {
		e.Listeners = append(e.Listeners, api.IngressListener{Port: port, Protocol: "tcp", Services: []api.IngressService{{Name: svc}}})
	}
	a.setEntry(t, e)
}

// TestIngressGateway: a client with no sidecar reaches a mesh service (a
// strait sidecar in front of the app) through a strait ingress gateway;
// the sidecar sees the gateway's identity, so an intention on the
// gateway's name governs it; listeners follow the config entry without a
// restart.
func TestIngressGateway(t *testing.T) {
	t.Parallel()
	a := startAgent(t)
	db, gwName := uniq("db"), uniq("ing")
	app := startApp(t, modeEcho, 0x33)
	pub := freePort(t)
	startStrait(t, a, "-service", db, "-listen", hostPort(pub), "-service-addr", app.Addr())
	a.registerProxy(t, db, pub)

	ports := freePorts(t, 2)
	a.setIngress(t, gwName, map[int]string{ports[0]: db})
	startGatewayKind(t, a, "ingress", "-service", gwName, "-register", "-address", hostPort(freePort(t)))
	eventually(t, 30*time.Second, func() error {
		svcs, err := a.client.Agent().Services()
		if err != nil {
			return err
		}
		if s, ok := svcs[gwName]; !ok || s.Kind != api.ServiceKindIngressGateway {
			return fmt.Errorf("gateway registration %+v", s)
		}
		return nil
	})
	in := hostPort(ports[0])
	eventually(t, 30*time.Second, func() error { return echoVia("tcp", in, 64<<10, 0x33) })

	// An intention from another source does not matter; one from the
	// gateway's name does.
	a.setIntention(t, uniq("web"), db, api.IntentionActionDeny)
	consistently(t, 2*time.Second, func() error { return echoVia("tcp", in, 1024, 0x33) })
	a.setIntention(t, gwName, db, api.IntentionActionDeny)
	eventually(t, 30*time.Second, func() error { return refusedVia("tcp", in) })
	// Once the sidecar has the deny, the app sees none of the gateway's
	// connections.
	accepted := app.Accepts()
	if err := refusedVia("tcp", in); err != nil {
		t.Errorf("after the deny: %v", err)
	}
	if got := app.Accepts(); got != accepted {
		t.Errorf("app accepted %d connections after the gateway was denied", got-accepted)
	}
	a.setIntention(t, gwName, db, api.IntentionActionAllow)
	eventually(t, 30*time.Second, func() error { return echoVia("tcp", in, 1024, 0x33) })

	// Listeners follow the entry: a new port opens, the removed one closes.
	a.setIngress(t, gwName, map[int]string{ports[1]: db})
	eventually(t, 30*time.Second, func() error { return echoVia("tcp", hostPort(ports[1]), 1024, 0x33) })
	eventually(t, 30*time.Second, func() error { return dialFails(in) })
}
