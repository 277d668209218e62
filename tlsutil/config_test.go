package tlsutil

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/straitproxy/strait/internal/testutil"
)

// ---- loopback TLS harness ----

type serverResult struct {
	err   error
	state tls.ConnectionState
}

type tlsServer struct {
	addr    string
	results chan serverResult
}

// startTLSServer accepts on 127.0.0.1, handshakes every connection with
// cfg, reports each handshake on results and echoes on the good ones.
func startTLSServer(t *testing.T, cfg *tls.Config) *tlsServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &tlsServer{addr: ln.Addr().String(), results: make(chan serverResult, 64)}
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		conns = map[net.Conn]struct{}{}
		done  bool
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			if done {
				mu.Unlock()
				c.Close()
				return
			}
			conns[c] = struct{}{}
			wg.Add(1)
			mu.Unlock()
			go func() {
				defer wg.Done()
				defer c.Close()
				tc := tls.Server(c, cfg)
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				err := tc.HandshakeContext(ctx)
				cancel()
				res := serverResult{err: err}
				if err == nil {
					res.state = tc.ConnectionState()
				}
				srv.results <- res
				if err != nil {
					return
				}
				_, _ = io.Copy(tc, tc)
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		done = true
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return srv
}

// next returns the next handshake result.
func (s *tlsServer) next(t *testing.T) serverResult {
	t.Helper()
	select {
	case r := <-s.results:
		return r
	case <-time.After(10 * time.Second):
		t.Fatal("timed out waiting for the server handshake")
	}
	return serverResult{}
}

// noMore asserts that no further handshake was reported.
func (s *tlsServer) noMore(t *testing.T) {
	t.Helper()
	select {
	case r := <-s.results:
		t.Fatalf("unexpected extra server handshake: %+v", r.err)
	default:
	}
}

func dialTLS(t *testing.T, addr string, cfg *tls.Config) (*tls.Conn, error) {
	t.Helper()
	d := tls.Dialer{NetDialer: &net.Dialer{Timeout: 5 * time.Second}, Config: cfg}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	tc := c.(*tls.Conn)
	t.Cleanup(func() { tc.Close() })
	return tc, nil
}

// roundTrip writes a message and reads the echo.
func roundTrip(c *tls.Conn, msg string) error {
	if err := c.SetDeadline(time.Now().Add(10 * time.Second)); err != nil {
		return err
	}
	if _, err := io.WriteString(c, msg); err != nil {
		return err
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil {
		return err
	}
	if string(buf) != msg {
		return fmt.Errorf("echo %q, want %q", buf, msg)
	}
	return nil
}

// mustConnect dials, checks the echo and returns the connection.
func mustConnect(t *testing.T, addr string, cfg *tls.Config) *tls.Conn {
	t.Helper()
	c, err := dialTLS(t, addr, cfg)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	if err := roundTrip(c, "ping"); err != nil {
		t.Fatalf("round trip: %v", err)
	}
	return c
}

// mustBeRefused dials and expects the connection to fail, either in the
// client's handshake or (TLS 1.3, server-side refusal) on the first read.
// It returns the client-side error.
func mustBeRefused(t *testing.T, addr string, cfg *tls.Config) error {
	t.Helper()
	c, err := dialTLS(t, addr, cfg)
	if err != nil {
		return err
	}
	if err := roundTrip(c, "ping"); err != nil {
		return err
	}
	t.Fatal("connection was accepted and carried data")
	return nil
}

type authCall struct {
	peer   Identity
	serial string
	ctxOK  bool
}

type authRecorder struct {
	mu    sync.Mutex
	calls []authCall
	deny  error
}

func (a *authRecorder) authorize(ctx context.Context, peer Identity, serial string) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.calls = append(a.calls, authCall{peer: peer, serial: serial, ctxOK: ctx != nil && ctx.Err() == nil})
	return a.deny
}

func (a *authRecorder) setDeny(err error) {
	a.mu.Lock()
	a.deny = err
	a.mu.Unlock()
}

func (a *authRecorder) get() []authCall {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]authCall(nil), a.calls...)
}

var tlsVersions = []struct {
	name string
	v    uint16
}{
	{"TLS12", tls.VersionTLS12},
	{"TLS13", tls.VersionTLS13},
}

