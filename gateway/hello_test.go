package gateway

import (
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

// captureHello returns the bytes a Go TLS client sends first: its
// ClientHello record.
func captureHello(t testing.TB, cfg *tls.Config) []byte {
	t.Helper()
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	done := make(chan struct{})
	go func() {
		defer close(done)
		c := tls.Client(a, cfg)
		c.SetDeadline(time.Now().Add(5 * time.Second))
		_ = c.Handshake() // fails once b is closed
	}()
	b.SetReadDeadline(time.Now().Add(5 * time.Second))
	var hdr [5]byte
	if _, err := io.ReadFull(b, hdr[:]); err != nil {
		t.Fatalf("reading the hello header: %v", err)
	}
	n := int(hdr[3])<<8 | int(hdr[4])
	rec := make([]byte, 5+n)
	copy(rec, hdr[:])
	if _, err := io.ReadFull(b, rec[5:]); err != nil {
		t.Fatalf("reading the hello: %v", err)
	}
	b.Close()
	<-done
	return rec
}

// serverNameOf is crypto/tls's reading of a ClientHello record: the
// server name GetConfigForClient sees, and whether Go accepted the hello
// as far as calling it.
func serverNameOf(record []byte) (string, bool) {
	var name string
	var called bool
	stop := errors.New("stop")
	cfg := &tls.Config{GetConfigForClient: func(hi *tls.ClientHelloInfo) (*tls.Config, error) {
		name, called = hi.ServerName, true
		return nil, stop
	}}
	c := tls.Server(&replayConn{r: bytes.NewReader(record)}, cfg)
	_ = c.Handshake()
	return name, called
}

// replayConn reads from r and discards writes.
type replayConn struct {
	net.Conn
	r io.Reader
}

func (c *replayConn) Read(p []byte) (int, error)  { return c.r.Read(p) }
func (c *replayConn) Write(p []byte) (int, error) { return len(p), nil }
func (c *replayConn) Close() error                { return nil }
func (c *replayConn) SetDeadline(time.Time) error { return nil }
func (c *replayConn) SetReadDeadline(time.Time) error {
	return nil
}
func (c *replayConn) SetWriteDeadline(time.Time) error { return nil }
func (c *replayConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
func (c *replayConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }

// tcpPair returns the two ends of a loopback TCP connection.
func tcpPair(t testing.TB) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var wg sync.WaitGroup
	wg.Go(func() { server, _ = ln.Accept() })
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	if server == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

// TestReadHelloOfGoClients: hellos of real Go clients (TLS 1.3 with the
// post-quantum key share, TLS 1.2 only) give their server name,
// lowercased, and ReadHello consumes exactly the record: what follows
// stays in the socket.
func TestReadHelloOfGoClients(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		cfg  *tls.Config
		want string
	}{
		{"tls13", &tls.Config{ServerName: "web.default.dc1.internal.abc.consul"}, "web.default.dc1.internal.abc.consul"},
		{"tls12", &tls.Config{ServerName: "v1.Web.default.dc1.internal.abc.consul", MaxVersion: tls.VersionTLS12}, "v1.web.default.dc1.internal.abc.consul"},
		{"x25519 only", &tls.Config{ServerName: "x.dc2.internal.abc.consul", CurvePreferences: []tls.CurveID{tls.X25519}}, "x.dc2.internal.abc.consul"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			tc.cfg.InsecureSkipVerify = true
			hello := captureHello(t, tc.cfg)
			client, server := tcpPair(t)
			if _, err := client.Write(append(append([]byte{}, hello...), "tail"...)); err != nil {
				t.Fatal(err)
			}
			rec, sni, err := ReadHello(server, time.Now().Add(5*time.Second))
			if err != nil {
				t.Fatalf("ReadHello: %v", err)
			}
			if sni != tc.want {
				t.Errorf("sni %q, want %q", sni, tc.want)
			}
			if !bytes.Equal(rec, hello) {
				t.Errorf("record of %d bytes differs from the %d-byte hello sent", len(rec), len(hello))
			}
			rest := make([]byte, 4)
			server.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.ReadFull(server, rest); err != nil || string(rest) != "tail" {
				t.Errorf("after the hello the socket holds %q (%v), want \"tail\"", rest, err)
			}
		})
	}
}

// hello builds a ClientHello record from its parts.
type helloParts struct {
	recordType  byte
	major       byte
	sessionID   []byte
	suites      []byte
	compression []byte
	exts        []byte // nil: no extensions field at all
	lenDelta    int    // added to the handshake length
}

func defaultParts() helloParts {
	return helloParts{recordType: 22, major: 3, suites: []byte{0x13, 0x01}, compression: []byte{0}}
}

func sniExt(names ...string) []byte {
	var list []byte
	for _, n := range names {
		list = append(list, 0, byte(len(n)>>8), byte(len(n)))
		list = append(list, n...)
	}
	data := append([]byte{byte(len(list) >> 8), byte(len(list))}, list...)
	return append([]byte{0, 0, byte(len(data) >> 8), byte(len(data))}, data...)
}

func (p helloParts) build() []byte {
	body := []byte{3, 3}
	body = append(body, make([]byte, 32)...)
	body = append(body, byte(len(p.sessionID)))
	body = append(body, p.sessionID...)
	body = append(body, byte(len(p.suites)>>8), byte(len(p.suites)))
	body = append(body, p.suites...)
	body = append(body, byte(len(p.compression)))
	body = append(body, p.compression...)
	if p.exts != nil {
		body = append(body, byte(len(p.exts)>>8), byte(len(p.exts)))
		body = append(body, p.exts...)
	}
	n := len(body) + p.lenDelta
	msg := append([]byte{1, byte(n >> 16), byte(n >> 8), byte(n)}, body...)
	return append([]byte{p.recordType, p.major, 1, byte(len(msg) >> 8), byte(len(msg))}, msg...)
}

