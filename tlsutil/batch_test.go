package tlsutil

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"io"
	"math/big"
	"net"
	"sync/atomic"
	"testing"
	"time"
)

// countingConn counts the Writes that reach the socket.
type countingConn struct {
	net.Conn
	writes atomic.Int64
}

func (c *countingConn) Write(p []byte) (int, error) {
	c.writes.Add(1)
	return c.Conn.Write(p)
}

func selfSigned(t *testing.T) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "t"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), DNSNames: []string{"t"}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// TestBatchedWrite: the records of one large Write reach the socket in
// one system call and arrive intact; small Writes, the handshake and
// close_notify pass through.
func TestBatchedWrite(t *testing.T) {
	a, b := net.Pipe()
	counted := &countingConn{Conn: a}
	srv := Server(counted, &tls.Config{Certificates: []tls.Certificate{selfSigned(t)}})
	cli := tls.Client(b, &tls.Config{InsecureSkipVerify: true})
	defer a.Close()
	defer b.Close()
	got := make(chan []byte, 1)
	go func() { d, _ := io.ReadAll(cli); got <- d }()
	if err := srv.Handshake(); err != nil {
		t.Fatal(err)
	}
	payload := make([]byte, 128<<10) // eight full records at least
	rand.Read(payload)
	before := counted.writes.Load()
	if n, err := srv.Write(payload); err != nil || n != len(payload) {
		t.Fatalf("write %d, %v", n, err)
	}
	if w := counted.writes.Load() - before; w != 1 {
		t.Fatalf("%d socket writes for one 128 KiB Write, want 1", w)
	}
	if _, err := srv.Write([]byte("small")); err != nil {
		t.Fatal(err)
	}
	if err := srv.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	d := <-got
	if !bytes.Equal(d, append(payload, "small"...)) {
		t.Fatalf("received %d bytes, want %d intact", len(d), len(payload)+5)
	}
}