// mesh is a db server and a web client under one CA.
type mesh struct {
	ca          *testutil.CA
	dbLeaf      *testutil.Leaf
	webLeaf     *testutil.Leaf
	db, web     *Source
	auth        *authRecorder
	srv         *tlsServer
	dbID, webID Identity
	sni         string
	sniSeen     chan string
}

func newMesh(t *testing.T) *mesh {
	t.Helper()
	m := &mesh{ca: testutil.NewCA(t, testTD), auth: &authRecorder{}, sniSeen: make(chan string, 64)}
	roots := testutil.RootList(testTD, m.ca)
	m.dbLeaf = m.ca.Leaf(t, "db", testutil.LeafOptions{})
	m.webLeaf = m.ca.Leaf(t, "web", testutil.LeafOptions{})
	m.db = newTestSource(t, "db", m.dbLeaf, roots)
	m.web = newTestSource(t, "web", m.webLeaf, roots)
	m.dbID = ServiceID(testTD, "", "", "dc1", "db")
	m.webID = ServiceID(testTD, "", "", "dc1", "web")
	m.sni = ServiceSNI("db", "default", "", "dc1", testTD)
	cfg := m.db.ServerConfig(m.auth.authorize)
	inner := cfg.GetConfigForClient
	cfg.GetConfigForClient = func(h *tls.ClientHelloInfo) (*tls.Config, error) {
		m.sniSeen <- h.ServerName
		return inner(h)
	}
	m.srv = startTLSServer(t, cfg)
	return m
}

func (m *mesh) nextSNI(t *testing.T) string {
	t.Helper()
	select {
	case s := <-m.sniSeen:
		return s
	case <-time.After(10 * time.Second):
		t.Fatal("timed out waiting for a ClientHello")
	}
	return ""
}

// client returns web's config for dialing db, limited to version v.
func (m *mesh) client(v uint16) *tls.Config {
	c := m.web.ClientConfig(m.dbID, m.sni, ClientOptions{}).Clone()
	c.MaxVersion = v
	return c
}

// foreignClient is a client that presents cert and verifies nothing.
func foreignClient(v uint16, cert *tls.Certificate) *tls.Config {
	c := &tls.Config{InsecureSkipVerify: true, MaxVersion: v}
	if cert != nil {
		c.Certificates = []tls.Certificate{*cert}
	}
	return c
}

// ---- ServerConfig ----

func TestServerMutualTLS(t *testing.T) {
	t.Parallel()
	for _, tv := range tlsVersions {
		t.Run(tv.name, func(t *testing.T) {
			t.Parallel()
			m := newMesh(t)
			c := mustConnect(t, m.srv.addr, m.client(tv.v))
			res := m.srv.next(t)
			if res.err != nil {
				t.Fatalf("server handshake: %v", res.err)
			}
			cs := c.ConnectionState()
			if cs.Version != tv.v {
				t.Errorf("negotiated version %x, want %x", cs.Version, tv.v)
			}
			if cs.NegotiatedProtocol != ALPNStrait {
				t.Errorf("ALPN %q negotiated between two strait ends, want %q (TestALPNStrait covers other clients)", cs.NegotiatedProtocol, ALPNStrait)
			}
			if got := FormatSerial(cs.PeerCertificates[0].SerialNumber.Bytes()); got != m.dbLeaf.Serial {
				t.Errorf("client saw server serial %s, want %s", got, m.dbLeaf.Serial)
			}
			if got := FormatSerial(res.state.PeerCertificates[0].SerialNumber.Bytes()); got != m.webLeaf.Serial {
				t.Errorf("server saw client serial %s, want %s", got, m.webLeaf.Serial)
			}
			calls := m.auth.get()
			if len(calls) != 1 {
				t.Fatalf("authorizer called %d times, want 1", len(calls))
			}
			if calls[0].peer != m.webID {
				t.Errorf("authorizer peer %+v, want %+v", calls[0].peer, m.webID)
			}
			if calls[0].serial != m.webLeaf.Serial {
				t.Errorf("authorizer serial %q, want %q", calls[0].serial, m.webLeaf.Serial)
			}
			if !calls[0].ctxOK {
				t.Error("authorizer got a nil or finished context")
			}
		})
	}
}

