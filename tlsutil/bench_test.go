package tlsutil

import (
	"context"
	"crypto/tls"
	"net"
	"testing"

	"github.com/straitproxy/strait/internal/testutil"
)

// BenchmarkHandshake measures one mutual-TLS handshake with the peer check
// and an authorizer call, both ends in this process (so ns/op is the CPU of
// a client plus a server), for the key exchanges and with session
// resumption as strait peers use it.
func BenchmarkHandshake(b *testing.B) {
	for _, bc := range []struct {
		name   string
		kex    string
		resume bool
	}{
		{"full/hybrid", "hybrid", false},
		{"full/x25519", "x25519", false},
		{"resumed/hybrid", "hybrid", true},
		{"resumed/x25519", "x25519", true},
	} {
		b.Run(bc.name, func(b *testing.B) {
			curves, err := KeyExchange(bc.kex)
			if err != nil {
				b.Fatal(err)
			}
			ca := testutil.NewCA(b, testTD)
			roots := testutil.RootList(testTD, ca)
			db := newTestSource(b, "db", ca.Leaf(b, "db", testutil.LeafOptions{}), roots)
			web := newTestSource(b, "web", ca.Leaf(b, "web", testutil.LeafOptions{}), roots)
			db.curves, web.curves = curves, curves
			srvCfg := db.ServerConfig(func(context.Context, Identity, string) error { return nil })
			opts := ClientOptions{}
			if bc.resume {
				opts.ResumeKey = "ep"
			}
			cliCfg := web.ClientConfig(ServiceID(testTD, "", "", "dc1", "db"), "db.sni", opts)
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				b.Fatal(err)
			}
			defer ln.Close()
			b.ReportAllocs()
			b.ResetTimer()
			if bc.resume {
				handshakePair(b, ln, cliCfg, srvCfg) // stores the first ticket
				b.ResetTimer()
			}
			for range b.N {
				if resumed := handshakePair(b, ln, cliCfg, srvCfg); resumed != bc.resume {
					b.Fatalf("resumed=%v, want %v", resumed, bc.resume)
				}
			}
		})
	}
}

// handshakePair runs both ends of one handshake over loopback TCP (a
// synchronous net.Pipe deadlocks when both ends flush at once, as they do
// in a resumed TLS 1.3 handshake) and reads one byte so that the client
// also processes the session ticket.
func handshakePair(b *testing.B, ln net.Listener, cliCfg, srvCfg *tls.Config) bool {
	c1, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	c2, err := ln.Accept()
	if err != nil {
		b.Fatal(err)
	}
	srv := tls.Server(c2, srvCfg)
	done := make(chan error, 1)
	go func() {
		err := srv.Handshake()
		if err == nil {
			_, err = srv.Write([]byte{1})
		}
		done <- err
	}()
	cli := tls.Client(c1, cliCfg)
	if err := cli.Handshake(); err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, 1)
	if _, err := cli.Read(buf); err != nil {
		b.Fatal(err)
	}
	if err := <-done; err != nil {
		b.Fatal(err)
	}
	resumed := cli.ConnectionState().DidResume
	c1.Close()
	c2.Close()
	return resumed
}
