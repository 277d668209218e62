package integration

import (
	"crypto/tls"
	"fmt"
	"net"
	"slices"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/consul/connect"
	"github.com/hashicorp/go-hclog"
)

// TestInteropStraitToBuiltin: strait upstream -> `consul connect proxy`
// public listener -> app. A deny enforced by the built-in proxy reaches the
// client through strait as a closed connection without data.
func TestInteropStraitToBuiltin(t *testing.T) {
	t.Parallel()
	a := startAgent(t)
	const key = 0x11
	app := startApp(t, modeEcho, key)
	src, dst := uniq("web"), uniq("db")

	pub := freePort(t)
	startBuiltin(t, a, "-service", dst, "-listen", hostPort(pub), "-service-addr", app.Addr())
	a.registerProxy(t, dst, pub)
	up := hostPort(freePort(t))
	startStrait(t, a, "-service", src, "-upstream", dst+":"+portOf(up))

	eventually(t, 30*time.Second, func() error { return echoVia("tcp", up, 1024, key) })
	c, err := net.Dial("tcp", up)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for _, size := range []int{7, 48 * 1024, 1 << 20} {
		if err := roundTrip(c, randomBytes(t, size), key, 30*time.Second); err != nil {
			t.Fatalf("%d bytes: %v", size, err)
		}
	}
	c.Close()

	// Control: once the built-in proxy refuses a fresh (non-resumed)
	// connection from src, it has observed the deny ...
	a.setIntention(t, src, dst, api.IntentionActionDeny)
	leaf := a.leaf(t, src)
	roots := a.roots(t)
	eventually(t, 30*time.Second, func() error {
		_, err := tlsRefused(hostPort(pub), meshClientConfig(&leaf, roots, a.spiffeID(dst)))
		return err
	})
	// ... so strait's new connections must be refused too. The built-in
	// proxy authorizes in VerifyPeerCertificate, which Go skips on resumed
	// TLS sessions: a client that resumes sessions bypasses the deny.
	eventually(t, 10*time.Second, func() error {
		if err := refusedVia("tcp", up); err != nil {
			return fmt.Errorf("%w, although the built-in proxy refuses fresh connections from %s (does strait resume TLS sessions?)", err, src)
		}
		return nil
	})
}

// TestInteropBuiltinToStrait: `consul connect proxy` upstream -> strait
// public listener -> app, including a deny enforced by strait.
func TestInteropBuiltinToStrait(t *testing.T) {
	t.Parallel()
	a := startAgent(t)
	const key = 0x22
	app := startApp(t, modeEcho, key)
	src, dst := uniq("web"), uniq("db")

	pub := hostPort(freePort(t))
	srv := startStrait(t, a, "-service", dst, "-listen", pub, "-service-addr", app.Addr())
	a.registerProxy(t, dst, atoi(t, portOf(pub)))
	up := hostPort(freePort(t))
	startBuiltin(t, a, "-service", src, "-upstream", dst+":"+portOf(up))

	eventually(t, 30*time.Second, func() error { return echoVia("tcp", up, 1024, key) })
	c, err := net.Dial("tcp", up)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for _, size := range []int{7, 48 * 1024, 1 << 20} {
		if err := roundTrip(c, randomBytes(t, size), key, 30*time.Second); err != nil {
			t.Fatalf("%d bytes: %v", size, err)
		}
	}
	c.Close()

	a.setIntention(t, src, dst, api.IntentionActionDeny)
	eventually(t, 30*time.Second, func() error { return refusedVia("tcp", up) })
	before := app.Accepts()
	consistently(t, time.Second, func() error {
		if err := refusedVia("tcp", up); err != nil {
			return err
		}
		if n := app.Accepts(); n != before {
			return fmt.Errorf("app dialed %d times for denied connections", n-before)
		}
		return nil
	})
	if deniedLogLine(srv.Output(), src) == "" {
		t.Errorf("strait did not log the denial of %s", src)
	}
}

// TestConnectNativeServerBehindStraitUpstream: a Connect-native server
// (SDK ServerTLSConfig, registered with Connect.Native) reached through a
// strait upstream; the native server sees strait's client identity.
func TestConnectNativeServerBehindStraitUpstream(t *testing.T) {
	t.Parallel()
	a := startAgent(t)
	const key = 0x33
	src, dst := uniq("web"), uniq("native")
	native := startNativeServer(t, a, dst, key)

	up := hostPort(freePort(t))
	startStrait(t, a, "-service", src, "-upstream", dst+":"+portOf(up))

	eventually(t, 30*time.Second, func() error { return echoVia("tcp", up, 1024, key) })
	c, err := net.Dial("tcp", up)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for _, size := range []int{5, 100 * 1024} {
		if err := roundTrip(c, randomBytes(t, size), key, 30*time.Second); err != nil {
			t.Fatalf("%d bytes: %v", size, err)
		}
	}
	want := a.spiffeID(src)
	if uris := native.PeerURIs(); len(uris) == 0 || !slices.Contains(uris, want) {
		t.Fatalf("native server saw client identities %v, want %s", uris, want)
	}
	// The native server authorizes with the agent: a deny is enforced
	// there and strait hands the client a closed connection.
	c.Close()
	a.setIntention(t, src, dst, api.IntentionActionDeny)
	// Control: the native server refuses a fresh connection from src ...
	leaf := a.leaf(t, src)
	roots := a.roots(t)
	eventually(t, 30*time.Second, func() error {
		_, err := tlsRefused(hostPort(native.Port()), meshClientConfig(&leaf, roots, a.spiffeID(dst)))
		return err
	})
	// ... so connections through strait must be refused too.
	eventually(t, 10*time.Second, func() error {
		if err := refusedVia("tcp", up); err != nil {
			return fmt.Errorf("%w (the native server has accepted %d TLS connections, %d of them resumed sessions, on which the SDK skips authorization)",
				err, native.Accepts(), native.resumed.Load())
		}
		return nil
	})
}