func TestServerNilAuthorizerAllows(t *testing.T) {
	t.Parallel()
	m := newMesh(t)
	srv := startTLSServer(t, m.db.ServerConfig(nil))
	mustConnect(t, srv.addr, m.client(tls.VersionTLS13))
	if r := srv.next(t); r.err != nil {
		t.Fatalf("server handshake with nil authorizer: %v", r.err)
	}
}

func TestServerRefusesBadClients(t *testing.T) {
	t.Parallel()
	other := testutil.NewCA(t, testTD)
	for _, tv := range tlsVersions {
		t.Run(tv.name, func(t *testing.T) {
			t.Parallel()
			m := newMesh(t)
			tests := []struct {
				name    string
				cert    *tls.Certificate
				wantErr error // nil: any error
			}{
				{"no certificate", nil, nil},
				{"another CA", &other.Leaf(t, "web", testutil.LeafOptions{}).Cert, ErrUntrustedChain},
				{"another trust domain", &m.ca.Leaf(t, "web", testutil.LeafOptions{TrustDomain: "99999999-0000-0000-0000-000000000000.consul"}).Cert, ErrWrongTrustDom},
				{"server-only EKU", &m.ca.Leaf(t, "web", testutil.LeafOptions{EKU: testutil.EKUServer}).Cert, ErrUntrustedChain},
				{"not a service identity", &m.ca.Leaf(t, "web", testutil.LeafOptions{URI: "spiffe://" + testTD + "/agent/client/dc/dc1/id/n1"}).Cert, ErrNotServiceIdent},
				{"no URI SAN", &m.ca.Leaf(t, "web", testutil.LeafOptions{NoURI: true}).Cert, ErrNotServiceIdent},
				{"expired", &m.ca.Leaf(t, "web", expiredOpts()).Cert, ErrUntrustedChain},
			}
			// Sequential: they share the server's result channel.
			for _, tc := range tests {
				mustBeRefused(t, m.srv.addr, foreignClient(tv.v, tc.cert))
				res := m.srv.next(t)
				if res.err == nil {
					t.Fatalf("%s: server handshake succeeded", tc.name)
				}
				if tc.wantErr != nil && !errors.Is(res.err, tc.wantErr) {
					t.Errorf("%s: server error %v, want errors.Is %v", tc.name, res.err, tc.wantErr)
				}
			}
			if n := len(m.auth.get()); n != 0 {
				t.Fatalf("authorizer called %d times for refused clients", n)
			}
			m.srv.noMore(t)
		})
	}
}

func TestServerClientOnlyEKUAccepted(t *testing.T) {
	t.Parallel()
	m := newMesh(t)
	l := m.ca.Leaf(t, "web", testutil.LeafOptions{EKU: testutil.EKUClient})
	mustConnect(t, m.srv.addr, foreignClient(tls.VersionTLS13, &l.Cert))
	if r := m.srv.next(t); r.err != nil {
		t.Fatalf("client-auth-only leaf refused: %v", r.err)
	}
	if calls := m.auth.get(); len(calls) != 1 || calls[0].serial != l.Serial {
		t.Fatalf("authorizer calls %+v, want one with serial %s", calls, l.Serial)
	}
}

