package integration

import (
	"fmt"
	"net"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// TestStraitRegisterFlag: -register puts a connect-proxy for the service
// into the catalog (so upstreams find it without any manual registration)
// and removes it when strait stops.
func TestStraitRegisterFlag(t *testing.T) {
	t.Parallel()
	a := startAgent(t)
	const key = 0x21
	app := startApp(t, modeEcho, key)
	src, dst := uniq("web"), uniq("db")
	pubPort := freePort(t)
	srv := startStrait(t, a, "-service", dst, "-listen", hostPort(pubPort), "-service-addr", app.Addr(), "-register")

	eventually(t, 30*time.Second, func() error {
		entries, _, err := a.client.Health().Connect(dst, "", true, nil)
		if err != nil {
			return err
		}
		for _, e := range entries {
			s := e.Service
			if s.Kind == api.ServiceKindConnectProxy && s.Port == pubPort && s.Proxy != nil && s.Proxy.DestinationServiceName == dst {
				return nil
			}
		}
		return fmt.Errorf("no passing connect-proxy for %s on port %d in the catalog (%d entries)", dst, pubPort, len(entries))
	})

	up := hostPort(freePort(t))
	startStrait(t, a, "-service", src, "-upstream", dst+":"+portOf(up))
	eventually(t, 30*time.Second, func() error { return echoVia("tcp", up, 8192, key) })

	srv.stop(t)
	if srv.waitErr != nil {
		t.Fatalf("strait -register exited with %v on SIGTERM", srv.waitErr)
	}
	eventually(t, 10*time.Second, func() error {
		svcs, err := a.client.Agent().Services()
		if err != nil {
			return err
		}
		for id, s := range svcs {
			if s.Kind == api.ServiceKindConnectProxy && s.Proxy != nil && s.Proxy.DestinationServiceName == dst {
				return fmt.Errorf("registration %s still present after strait stopped", id)
			}
		}
		return nil
	})
}

// TestStraitShutdownGrace: on SIGTERM strait stops accepting at once, lets
// live connections finish within -shutdown-grace and exits 0 as soon as
// they are done; connections still open when the grace ends are closed.
func TestStraitShutdownGrace(t *testing.T) {
	t.Parallel()
	a := startAgent(t)
	const key = 0x31

	start := func(t *testing.T, grace string) (*proc, string, net.Conn) {
		app := startApp(t, modeEcho, key)
		dst := uniq("db")
		pub := hostPort(freePort(t))
		p := startStrait(t, a, "-service", dst, "-listen", pub, "-service-addr", app.Addr(), "-shutdown-grace", grace)
		cert := a.leaf(t, uniq("web"))
		c, err := dialMesh(pub, meshClientConfig(&cert, a.roots(t), a.spiffeID(dst)))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		if err := roundTrip(c, randomBytes(t, 4096), key, 10*time.Second); err != nil {
			t.Fatal(err)
		}
		return p, pub, c
	}

	t.Run("connection finishes within the grace", func(t *testing.T) {
		p, pub, c := start(t, "20s")
		if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		eventually(t, 5*time.Second, func() error { return dialFails(pub) })
		if err := roundTrip(c, randomBytes(t, 64*1024), key, 10*time.Second); err != nil {
			t.Fatalf("live connection during the grace period: %v", err)
		}
		if p.exited() {
			t.Fatalf("strait exited while a connection was still live")
		}
		c.Close()
		select {
		case <-p.done:
		case <-time.After(5 * time.Second):
			t.Fatalf("strait still running 5s after its last connection closed (grace 20s)")
		}
		if p.waitErr != nil {
			t.Fatalf("exit after drain: %v", p.waitErr)
		}
	})

	t.Run("grace expires", func(t *testing.T) {
		const grace = time.Second
		p, _, c := start(t, grace.String())
		sent := time.Now()
		if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		select {
		case <-p.done:
		case <-time.After(grace + 5*time.Second):
			t.Fatalf("strait still running %s after SIGTERM with -shutdown-grace %s", grace+5*time.Second, grace)
		}
		t.Logf("exited %s after SIGTERM (grace %s) with a connection open", time.Since(sent).Round(time.Millisecond), grace)
		if took := time.Since(sent); took < grace*8/10 {
			t.Errorf("strait exited after %s, before the %s grace", took, grace)
		}
		if p.waitErr != nil {
			t.Errorf("exit after the grace: %v", p.waitErr)
		}
		if err := refused(c, 5*time.Second); err != nil {
			t.Fatalf("connection still open after strait exited: %v", err)
		}
	})
}

// TestStraitUpstreamBindForms: -upstream binds on a unix socket
// (name:unix:/path) and on an IPv6 loopback ([::1]:port).
func TestStraitUpstreamBindForms(t *testing.T) {
	t.Parallel()
	a := startAgent(t)
	const key1, key2 = 0x12, 0x34
	app := startApp(t, modeEcho, key1)
	dst1, dst2, src := uniq("db"), uniq("native"), uniq("web")
	pub := freePort(t)
	startStrait(t, a, "-service", dst1, "-listen", hostPort(pub), "-service-addr", app.Addr())
	a.registerProxy(t, dst1, pub)
	startNativeServer(t, a, dst2, key2)

	sock := filepath.Join(t.TempDir(), "up.sock")
	v6 := ipv6Loopback(t)
	args := []string{"-service", src, "-upstream", dst1 + ":unix:" + sock}
	var v6addr string
	if v6 {
		v6addr = fmt.Sprintf("[::1]:%d", freePort(t))
		args = append(args, "-upstream", dst2+":"+v6addr)
	}
	startStrait(t, a, args...)

	t.Run("unix socket", func(t *testing.T) {
		eventually(t, 30*time.Second, func() error { return echoVia("unix", sock, 64*1024, key1) })
	})
	t.Run("IPv6 loopback", func(t *testing.T) {
		if !v6 {
			t.Skip("this host cannot bind [::1]; IPv6 upstream bind not tested")
		}
		eventually(t, 30*time.Second, func() error { return echoVia("tcp", v6addr, 64*1024, key2) })
	})
}

func ipv6Loopback(t testing.TB) bool {
	l, err := net.Listen("tcp", "[::1]:0")
	if err != nil {
		t.Logf("no IPv6 loopback: %v", err)
		return false
	}
	l.Close()
	return true
}
