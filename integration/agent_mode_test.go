package integration

import (
	"crypto/tls"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/consul/connect"
)

// TestStraitSidecarReconfigure: strait -sidecar-for <service-id> serves the
// sidecar registration. Re-registering the service with one upstream
// removed and another added starts the new listener and stops the old one
// without restarting strait (same pid, "proxy ready" logged once), while
// long-lived connections through the public listener and through the
// upstream that stays stay open and keep working.
func TestStraitSidecarReconfigure(t *testing.T) {
	t.Parallel()
	a := startAgent(t)
	const keyApp, keyA, keyB, keyC = 0x01, 0x0a, 0x0b, 0x0c
	app := startApp(t, modeEcho, keyApp)
	svc := uniq("app")
	nameA, nameB, nameC := uniq("alpha"), uniq("bravo"), uniq("charlie")
	startNativeServer(t, a, nameA, keyA)
	startNativeServer(t, a, nameB, keyB)
	startNativeServer(t, a, nameC, keyC)
	ports := freePorts(t, 4)
	sidecarPort, pA, pB, pC := ports[0], ports[1], ports[2], ports[3]
	upstream := func(name string, port int) api.Upstream {
		return api.Upstream{DestinationName: name, LocalBindAddress: "127.0.0.1", LocalBindPort: port}
	}
	register := func(ups ...api.Upstream) {
		t.Helper()
		err := a.client.Agent().ServiceRegister(&api.AgentServiceRegistration{
			ID:      svc,
			Name:    svc,
			Address: "127.0.0.1",
			Port:    app.Port(),
			Connect: &api.AgentServiceConnect{
				SidecarService: &api.AgentServiceRegistration{
					Address: "127.0.0.1",
					Port:    sidecarPort,
					Proxy:   &api.AgentServiceConnectProxyConfig{Upstreams: ups},
				},
			},
		})
		if err != nil {
			t.Fatalf("register %s with its sidecar: %v", svc, err)
		}
	}
	register(upstream(nameA, pA), upstream(nameC, pC))

	s := startStrait(t, a, "-sidecar-for", svc)
	pid := s.Pid()
	eventually(t, 30*time.Second, func() error { return echoVia("tcp", hostPort(pA), 2048, keyA) })
	eventually(t, 30*time.Second, func() error { return echoVia("tcp", hostPort(pC), 2048, keyC) })

	// Long-lived connection 1: a Connect-native client through the
	// sidecar's public listener to the app.
	client := nativeService(t, a, uniq("client"))
	var public net.Conn
	eventually(t, 30*time.Second, func() error {
		c, err := client.Dial(ctxTimeout(t, 10*time.Second), &connect.StaticResolver{
			Addr: hostPort(sidecarPort), CertURI: a.serviceURI(svc),
		})
		if err != nil {
			return err
		}
		if err := roundTrip(c, randomBytes(t, 4096), keyApp, 10*time.Second); err != nil {
			c.Close()
			return err
		}
		public = c
		return nil
	})
	defer public.Close()
	// Long-lived connection 2: through upstream C, which stays.
	viaC, err := net.Dial("tcp", hostPort(pC))
	if err != nil {
		t.Fatal(err)
	}
	defer viaC.Close()
	if err := roundTrip(viaC, randomBytes(t, 4096), keyC, 10*time.Second); err != nil {
		t.Fatalf("via upstream %s: %v", nameC, err)
	}

	// Reconfigure: drop A, add B.
	register(upstream(nameC, pC), upstream(nameB, pB))
	eventually(t, 30*time.Second, func() error { return echoVia("tcp", hostPort(pB), 2048, keyB) })
	eventually(t, 30*time.Second, func() error { return dialFails(hostPort(pA)) })

	if s.exited() || s.Pid() != pid {
		t.Fatalf("strait restarted or exited during the reconfiguration")
	}
	if n := strings.Count(s.Output(), "proxy ready"); n != 1 {
		t.Errorf(`strait logged "proxy ready" %d times, want once (no restart)`, n)
	}
	for i := 0; i < 3; i++ {
		if err := roundTrip(public, randomBytes(t, 64*1024), keyApp, 10*time.Second); err != nil {
			t.Fatalf("long-lived public-listener connection after the reconfiguration: %v", err)
		}
		if err := roundTrip(viaC, randomBytes(t, 64*1024), keyC, 10*time.Second); err != nil {
			t.Fatalf("long-lived connection via the kept upstream after the reconfiguration: %v", err)
		}
	}
	if err := echoVia("tcp", hostPort(pC), 2048, keyC); err != nil {
		t.Fatalf("new connection via the kept upstream: %v", err)
	}
}