func TestServerAuthorizerDenies(t *testing.T) {
	t.Parallel()
	errDenied := errors.New("intention denies web -> db")
	for _, tv := range tlsVersions {
		t.Run(tv.name, func(t *testing.T) {
			t.Parallel()
			m := newMesh(t)
			m.auth.setDeny(errDenied)
			c, dialErr := dialTLS(t, m.srv.addr, m.client(tv.v))
			res := m.srv.next(t)
			if !errors.Is(res.err, errDenied) {
				t.Fatalf("server handshake error %v, want the authorizer's", res.err)
			}
			switch tv.v {
			case tls.VersionTLS13:
				// The client's handshake is over before the server has
				// checked its certificate; it learns on the first read.
				if dialErr != nil {
					t.Fatalf("TLS 1.3 client handshake failed early: %v", dialErr)
				}
				if err := c.SetReadDeadline(time.Now().Add(10 * time.Second)); err != nil {
					t.Fatal(err)
				}
				if _, err := c.Read(make([]byte, 1)); err == nil {
					t.Fatal("read on a refused TLS 1.3 connection succeeded")
				} else if isTimeout(err) {
					t.Fatalf("read timed out instead of seeing the refusal: %v", err)
				}
			default:
				if dialErr == nil {
					t.Fatal("TLS 1.2 client handshake succeeded on a refused connection")
				}
			}
			if n := len(m.auth.get()); n != 1 {
				t.Fatalf("authorizer called %d times, want 1", n)
			}
		})
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func TestServerResumptionReauthorizes(t *testing.T) {
	t.Parallel()
	errDenied := errors.New("intention now denies")
	for _, tv := range tlsVersions {
		t.Run(tv.name, func(t *testing.T) {
			t.Parallel()
			m := newMesh(t)
			// A resuming client, as Envoy is by default (strait's own
			// upstreams do not resume; see TestClientConfigDoesNotResume).
			cfg := m.client(tv.v).Clone()
			cfg.ClientSessionCache = tls.NewLRUClientSessionCache(8)

			first := mustConnect(t, m.srv.addr, cfg)
			if r := m.srv.next(t); r.err != nil {
				t.Fatalf("first handshake: %v", r.err)
			}
			if first.ConnectionState().DidResume {
				t.Fatal("first connection claims to be resumed")
			}
			first.Close()

			second := mustConnect(t, m.srv.addr, cfg)
			r := m.srv.next(t)
			if r.err != nil {
				t.Fatalf("second handshake: %v", r.err)
			}
			if !second.ConnectionState().DidResume || !r.state.DidResume {
				t.Fatalf("second connection not resumed (client %v, server %v)", second.ConnectionState().DidResume, r.state.DidResume)
			}
			calls := m.auth.get()
			if len(calls) != 2 {
				t.Fatalf("authorizer called %d times after a resumed handshake, want 2", len(calls))
			}
			if calls[1].peer != m.webID || calls[1].serial != m.webLeaf.Serial {
				t.Fatalf("authorizer on resumption saw %+v, want %+v / %s", calls[1], m.webID, m.webLeaf.Serial)
			}
			second.Close()

			m.auth.setDeny(errDenied)
			mustBeRefused(t, m.srv.addr, cfg)
			r = m.srv.next(t)
			if !errors.Is(r.err, errDenied) {
				t.Fatalf("resumed handshake after deny: server error %v, want the authorizer's", r.err)
			}
			if n := len(m.auth.get()); n != 3 {
				t.Fatalf("authorizer called %d times, want 3", n)
			}
		})
	}
}

func TestServerNotReady(t *testing.T) {
	t.Parallel()
	m := newMesh(t)
	s := NewSource(nil, "db", SourceOptions{})
	srv := startTLSServer(t, s.ServerConfig(m.auth.authorize))
	mustBeRefused(t, srv.addr, m.client(tls.VersionTLS13))
	if r := srv.next(t); !errors.Is(r.err, ErrNotReady) {
		t.Fatalf("server error %v, want ErrNotReady", r.err)
	}
	if s.Bundle() != nil || s.TrustDomain() != "" {
		t.Fatal("unready source has a bundle or trust domain")
	}
}

func TestServerExpiredLeaf(t *testing.T) {
	t.Parallel()
	for _, tv := range tlsVersions {
		t.Run(tv.name, func(t *testing.T) {
			t.Parallel()
			m := newMesh(t)
			expired := m.ca.Leaf(t, "db", expiredOpts())
			s := NewSource(nil, "db", SourceOptions{})
			storeBundle(s, unverifiedBundle(t, expired, m.ca))
			srv := startTLSServer(t, s.ServerConfig(m.auth.authorize))
			if _, err := dialTLS(t, srv.addr, m.client(tv.v)); err == nil {
				t.Fatal("client handshake succeeded against an expired server leaf")
			}
			r := srv.next(t)
			if !errors.Is(r.err, ErrLeafExpired) {
				t.Fatalf("server error %v, want ErrLeafExpired", r.err)
			}
			if n := len(m.auth.get()); n != 0 {
				t.Fatalf("authorizer called %d times", n)
			}
		})
	}
}

// unverifiedBundle builds what NewBundle would for l, skipping its checks.
func unverifiedBundle(t *testing.T, l *testutil.Leaf, ca *testutil.CA) *Bundle {
	t.Helper()
	id, err := ParseID(l.URI)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	cert := l.Cert
	cert.Leaf = l.X509
	return &Bundle{
		Leaf: &cert, Identity: id, Roots: pool, RootIDs: []string{ca.ID}, TrustDomain: ca.TrustDomain,
		LeafSerial: l.Serial, NotAfter: l.X509.NotAfter, NotBefore: l.X509.NotBefore,
	}
}

// ---- ClientConfig ----

func TestClientVerifiesServer(t *testing.T) {
	t.Parallel()
	for _, tv := range tlsVersions {
		t.Run(tv.name, func(t *testing.T) {
			t.Parallel()
			m := newMesh(t)

			// Correct identity: works, and the SNI is the one asked for.
			c := mustConnect(t, m.srv.addr, m.client(tv.v))
			if r := m.srv.next(t); r.err != nil {
				t.Fatalf("server handshake: %v", r.err)
			}
			if got := m.nextSNI(t); got != m.sni {
				t.Fatalf("server saw SNI %q, want %q", got, m.sni)
			}
			if got := c.ConnectionState().ServerName; got != m.sni {
				t.Fatalf("client ServerName %q, want %q", got, m.sni)
			}

			// Expecting another service: the client refuses db's cert.
			apiSNI := ServiceSNI("api", "", "", "dc1", testTD)
			wrong := m.web.ClientConfig(ServiceID(testTD, "", "", "dc1", "api"), apiSNI, ClientOptions{}).Clone()
			wrong.MaxVersion = tv.v
			_, err := dialTLS(t, m.srv.addr, wrong)
			if !errors.Is(err, ErrWrongIdentity) {
				t.Fatalf("dial expecting api: error %v, want ErrWrongIdentity", err)
			}
			if got := m.nextSNI(t); got != apiSNI {
				t.Fatalf("server saw SNI %q, want %q", got, apiSNI)
			}
			if r := m.srv.next(t); r.err == nil {
				t.Fatal("server handshake succeeded although the client refused")
			}

			// Other namespace / partition / datacenter are other identities.
			for _, exp := range []Identity{
				ServiceID(testTD, "", "other", "dc1", "db"),
				ServiceID(testTD, "p1", "", "dc1", "db"),
				ServiceID(testTD, "", "", "dc2", "db"),
				ServiceID("99999999-0000-0000-0000-000000000000.consul", "", "", "dc1", "db"),
			} {
				cfg := m.web.ClientConfig(exp, "", ClientOptions{}).Clone()
				cfg.MaxVersion = tv.v
				if _, err := dialTLS(t, m.srv.addr, cfg); !errors.Is(err, ErrWrongIdentity) {
					t.Errorf("dial expecting %s: error %v, want ErrWrongIdentity", exp, err)
				}
				m.srv.next(t)
				if got := m.nextSNI(t); got != "" {
					t.Errorf("empty sni argument sent SNI %q", got)
				}
			}

			// Trust domain and datacenter compare case-insensitively.
			caseless := m.web.ClientConfig(ServiceID(strings.ToUpper(testTD), "", "", "DC1", "db"), m.sni, ClientOptions{}).Clone()
			caseless.MaxVersion = tv.v
			mustConnect(t, m.srv.addr, caseless)
			if r := m.srv.next(t); r.err != nil {
				t.Fatalf("server handshake: %v", r.err)
			}
		})
	}
}

func TestClientRefusesBadServers(t *testing.T) {
	t.Parallel()
	other := testutil.NewCA(t, testTD)
	const otherTD = "99999999-0000-0000-0000-000000000000.consul"
	m := newMesh(t)
	tests := []struct {
		name    string
		server  *Source
		wantErr error
	}{
		{"another CA", newTestSource(t, "db", other.Leaf(t, "db", testutil.LeafOptions{}), testutil.RootList(testTD, other)), ErrUntrustedChain},
		{"client-only EKU", newTestSource(t, "db", m.ca.Leaf(t, "db", testutil.LeafOptions{EKU: testutil.EKUClient}), testutil.RootList(testTD, m.ca)), ErrUntrustedChain},
		{"another trust domain", newTestSource(t, "db", m.ca.Leaf(t, "db", testutil.LeafOptions{TrustDomain: otherTD}), testutil.RootList(otherTD, m.ca)), ErrWrongTrustDom},
		{"mesh gateway identity", newTestSource(t, "db", m.ca.Leaf(t, "db", testutil.LeafOptions{URI: "spiffe://" + testTD + "/gateway/mesh/dc/dc1"}), testutil.RootList(testTD, m.ca)), ErrNotServiceIdent},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			srv := startTLSServer(t, tc.server.ServerConfig(nil))
			for _, tv := range tlsVersions {
				cfg := m.web.ClientConfig(m.dbID, m.sni, ClientOptions{}).Clone()
				cfg.MaxVersion = tv.v
				_, err := dialTLS(t, srv.addr, cfg)
				if !errors.Is(err, tc.wantErr) {
					t.Errorf("%s: client error %v, want errors.Is %v", tv.name, err, tc.wantErr)
				}
				srv.next(t)
			}
		})
	}
}

