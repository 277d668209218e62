package dataplane

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/h2c"
)

// serverOn starts an HTTP server on 127.0.0.1:0 and returns its port.
func serverOn(t *testing.T, h http.Handler) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &httptest.Server{Listener: ln, Config: &http.Server{Handler: h}}
	srv.Start()
	t.Cleanup(srv.Close)
	return ln.Addr().(*net.TCPAddr).Port
}

func TestNewServersRejectsPorts(t *testing.T) {
	for _, bad := range []string{"", "  ", "10.0.0.1:8502", "consul:8502", "http://consul"} {
		if _, err := NewServers(bad, nil, nil); err == nil {
			t.Errorf("NewServers(%q): no error", bad)
		}
	}
	for _, good := range []string{"127.0.0.1", "consul-server.consul.svc", "::1", "a, b c", "exec=echo 127.0.0.1"} {
		if _, err := NewServers(good, nil, nil); err != nil {
			t.Errorf("NewServers(%q): %v", good, err)
		}
	}
}

func TestResolveExpandsNames(t *testing.T) {
	resolve := func(_ context.Context, host string) ([]string, error) {
		if host == "servers" {
			return []string{"127.0.0.5", "127.0.0.6"}, nil
		}
		return nil, errors.New("no such host")
	}
	s, err := NewServers("servers,127.0.0.7,127.0.0.5", resolve, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Resolve(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(s.All(), ","); got != "127.0.0.5,127.0.0.6,127.0.0.7" {
		t.Errorf("servers %s", got)
	}
	s2, _ := NewServers("exec=echo 127.0.0.8 127.0.0.9", resolve, nil)
	if err := s2.Resolve(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(s2.All(), ","); got != "127.0.0.8,127.0.0.9" {
		t.Errorf("exec servers %s", got)
	}
}

// A down server is skipped at once: the request (GET, and a POST with a
// replayable body) is answered by the next one, with our token.
func TestTransportFailover(t *testing.T) {
	var got atomic.Value
	port := serverOn(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		got.Store(r.Method + " " + r.Header.Get("X-Consul-Token") + " " + string(b))
		w.Write([]byte("ok"))
	}))
	// 127.0.0.3 has nothing on port: connection refused.
	s, _ := NewServers("127.0.0.3 127.0.0.1", nil, nil)
	if err := s.Resolve(context.Background()); err != nil {
		t.Fatal(err)
	}
	tr := &serverTransport{servers: s, port: port, next: http.DefaultTransport, token: func() string { return "tok" }}
	c := &http.Client{Transport: tr}
	resp, err := c.Get("http://consul-server/v1/status/leader")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if s.Current() != "127.0.0.1" || s.Switches() != 1 {
		t.Errorf("current %s after %d switches", s.Current(), s.Switches())
	}
	if g := got.Load(); g != "GET tok " {
		t.Errorf("server saw %q", g)
	}
	resp, err = c.Post("http://consul-server/v1/acl/login", "application/json", strings.NewReader("body"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if g := got.Load(); g != "POST  body" {
		t.Errorf("login: server saw %q (a login carries no token)", g)
	}
}

// A 403 "ACL not found" asks for a token check; the body is still there.
func TestTransportNoticesRevokedToken(t *testing.T) {
	port := serverOn(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "ACL not found", http.StatusForbidden)
	}))
	s, _ := NewServers("127.0.0.1", nil, nil)
	_ = s.Resolve(context.Background())
	var revoked atomic.Int32
	tr := &serverTransport{servers: s, port: port, next: http.DefaultTransport, token: func() string { return "t" }, revoked: func() { revoked.Add(1) }}
	resp, err := (&http.Client{Transport: tr}).Get("http://x/v1/catalog/services")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if revoked.Load() != 1 || !strings.Contains(string(b), "ACL not found") {
		t.Errorf("revoked %d, body %q", revoked.Load(), b)
	}
}

func TestProtobufStringFields(t *testing.T) {
	msg := appendStringField(nil, 1, "csr")
	msg = binary.AppendUvarint(msg, 3<<3) // field 3, wire type 0 (varint): to be skipped
	msg = binary.AppendUvarint(msg, 300)
	msg = appendStringField(msg, 2, strings.Repeat("x", 200))
	if v, err := stringField(msg, 1); err != nil || v != "csr" {
		t.Errorf("field 1: %q %v", v, err)
	}
	if v, err := stringField(msg, 2); err != nil || v != strings.Repeat("x", 200) {
		t.Errorf("field 2: %q %v", v, err)
	}
	if _, err := stringField(msg[:len(msg)-1], 2); err == nil {
		t.Error("truncated message: no error")
	}
}

