package integration

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// TestStraitRejectsBeforeDialingApp: connections to a strait public
// listener that must be refused are refused without the app ever being
// dialed: no client certificate, a certificate from a foreign CA, a
// certificate from the mesh CA but another trust domain, and a source
// denied by an intention written before strait started. A valid
// certificate of an allowed source is the positive control.
func TestStraitRejectsBeforeDialingApp(t *testing.T) {
	t.Parallel()
	a := startAgent(t)
	const key = 0x55
	app := startApp(t, modeEcho, key)
	dst, good, evil := uniq("db"), uniq("web"), uniq("evil")
	a.setIntention(t, evil, dst, api.IntentionActionDeny)

	pub := hostPort(freePort(t))
	srv := startStrait(t, a, "-service", dst, "-listen", pub, "-service-addr", app.Addr())
	roots := a.roots(t)
	dstURI := a.spiffeID(dst)

	foreignCA := newTestCA(t, a.trustDomain) // same trust domain, unknown key
	foreignCert := foreignCA.leaf(t, a.spiffeID(good))
	otherTD := "11111111-2222-3333-4444-555555555555.consul"
	otherTDCert := a.ca.leaf(t, fmt.Sprintf("spiffe://%s/ns/default/dc/%s/svc/%s", otherTD, a.dc, good))
	evilCert := a.leaf(t, evil)

	cases := []struct {
		name string
		cert *tls.Certificate
	}{
		{"no client certificate", nil},
		{"certificate from a foreign CA", &foreignCert},
		{"mesh CA certificate from another trust domain", &otherTDCert},
		{"source denied by intention", &evilCert},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			how, err := tlsRefused(pub, meshClientConfig(tc.cert, roots, dstURI))
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("refused: %s", how)
			if n := app.Accepts(); n != 0 {
				t.Fatalf("app was dialed %d times", n)
			}
		})
	}
	consistently(t, time.Second, func() error {
		if n := app.Accepts(); n != 0 {
			return fmt.Errorf("app was dialed %d times for refused connections", n)
		}
		return nil
	})
	if deniedLogLine(srv.Output(), evil) == "" {
		t.Errorf("strait did not log the intention denial of %s", evil)
	}

	// Positive control: the same client code with a valid, allowed leaf
	// gets through, so the refusals above are strait's doing.
	goodCert := a.leaf(t, good)
	c, err := dialMesh(pub, meshClientConfig(&goodCert, roots, dstURI))
	if err != nil {
		t.Fatalf("control: valid allowed leaf: %v", err)
	}
	defer c.Close()
	if err := roundTrip(c, randomBytes(t, 4096), key, 10*time.Second); err != nil {
		t.Fatalf("control: valid allowed leaf: %v", err)
	}
	if n := app.Accepts(); n != 1 {
		t.Fatalf("control: app accepted %d connections, want 1", n)
	}
}