func TestClientConfigCachedPerKey(t *testing.T) {
	t.Parallel()
	m := newMesh(t)
	a := m.web.ClientConfig(m.dbID, m.sni, ClientOptions{})
	if b := m.web.ClientConfig(m.dbID, m.sni, ClientOptions{}); a != b {
		t.Fatal("same (identity, sni) gave different configs")
	}
	if b := m.web.ClientConfig(m.dbID, "other.sni", ClientOptions{}); a == b {
		t.Fatal("different SNI shared a config")
	}
	if a.ServerName != m.sni || a.MinVersion != tls.VersionTLS12 || !slices.Equal(a.NextProtos, []string{ALPNStrait}) || a.ClientSessionCache != nil {
		t.Fatalf("config: ServerName %q MinVersion %x NextProtos %v", a.ServerName, a.MinVersion, a.NextProtos)
	}
	// New material drops the cache (and the session cache with it).
	next := m.ca.Leaf(t, "web", testutil.LeafOptions{})
	setMaterial(m.web, &next.Cert, nil)
	if b := m.web.ClientConfig(m.dbID, m.sni, ClientOptions{}); a == b {
		t.Fatal("config survived a rotation")
	}
}

func TestClientNotReady(t *testing.T) {
	t.Parallel()
	m := newMesh(t)
	s := NewSource(nil, "web", SourceOptions{})
	if _, err := dialTLS(t, m.srv.addr, s.ClientConfig(m.dbID, m.sni, ClientOptions{})); !errors.Is(err, ErrNotReady) {
		t.Fatalf("dial from an unready source: %v, want ErrNotReady", err)
	}
	m.srv.next(t)
}