// TestConnectNativeClientToStrait: a Connect-native client (SDK Dial with
// ConsulResolver) dials a strait public listener; strait (configured via
// CONSUL_HTTP_ADDR here) negotiates no ALPN protocol and enforces a deny.
func TestConnectNativeClientToStrait(t *testing.T) {
	t.Parallel()
	a := startAgent(t)
	const key = 0x44
	app := startApp(t, modeEcho, key)
	src, dst := uniq("nativeclient"), uniq("db")

	pub := hostPort(freePort(t))
	srv := startStraitEnv(t, []string{"CONSUL_HTTP_ADDR=" + a.httpAddr},
		"-service", dst, "-listen", pub, "-service-addr", app.Addr())
	a.registerProxy(t, dst, atoi(t, portOf(pub)))

	svc := nativeService(t, a, src)
	resolver := &connect.ConsulResolver{Client: a.client, Name: dst}
	var conn net.Conn
	eventually(t, 30*time.Second, func() error {
		c, err := svc.Dial(ctxTimeout(t, 10*time.Second), resolver)
		if err != nil {
			return err
		}
		if err := roundTrip(c, randomBytes(t, 512), key, 10*time.Second); err != nil {
			c.Close()
			return err
		}
		conn = c
		return nil
	})
	defer conn.Close()
	for _, size := range []int{9, 200 * 1024} {
		if err := roundTrip(conn, randomBytes(t, size), key, 30*time.Second); err != nil {
			t.Fatalf("%d bytes: %v", size, err)
		}
	}
	tc, ok := conn.(*tls.Conn)
	if !ok {
		t.Fatalf("SDK Dial returned %T, want *tls.Conn", conn)
	}
	if p := tc.ConnectionState().NegotiatedProtocol; p != "" {
		t.Errorf("strait negotiated ALPN protocol %q with a client offering h2; an L4 proxy must not select one", p)
	}
	conn.Close()

	a.setIntention(t, src, dst, api.IntentionActionDeny)
	dialRefused := func() error {
		c, err := svc.Dial(ctxTimeout(t, 10*time.Second), resolver)
		if err != nil {
			return nil // refused during the handshake
		}
		defer c.Close()
		return refused(c, 10*time.Second)
	}
	eventually(t, 30*time.Second, dialRefused)
	before := app.Accepts()
	consistently(t, time.Second, func() error {
		if err := dialRefused(); err != nil {
			return err
		}
		if n := app.Accepts(); n != before {
			return fmt.Errorf("app dialed %d times for denied connections", n-before)
		}
		return nil
	})
	if deniedLogLine(srv.Output(), src) == "" {
		t.Errorf("strait did not log the denial of %s", src)
	}
}

// nativeService starts an SDK connect.Service for name and waits until it
// has its leaf and roots. Its log is dumped if the test fails.
func nativeService(t testing.TB, a *agent, name string) *connect.Service {
	t.Helper()
	buf := &logBuf{}
	logger := hclog.New(&hclog.LoggerOptions{Name: "native-" + name, Output: buf, Level: hclog.Debug})
	svc, err := connect.NewServiceWithLogger(name, a.client, logger)
	if err != nil {
		t.Fatalf("connect.NewService(%s): %v", name, err)
	}
	t.Cleanup(func() {
		svc.Close()
		if t.Failed() {
			t.Logf("---- SDK service %s log ----\n%s---- end ----", name, tail(buf.String(), 20000))
		}
	})
	select {
	case <-svc.ReadyWait():
	case <-time.After(30 * time.Second):
		t.Fatalf("SDK service %s not ready after 30s", name)
	}
	return svc
}

// startNativeServer serves the echo app over the SDK's server TLS config and
// registers it as a Connect-native service.
func startNativeServer(t testing.TB, a *agent, name string, key byte) *app {
	t.Helper()
	svc := nativeService(t, a, name)
	ln, err := tls.Listen("tcp", "127.0.0.1:0", svc.ServerTLSConfig())
	if err != nil {
		t.Fatal(err)
	}
	srv := serveApp(t, ln, modeEcho, key)
	a.registerNative(t, name, srv.Port())
	return srv
}

func portOf(addr string) string {
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		panic(err)
	}
	return p
}

func atoi(t testing.TB, s string) int {
	t.Helper()
	var n int
	if _, err := fmt.Sscan(s, &n); err != nil {
		t.Fatal(err)
	}
	return n
}