func TestParseClientHello(t *testing.T) {
	t.Parallel()
	ok := defaultParts()
	ok.exts = sniExt("a.b.consul")
	if _, sni, err := readHelloBytes(ok.build()); err != nil || sni != "a.b.consul" {
		t.Fatalf("a valid hand-made hello: %q, %v", sni, err)
	}
	mod := func(f func(*helloParts)) []byte {
		p := defaultParts()
		p.exts = sniExt("a.b.consul")
		f(&p)
		return p.build()
	}
	for _, tc := range []struct {
		name string
		rec  []byte
		want error
	}{
		{"http", []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), ErrNotTLS},
		{"alert record", mod(func(p *helloParts) { p.recordType = 21 }), ErrNotTLS},
		{"sslv2-ish version", mod(func(p *helloParts) { p.major = 2 }), ErrNotTLS},
		{"zero-length record", []byte{22, 3, 1, 0, 0}, ErrBadHello},
		{"record longer than 16 KiB", append([]byte{22, 3, 1, 0x40, 0x01}, make([]byte, 1<<14+1)...), ErrHelloTooBig},
		{"fragmented", mod(func(p *helloParts) { p.lenDelta = 100 }), ErrFragmented},
		{"no extensions", mod(func(p *helloParts) { p.exts = nil }), ErrNoSNI},
		{"no sni", mod(func(p *helloParts) { p.exts = []byte{0, 10, 0, 2, 0, 0} }), ErrNoSNI},
		{"two sni extensions", mod(func(p *helloParts) { p.exts = append(sniExt("a.b"), sniExt("c.d")...) }), ErrBadHello},
		{"empty name", mod(func(p *helloParts) { p.exts = sniExt("") }), ErrBadHello},
		{"trailing dot", mod(func(p *helloParts) { p.exts = sniExt("a.b.") }), ErrBadHello},
		{"empty label", mod(func(p *helloParts) { p.exts = sniExt("a..b") }), ErrBadHello},
		{"space", mod(func(p *helloParts) { p.exts = sniExt("a b.c") }), ErrBadHello},
		{"newline", mod(func(p *helloParts) { p.exts = sniExt("a\nb") }), ErrBadHello},
		{"too long", mod(func(p *helloParts) { p.exts = sniExt(strings.Repeat("a.", 127) + "b") }), ErrBadHello},
		{"label too long", mod(func(p *helloParts) { p.exts = sniExt(strings.Repeat("a", 64) + ".b") }), ErrBadHello},
		{"session id past the message", mod(func(p *helloParts) { p.sessionID = make([]byte, 33); p.lenDelta = -40 }), ErrBadHello},
		{"odd cipher suites", mod(func(p *helloParts) { p.suites = []byte{1} }), ErrBadHello},
		{"truncated extension", mod(func(p *helloParts) { p.exts = []byte{0, 0, 0, 9, 0} }), ErrBadHello},
		{"server hello", func() []byte { r := mod(func(*helloParts) {}); r[5] = 2; return r }(), ErrBadHello},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, sni, err := readHelloBytes(tc.rec)
			if !errors.Is(err, tc.want) {
				t.Fatalf("got sni %q, err %v; want %v", sni, err, tc.want)
			}
		})
	}
}

// readHelloBytes runs ReadHello on rec through a pipe.
func readHelloBytes(rec []byte) ([]byte, string, error) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	go func() {
		a.Write(rec)
		a.Close()
	}()
	return ReadHello(b, time.Now().Add(5*time.Second))
}

// FuzzParseClientHello: ParseClientHello never panics, and whenever
// crypto/tls accepts a hello and sees a server name the gateway can route,
// the gateway reads the same name.
func FuzzParseClientHello(f *testing.F) {
	for _, cfg := range []*tls.Config{
		{ServerName: "web.default.dc1.internal.abc.consul"},
		{ServerName: "v1.web.default.dc1.internal.abc.consul", MaxVersion: tls.VersionTLS12},
		{},
	} {
		cfg.InsecureSkipVerify = true
		f.Add(captureHello(f, cfg))
	}
	p := defaultParts()
	p.exts = sniExt("a.b")
	f.Add(p.build())
	f.Fuzz(func(t *testing.T, rec []byte) {
		// One record, as ReadHello reads it; crypto/tls gets the same
		// bytes, so that it cannot assemble a hello from several records.
		if len(rec) < recordHeaderLen {
			return
		}
		n, herr := checkRecordHeader(rec)
		if herr != nil || len(rec) < recordHeaderLen+n {
			return
		}
		rec = rec[:recordHeaderLen+n]
		sni, err := ParseClientHello(rec[recordHeaderLen:])
		goName, accepted := serverNameOf(rec)
		if accepted && goName != "" && validHostName(strings.ToLower(goName)) {
			if err != nil || sni != strings.ToLower(goName) {
				t.Fatalf("crypto/tls reads server name %q; ParseClientHello %q, %v", goName, sni, err)
			}
		}
		if err == nil && !validHostName(sni) {
			t.Fatalf("ParseClientHello returned an unroutable name %q", sni)
		}
	})
}