func TestClientExpiredLeaf(t *testing.T) {
	t.Parallel()
	for _, tv := range tlsVersions {
		t.Run(tv.name, func(t *testing.T) {
			t.Parallel()
			m := newMesh(t)
			s := NewSource(nil, "web", SourceOptions{})
			storeBundle(s, unverifiedBundle(t, m.ca.Leaf(t, "web", expiredOpts()), m.ca))
			cfg := s.ClientConfig(m.dbID, m.sni, ClientOptions{}).Clone()
			cfg.MaxVersion = tv.v
			_, err := dialTLS(t, m.srv.addr, cfg)
			if !errors.Is(err, ErrLeafExpired) {
				t.Fatalf("dial with an expired leaf: %v, want ErrLeafExpired", err)
			}
			if r := m.srv.next(t); r.err == nil {
				t.Fatal("server accepted a client that presented no certificate")
			}
			if n := len(m.auth.get()); n != 0 {
				t.Fatalf("authorizer called %d times", n)
			}
		})
	}
}

// ---- rotation ----

func TestRotationServerLeaf(t *testing.T) {
	t.Parallel()
	for _, tv := range tlsVersions {
		t.Run(tv.name, func(t *testing.T) {
			t.Parallel()
			m := newMesh(t)
			cfg := m.client(tv.v)
			cfg.ClientSessionCache = nil // see the server's current certificate every time

			old := mustConnect(t, m.srv.addr, cfg)
			m.srv.next(t)
			if got := FormatSerial(old.ConnectionState().PeerCertificates[0].SerialNumber.Bytes()); got != m.dbLeaf.Serial {
				t.Fatalf("first connection: serial %s, want %s", got, m.dbLeaf.Serial)
			}

			renewed := m.ca.Leaf(t, "db", testutil.LeafOptions{})
			setMaterial(m.db, &renewed.Cert, nil)
			if got := m.db.Bundle().LeafSerial; got != renewed.Serial {
				t.Fatalf("bundle serial after rotation %s, want %s", got, renewed.Serial)
			}

			fresh := mustConnect(t, m.srv.addr, cfg)
			m.srv.next(t)
			if got := FormatSerial(fresh.ConnectionState().PeerCertificates[0].SerialNumber.Bytes()); got != renewed.Serial {
				t.Fatalf("after rotation: serial %s, want %s", got, renewed.Serial)
			}
			if err := roundTrip(old, "still there"); err != nil {
				t.Fatalf("established connection broken by rotation: %v", err)
			}
			if err := roundTrip(fresh, "pong"); err != nil {
				t.Fatalf("new connection: %v", err)
			}
		})
	}
}