// TestStraitRejectsResumedSessionAfterDeny: a client that resumes a TLS
// session established while it was allowed must be refused once an
// intention denies it (Go skips VerifyPeerCertificate on resumption, the
// built-in proxy's authz hole).
func TestStraitRejectsResumedSessionAfterDeny(t *testing.T) {
	t.Parallel()
	a := startAgent(t)
	const key = 0x66
	app := startApp(t, modeEcho, key)
	dst, src := uniq("db"), uniq("web")
	pub := hostPort(freePort(t))
	startStrait(t, a, "-service", dst, "-listen", pub, "-service-addr", app.Addr())

	roots := a.roots(t)
	leaf := a.leaf(t, src)
	dstURI := a.spiffeID(dst)
	sni := fmt.Sprintf("%s.default.%s.internal.%s", dst, a.dc, a.trustDomain)
	cache := tls.NewLRUClientSessionCache(8)
	resumingCfg := func() *tls.Config {
		cfg := meshClientConfig(&leaf, roots, dstURI)
		cfg.ServerName = sni // also the session cache key
		cfg.ClientSessionCache = cache
		return cfg
	}

	// Allowed: the first connection establishes a session (TLS 1.3
	// tickets arrive with the first server data); the second may resume.
	for i := 1; i <= 2; i++ {
		c, err := dialMesh(pub, resumingCfg())
		if err != nil {
			t.Fatalf("allowed connection %d: %v", i, err)
		}
		if err := roundTrip(c, randomBytes(t, 2048), key, 10*time.Second); err != nil {
			c.Close()
			t.Fatalf("allowed connection %d: %v", i, err)
		}
		st := c.ConnectionState()
		t.Logf("allowed connection %d: TLS %s, DidResume=%v", i, tls.VersionName(st.Version), st.DidResume)
		c.Close()
	}

	a.setIntention(t, src, dst, api.IntentionActionDeny)
	// strait has observed the deny once a fresh, non-resuming connection
	// is refused. (Probes made before that are allowed and reach the app,
	// so the app's count is taken only afterwards.)
	eventually(t, 30*time.Second, func() error {
		_, err := tlsRefused(pub, meshClientConfig(&leaf, roots, dstURI))
		return err
	})
	allowedAccepts := app.Accepts()

	// Now resume the session from the allowed period.
	raw, err := net.DialTimeout("tcp", pub, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	c := tls.Client(raw, resumingCfg())
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	hsErr := c.Handshake()
	st := c.ConnectionState()
	t.Logf("resumption attempt after deny: handshake err=%v, DidResume=%v", hsErr, st.DidResume)
	if hsErr == nil {
		if err := refused(c, 10*time.Second); err != nil {
			t.Fatalf("resumed session (DidResume=%v) after the deny: %v", st.DidResume, err)
		}
	}
	if !st.DidResume {
		t.Logf("note: strait did not resume the session (tickets off or resumption declined), so the refusal came from a full handshake")
	}
	consistently(t, time.Second, func() error {
		if n := app.Accepts(); n != allowedAccepts {
			return fmt.Errorf("app dialed %d times after the deny", n-allowedAccepts)
		}
		return nil
	})
}

// TestStraitIdleConnectionsNeverReachApp: TCP connections that never start
// a TLS handshake do not reach the app. With the default handshake timeout
// they are held and closed by the client; with handshake_timeout_ms=1000 in
// the agent registration strait itself closes them after about a second.
func TestStraitIdleConnectionsNeverReachApp(t *testing.T) {
	t.Parallel()
	a := startAgent(t)
	const key = 0x77
	const conns = 100

	t.Run("held then closed by the client", func(t *testing.T) {
		app := startApp(t, modeEcho, key)
		dst := uniq("db")
		pub := hostPort(freePort(t))
		startStrait(t, a, "-service", dst, "-listen", pub, "-service-addr", app.Addr())

		var cs []net.Conn
		defer func() {
			for _, c := range cs {
				c.Close()
			}
		}()
		for i := 0; i < conns; i++ {
			c, err := net.DialTimeout("tcp", pub, 5*time.Second)
			if err != nil {
				t.Fatalf("idle connection %d: %v", i, err)
			}
			cs = append(cs, c)
		}
		consistently(t, 1500*time.Millisecond, func() error {
			if n := app.Accepts(); n != 0 {
				return fmt.Errorf("app was dialed %d times for connections that never sent a byte", n)
			}
			return nil
		})
		for _, c := range cs {
			c.Close()
		}
		cs = nil
		// strait still serves a real client afterwards.
		cert := a.leaf(t, uniq("web"))
		c, err := dialMesh(pub, meshClientConfig(&cert, a.roots(t), a.spiffeID(dst)))
		if err != nil {
			t.Fatalf("valid client after the idle connections: %v", err)
		}
		defer c.Close()
		if err := roundTrip(c, randomBytes(t, 1024), key, 10*time.Second); err != nil {
			t.Fatalf("valid client after the idle connections: %v", err)
		}
		if n := app.Accepts(); n != 1 {
			t.Fatalf("app accepted %d connections, want 1", n)
		}
	})

	t.Run("closed by strait after handshake_timeout_ms", func(t *testing.T) {
		const timeout = time.Second
		app := startApp(t, modeEcho, key)
		dst := uniq("db")
		port := freePort(t)
		id := uniq("db-proxy")
		err := a.client.Agent().ServiceRegister(&api.AgentServiceRegistration{
			Kind:    api.ServiceKindConnectProxy,
			ID:      id,
			Name:    dst + "-proxy",
			Address: "127.0.0.1",
			Port:    port,
			Proxy: &api.AgentServiceConnectProxyConfig{
				DestinationServiceName: dst,
				LocalServiceAddress:    "127.0.0.1",
				LocalServicePort:       app.Port(),
				Config:                 map[string]interface{}{"handshake_timeout_ms": timeout.Milliseconds()},
			},
		})
		if err != nil {
			t.Fatal(err)
		}
		startStrait(t, a, "-proxy-id", id, "-log-level", "debug")
		pub := hostPort(port)

		type result struct {
			after time.Duration
			err   error
		}
		results := make([]result, conns)
		var wg sync.WaitGroup
		for i := 0; i < conns; i++ {
			c, err := net.DialTimeout("tcp", pub, 5*time.Second)
			if err != nil {
				t.Fatalf("idle connection %d: %v", i, err)
			}
			start := time.Now()
			wg.Add(1)
			go func(i int, c net.Conn) {
				defer wg.Done()
				defer c.Close()
				_ = c.SetReadDeadline(start.Add(timeout + 8*time.Second))
				n, err := c.Read(make([]byte, 1))
				after := time.Since(start)
				var ne net.Error
				switch {
				case n > 0:
					results[i] = result{after, fmt.Errorf("received data")}
				case errors.As(err, &ne) && ne.Timeout():
					results[i] = result{after, fmt.Errorf("still open after %s", after.Round(time.Millisecond))}
				default:
					results[i] = result{after, nil} // EOF or reset: closed by strait
				}
			}(i, c)
		}
		wg.Wait()
		var afters []time.Duration
		var failures []string
		for i, r := range results {
			if r.err != nil {
				failures = append(failures, fmt.Sprintf("conn %d: %v", i, r.err))
				continue
			}
			afters = append(afters, r.after)
		}
		if len(failures) > 0 {
			t.Fatalf("%d/%d idle connections not closed by strait within %s: %s", len(failures), conns, timeout+8*time.Second, strings.Join(failures[:min(5, len(failures))], "; "))
		}
		sort.Slice(afters, func(i, j int) bool { return afters[i] < afters[j] })
		t.Logf("idle connections closed by strait after min %s, median %s, max %s (handshake timeout %s)",
			afters[0].Round(time.Millisecond), afters[len(afters)/2].Round(time.Millisecond), afters[len(afters)-1].Round(time.Millisecond), timeout)
		if afters[0] < timeout*9/10 {
			t.Errorf("an idle connection was closed after %s, before the %s handshake timeout", afters[0], timeout)
		}
		if max := afters[len(afters)-1]; max > timeout+3*time.Second {
			t.Errorf("an idle connection was closed only after %s; handshake timeout is %s", max, timeout)
		}
		if n := app.Accepts(); n != 0 {
			t.Fatalf("app was dialed %d times for connections that never sent a byte", n)
		}
		// strait still serves a real client.
		cert := a.leaf(t, uniq("web"))
		c, err := dialMesh(pub, meshClientConfig(&cert, a.roots(t), a.spiffeID(dst)))
		if err != nil {
			t.Fatalf("valid client after the idle connections: %v", err)
		}
		defer c.Close()
		if err := roundTrip(c, randomBytes(t, 1024), key, 10*time.Second); err != nil {
			t.Fatalf("valid client after the idle connections: %v", err)
		}
	})
}
