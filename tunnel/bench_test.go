package tunnel

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"io"
	"math/big"
	"net"
	"os"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/straitproxy/strait/internal/yamux"
)

// tlsPair returns the two ends of a TLS 1.3 connection over loopback TCP.
func tlsPair(tb testing.TB) (client, server net.Conn) {
	tb.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotAfter: time.Now().Add(time.Hour), DNSNames: []string{"x"}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		tb.Fatal(err)
	}
	cert := tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	defer ln.Close()
	ch := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			ch <- nil
			return
		}
		s := tls.Server(c, &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13})
		s.Handshake()
		ch <- s
	}()
	c, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13})
	if err != nil {
		tb.Fatal(err)
	}
	s := <-ch
	tb.Cleanup(func() { c.Close(); s.Close() })
	return c, s
}

// benchBulk writes b.N 32 KiB chunks through w and waits until r has read
// them all.
func benchBulk(b *testing.B, w io.Writer, r io.Reader) {
	chunk := benchChunk
	b.SetBytes(int64(chunk))
	done := make(chan int64)
	go func() {
		n, _ := io.CopyBuffer(io.Discard, io.LimitReader(r, int64(b.N)*int64(chunk)), make([]byte, chunk))
		done <- n
	}()
	buf := make([]byte, chunk)
	cpu0 := cpuTime()
	b.ResetTimer()
	for range b.N {
		if _, err := w.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	if n := <-done; n != int64(b.N)*int64(chunk) {
		b.Fatalf("read %d of %d", n, int64(b.N)*int64(chunk))
	}
	b.ReportMetric(float64(cpuTime()-cpu0)/float64(int64(b.N)*int64(chunk)), "cpu-ns/B")
}

// cpuTime is the process's user+system CPU time.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func BenchmarkBulkTLS(b *testing.B) {
	c, s := tlsPair(b)
	benchBulk(b, c, s)
}

func BenchmarkBulkStream(b *testing.B) {
	c, s := tlsPair(b)
	cs, err := yamux.Client(c, yamuxConfig(1), nil)
	if err != nil {
		b.Fatal(err)
	}
	ss, err := yamux.Server(s, yamuxConfig(16), nil)
	if err != nil {
		b.Fatal(err)
	}
	defer cs.Close()
	defer ss.Close()
	st, err := cs.OpenStream(context.Background())
	if err != nil {
		b.Fatal(err)
	}
	st.Write([]byte{0})
	sst, err := ss.AcceptStream()
	if err != nil {
		b.Fatal(err)
	}
	sst.Read(make([]byte, 1))
	benchBulk(b, &Conn{Stream: st}, sst)
}

var benchChunk = func() int {
	if v, err := strconv.Atoi(os.Getenv("CHUNK")); err == nil {
		return v
	}
	return 32 << 10
}()