func TestRotationInconsistentMaterialKeepsBundle(t *testing.T) {
	t.Parallel()
	m := newMesh(t)
	before := m.db.Bundle()
	newCA := testutil.NewCA(t, testTD)

	// A leaf from a root we do not know yet is held back.
	next := newCA.Leaf(t, "db", testutil.LeafOptions{})
	setMaterial(m.db, &next.Cert, nil)
	if m.db.Bundle() != before {
		t.Fatal("bundle replaced by a leaf that does not chain to the roots")
	}
	mustConnect(t, m.srv.addr, m.client(tls.VersionTLS13))
	if r := m.srv.next(t); r.err != nil {
		t.Fatalf("server handshake during the inconsistent window: %v", r.err)
	}

	// Once the roots arrive, both apply.
	setMaterial(m.db, nil, testutil.RootList(testTD, newCA, m.ca))
	b := m.db.Bundle()
	if b == before || b.LeafSerial != next.Serial || len(b.RootIDs) != 2 {
		t.Fatalf("bundle after roots: serial %s roots %v; want %s and two roots", b.LeafSerial, b.RootIDs, next.Serial)
	}
	// web trusts only the old root, so it must refuse db's new leaf
	// until it has the new root too.
	cfg := m.client(tls.VersionTLS13)
	cfg.ClientSessionCache = nil
	if _, err := dialTLS(t, m.srv.addr, cfg); !errors.Is(err, ErrUntrustedChain) {
		t.Fatalf("web without the new root: %v, want ErrUntrustedChain", err)
	}
	m.srv.next(t)
	setMaterial(m.web, nil, testutil.RootList(testTD, newCA, m.ca))
	cfg = m.client(tls.VersionTLS13)
	mustConnect(t, m.srv.addr, cfg)
	if r := m.srv.next(t); r.err != nil {
		t.Fatalf("after both sides have both roots: %v", r.err)
	}
}

func TestRotationRootRemovedRefusesOldClients(t *testing.T) {
	t.Parallel()
	m := newMesh(t)
	newCA := testutil.NewCA(t, testTD)
	dbNew := newCA.Leaf(t, "db", testutil.LeafOptions{})
	setMaterial(m.db, &dbNew.Cert, testutil.RootList(testTD, newCA))
	if m.db.Bundle().LeafSerial != dbNew.Serial {
		t.Fatal("rotation to the new CA not applied")
	}
	// web's old-root leaf is no longer trusted by db.
	mustBeRefused(t, m.srv.addr, foreignClient(tls.VersionTLS13, &m.webLeaf.Cert))
	if r := m.srv.next(t); !errors.Is(r.err, ErrUntrustedChain) {
		t.Fatalf("server error %v, want ErrUntrustedChain", r.err)
	}
}

// TestClientConfigDoesNotResume: strait's upstream dials never resume, so a
// built-in proxy or Connect-native server (which skip authorization on
// resumed sessions) sees a full handshake and checks intentions every time.
func TestClientConfigDoesNotResume(t *testing.T) {
	t.Parallel()
	m := newMesh(t)
	cfg := m.client(tls.VersionTLS13)
	if cfg.ClientSessionCache != nil {
		t.Fatal("ClientConfig carries a session cache")
	}
	for i := range 2 {
		c := mustConnect(t, m.srv.addr, cfg)
		if r := m.srv.next(t); r.err != nil {
			t.Fatalf("handshake %d: %v", i, r.err)
		}
		if c.ConnectionState().DidResume {
			t.Fatalf("connection %d resumed", i)
		}
		c.Close()
	}
}