// TestStraitAgentModeConfigKeys: in agent mode (-proxy-id) strait honours
// the built-in proxy's documented Proxy.Config keys that the built-in
// itself ignores: bind_address/bind_port override the registration's
// Address/Port for the public listener, local_service_address overrides
// LocalServiceAddress:Port, an upstream's connect_timeout_ms (a JSON number
// from the agent) bounds dialing a destination that never answers the TLS
// handshake, and an upstream's LocalBindSocketPath is a unix socket.
func TestStraitAgentModeConfigKeys(t *testing.T) {
	t.Parallel()
	a := startAgent(t)
	const keyWrong, keyRight, keyNative = 0x0f, 0xf0, 0x5f
	appWrong := startApp(t, modeEcho, keyWrong)
	appRight := startApp(t, modeEcho, keyRight)
	dst, natName, hole := uniq("db"), uniq("native"), uniq("blackhole")
	startNativeServer(t, a, natName, keyNative)

	// A destination that accepts TCP and never says a word.
	holeLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer holeLn.Close()
	go func() {
		var held []net.Conn
		defer func() {
			for _, c := range held {
				c.Close()
			}
		}()
		for {
			c, err := holeLn.Accept()
			if err != nil {
				return
			}
			held = append(held, c)
		}
	}()
	a.registerProxy(t, hole, holeLn.Addr().(*net.TCPAddr).Port)

	ports := freePorts(t, 3)
	regPort, bindPort, holePort := ports[0], ports[1], ports[2]
	sock := filepath.Join(t.TempDir(), "native.sock")
	const connectTimeout = 500 * time.Millisecond
	id := uniq("db-proxy")
	err = a.client.Agent().ServiceRegister(&api.AgentServiceRegistration{
		Kind:    api.ServiceKindConnectProxy,
		ID:      id,
		Name:    dst + "-proxy",
		Address: "127.0.0.1",
		Port:    regPort,
		Proxy: &api.AgentServiceConnectProxyConfig{
			DestinationServiceName: dst,
			LocalServiceAddress:    "127.0.0.1",
			LocalServicePort:       appWrong.Port(),
			Config: map[string]interface{}{
				"bind_address":          "127.0.0.2",
				"bind_port":             bindPort,
				"local_service_address": appRight.Addr(),
			},
			Upstreams: []api.Upstream{
				{
					DestinationName:  hole,
					LocalBindAddress: "127.0.0.1",
					LocalBindPort:    holePort,
					Config:           map[string]interface{}{"connect_timeout_ms": connectTimeout.Milliseconds()},
				},
				{DestinationName: natName, LocalBindSocketPath: sock},
			},
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	startStrait(t, a, "-proxy-id", id)

	t.Run("bind_address and bind_port", func(t *testing.T) {
		cert := a.leaf(t, uniq("web"))
		cfg := meshClientConfig(&cert, a.roots(t), a.spiffeID(dst))
		var c *tls.Conn
		eventually(t, 30*time.Second, func() error {
			var err error
			c, err = dialMesh(fmt.Sprintf("127.0.0.2:%d", bindPort), cfg)
			return err
		})
		defer c.Close()
		if err := roundTrip(c, randomBytes(t, 8192), keyRight, 10*time.Second); err != nil {
			t.Fatalf("public listener on bind_address:bind_port: %v (key %#x means local_service_address was used, %#x the registration's LocalServicePort)", err, keyRight, keyWrong)
		}
		if n := appWrong.Accepts(); n != 0 {
			t.Errorf("the registration's LocalServicePort app was dialed %d times; local_service_address must override it", n)
		}
		if err := dialFails(hostPort(regPort)); err != nil {
			t.Errorf("registration Address:Port: %v; bind_address/bind_port must override it", err)
		}
		if err := dialFails(hostPort(bindPort)); err != nil {
			t.Errorf("127.0.0.1:bind_port: %v; the listener must bind bind_address only", err)
		}
	})

	t.Run("LocalBindSocketPath", func(t *testing.T) {
		eventually(t, 30*time.Second, func() error { return echoVia("unix", sock, 16*1024, keyNative) })
	})

	t.Run("connect_timeout_ms", func(t *testing.T) {
		for i := 0; i < 3; i++ {
			c, err := net.DialTimeout("tcp", hostPort(holePort), 5*time.Second)
			if err != nil {
				t.Fatalf("upstream listener for %s: %v", hole, err)
			}
			start := time.Now()
			err = refused(c, 15*time.Second)
			took := time.Since(start)
			c.Close()
			if err != nil {
				t.Fatalf("upstream to a destination that never handshakes: %v", err)
			}
			t.Logf("closed after %s (connect_timeout_ms %d; default 10s)", took.Round(time.Millisecond), connectTimeout.Milliseconds())
			if took > connectTimeout+3*time.Second {
				t.Fatalf("upstream gave up after %s; connect_timeout_ms is %s", took, connectTimeout)
			}
		}
	})
}