// The hand-made unary call against an h2c gRPC-shaped server: framing,
// token metadata, trailers, error statuses.
func TestGRPCCall(t *testing.T) {
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.ProtoMajor != 2 || r.Header.Get("Content-Type") != "application/grpc+proto" {
			http.Error(w, "not grpc", 400)
			return
		}
		body, _ := io.ReadAll(r.Body)
		w.Header().Set("Content-Type", "application/grpc")
		w.Header().Set("Trailer", "Grpc-Status, Grpc-Message")
		if r.Header.Get("x-consul-token") != "secret" {
			w.Header().Set("Grpc-Status", "16")
			w.Header().Set("Grpc-Message", "ACL%20not%20found")
			return
		}
		csr, err := stringField(body[5:], 1)
		if err != nil || int(binary.BigEndian.Uint32(body[1:5])) != len(body)-5 {
			w.Header().Set("Grpc-Status", "3")
			return
		}
		resp := appendStringField(nil, 2, "signed:"+csr)
		frame := binary.BigEndian.AppendUint32([]byte{0}, uint32(len(resp)))
		w.Write(append(frame, resp...))
		w.Header().Set("Grpc-Status", "0")
	})
	port := serverOn(t, h2c.NewHandler(h, &http2.Server{}))
	s, _ := NewServers("127.0.0.3,127.0.0.1", nil, nil)
	_ = s.Resolve(context.Background())
	tok := "secret"
	g := newGRPCClient(s, port, nil, func() string { return tok })
	defer g.close()
	out, err := g.call(context.Background(), signMethod, appendStringField(nil, 1, "the-csr"))
	if err != nil {
		t.Fatal(err)
	}
	if v, _ := stringField(out, 2); v != "signed:the-csr" {
		t.Errorf("answer %q", v)
	}
	tok = "wrong"
	_, err = g.call(context.Background(), signMethod, appendStringField(nil, 1, "x"))
	var se *grpcStatusError
	if !errors.As(err, &se) || se.Code != 16 || se.Message != "ACL not found" {
		t.Errorf("want grpc status 16 ACL not found, got %v", err)
	}
}

func TestSpiffeID(t *testing.T) {
	for _, c := range []struct{ ap, ns, want string }{
		{"", "", "spiffe://td.consul/ns/default/dc/dc1/svc/web"},
		{"default", "team", "spiffe://td.consul/ns/team/dc/dc1/svc/web"},
		{"eu", "", "spiffe://td.consul/ap/eu/ns/default/dc/dc1/svc/web"},
	} {
		if got := spiffeID("td.consul", c.ap, c.ns, "dc1", "web").String(); got != c.want {
			t.Errorf("partition %q namespace %q: %s, want %s", c.ap, c.ns, got, c.want)
		}
	}
}

func TestNewValidates(t *testing.T) {
	base := Options{Addresses: "127.0.0.1", ProxyServiceID: "p", NodeName: "n", TLSDisabled: true}
	if _, err := New(base); err != nil {
		t.Fatal(err)
	}
	for name, mut := range map[string]func(*Options){
		"no id":           func(o *Options) { o.ProxyServiceID = "" },
		"no node":         func(o *Options) { o.NodeName = "" },
		"login no method": func(o *Options) { o.Credentials = Credentials{Type: CredentialLogin, BearerTokenPath: "/x"} },
		"static no token": func(o *Options) { o.Credentials = Credentials{Type: CredentialStatic} },
		"bad type":        func(o *Options) { o.Credentials = Credentials{Type: "oidc"} },
		"bad address":     func(o *Options) { o.Addresses = "h:1" },
	} {
		o := base
		mut(&o)
		if _, err := New(o); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
	d, _ := New(Options{Addresses: "127.0.0.1", ProxyServiceID: "p", NodeName: "n"})
	if d.opts.HTTPPort != DefaultHTTPSPort || d.Config.Scheme != "https" || d.opts.GRPCPort != DefaultGRPCPort {
		t.Errorf("TLS defaults: port %d scheme %s grpc %d", d.opts.HTTPPort, d.Config.Scheme, d.opts.GRPCPort)
	}
}

// A token is replaced a minute before its expiry, or at two thirds of its
// life when that is shorter, so a short TTL does not mean a login at every
// check.
func TestTokenMargin(t *testing.T) {
	var h tokenHolder
	for _, c := range []struct {
		ttl, want time.Duration
	}{{time.Hour, time.Minute}, {30 * time.Second, 10 * time.Second}} {
		exp := time.Now().Add(c.ttl)
		h.set(&api.ACLToken{SecretID: "s", ExpirationTime: &exp})
		if got := time.Duration(h.margin.Load()); got > c.want || got < c.want-time.Second {
			t.Errorf("ttl %s: margin %s, want %s", c.ttl, got, c.want)
		}
	}
}