// TestALPNStrait: a strait client and server agree on ALPNStrait; a server
// is silent about ALPN to clients that do not offer it (built-in, Envoy), and
// a client with NoALPN offers nothing.
func TestALPNStrait(t *testing.T) {
	t.Parallel()
	m := newMesh(t)
	c := mustConnect(t, m.srv.addr, m.web.ClientConfig(m.dbID, m.sni, ClientOptions{}))
	if r := m.srv.next(t); r.err != nil {
		t.Fatal(r.err)
	}
	if got := c.ConnectionState().NegotiatedProtocol; got != ALPNStrait {
		t.Fatalf("negotiated %q, want %q", got, ALPNStrait)
	}
	c.Close()
	c = mustConnect(t, m.srv.addr, m.web.ClientConfig(m.dbID, m.sni, ClientOptions{NoALPN: true}))
	if r := m.srv.next(t); r.err != nil {
		t.Fatal(r.err)
	}
	if got := c.ConnectionState().NegotiatedProtocol; got != "" {
		t.Fatalf("negotiated %q without offering anything", got)
	}
	c.Close()
	other := m.web.ClientConfig(m.dbID, m.sni, ClientOptions{}).Clone()
	other.NextProtos = []string{"h2", "http/1.1"}
	c = mustConnect(t, m.srv.addr, other)
	if r := m.srv.next(t); r.err != nil {
		t.Fatal(r.err)
	}
	if got := c.ConnectionState().NegotiatedProtocol; got != "" {
		t.Fatalf("server selected %q for an h2/http1.1 client; it must offer no ALPN", got)
	}
	c.Close()
}

// TestResumeKeyResumes: a config with a ResumeKey resumes sessions with a
// strait server, which still authorizes the resumed connection.
func TestResumeKeyResumes(t *testing.T) {
	t.Parallel()
	m := newMesh(t)
	cfg := m.web.ClientConfig(m.dbID, m.sni, ClientOptions{ResumeKey: "ep1"})
	if cfg.ClientSessionCache == nil {
		t.Fatal("no session cache with a ResumeKey")
	}
	for i := range 3 {
		c := mustConnect(t, m.srv.addr, cfg)
		if r := m.srv.next(t); r.err != nil {
			t.Fatalf("handshake %d: %v", i, r.err)
		}
		if i > 0 && !c.ConnectionState().DidResume {
			t.Fatalf("connection %d did not resume", i)
		}
		c.Close()
	}
}

// TestALPNMux: a server with tunnels selects ALPNMux only when offered; a
// server without tunnels never does, even when offered.
func TestALPNMux(t *testing.T) {
	t.Parallel()
	m := newMesh(t)
	src := newTestSource(t, "db", m.dbLeaf, testutil.RootList(testTD, m.ca))
	src.tunnels = true
	tun := startTLSServer(t, src.ServerConfig(m.auth.authorize))
	for _, tc := range []struct {
		name string
		srv  *tlsServer
		opts ClientOptions
		want string
	}{
		{"tunnels, mux offered", tun, ClientOptions{Mux: true}, ALPNMux},
		{"tunnels, strait/1 offered", tun, ClientOptions{}, ALPNStrait},
		{"tunnels, nothing offered", tun, ClientOptions{NoALPN: true, Mux: true}, ""},
		{"no tunnels, mux offered", m.srv, ClientOptions{Mux: true}, ALPNStrait},
	} {
		c := mustConnect(t, tc.srv.addr, m.web.ClientConfig(m.dbID, m.sni, tc.opts))
		if r := tc.srv.next(t); r.err != nil {
			t.Fatalf("%s: %v", tc.name, r.err)
		}
		if got := c.ConnectionState().NegotiatedProtocol; got != tc.want {
			t.Errorf("%s: negotiated %q, want %q", tc.name, got, tc.want)
		}
		c.Close()
	}
}
