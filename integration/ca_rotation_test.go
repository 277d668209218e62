package integration

import (
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/agent/connect"
)

// TestStraitCARotation: while one connection streams data continuously
// through the strait pair, the Connect CA is rotated to a new root and key.
// The stream continues without error and byte-exact; strait picks up a leaf
// from the new root (checked by dialing its public listener and verifying
// the served certificate against the new root alone) and new connections
// through the pair keep working.
func TestStraitCARotation(t *testing.T) {
	t.Parallel()
	a := startAgent(t)
	const key = 0x42
	p := startStraitPair(t, a, modeEcho, key)
	oldRoot := a.ca

	// Stream: the writer sends a seeded pseudo-random stream at ~2 MB/s,
	// the reader checks every echoed byte against the same stream.
	c, err := net.Dial("tcp", p.upstreamAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	seed := rand.Uint64()
	var written, verified atomic.Int64
	stop := make(chan struct{})
	writeDone := make(chan error, 1)
	readDone := make(chan error, 1)
	go func() {
		src := rand.New(rand.NewPCG(seed, 1))
		buf := make([]byte, 16*1024)
		tick := time.NewTicker(8 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				writeDone <- c.(*net.TCPConn).CloseWrite()
				return
			case <-tick.C:
			}
			for i := range buf {
				buf[i] = byte(src.Uint32())
			}
			_ = c.SetWriteDeadline(time.Now().Add(20 * time.Second))
			if _, err := c.Write(buf); err != nil {
				writeDone <- fmt.Errorf("write after %d bytes: %w", written.Load(), err)
				return
			}
			written.Add(int64(len(buf)))
		}
	}()
	go func() {
		want := rand.New(rand.NewPCG(seed, 1))
		buf := make([]byte, 32*1024)
		for {
			_ = c.SetReadDeadline(time.Now().Add(20 * time.Second))
			n, err := c.Read(buf)
			for i := 0; i < n; i++ {
				if exp := byte(want.Uint32()) ^ key; buf[i] != exp {
					readDone <- fmt.Errorf("stream byte %d: got %#x, want %#x", verified.Load()+int64(i), buf[i], exp)
					return
				}
			}
			verified.Add(int64(n))
			if err != nil {
				if errors.Is(err, io.EOF) {
					readDone <- nil
				} else {
					readDone <- fmt.Errorf("read after %d bytes: %w", verified.Load(), err)
				}
				return
			}
		}
	}()
	streamAlive := func() error {
		select {
		case err := <-writeDone:
			return fmt.Errorf("stream writer stopped: %v", err)
		case err := <-readDone:
			return fmt.Errorf("stream reader stopped: %v", err)
		default:
			return nil
		}
	}
	progressSince := func(mark int64, what string) {
		t.Helper()
		eventually(t, 20*time.Second, func() error {
			if err := streamAlive(); err != nil {
				t.Fatal(err)
			}
			if v := verified.Load(); v < mark+256*1024 {
				return fmt.Errorf("stream stalled %s: %d bytes verified, %d written", what, v, written.Load())
			}
			return nil
		})
	}
	progressSince(0, "before the rotation")

	// Rotate.
	newRoot := newTestCA(t, a.trustDomain)
	rotatedAt := time.Now()
	a.installCA(t, newRoot)
	t.Logf("agent serves the new root %s (was %s) after %s",
		connect.CalculateCertFingerprint(newRoot.cert.Raw), connect.CalculateCertFingerprint(oldRoot.cert.Raw), time.Since(rotatedAt).Round(time.Millisecond))
	progressSince(verified.Load(), "right after the rotation")

	// strait serves a leaf from the new root: dial its public listener
	// with a leaf issued after the rotation and accept only the new root.
	newOnly := x509.NewCertPool()
	newOnly.AddCert(newRoot.cert)
	clientLeaf := a.leaf(t, uniq("probe"))
	if err := clientLeaf.Leaf.CheckSignatureFrom(newRoot.cert); err != nil {
		t.Fatalf("agent issued a post-rotation leaf not signed by the new root: %v", err)
	}
	// The agent re-signs cached leaves within a 30s jitter window.
	eventually(t, 90*time.Second, func() error {
		if err := streamAlive(); err != nil {
			t.Fatal(err)
		}
		conn, err := dialMesh(p.publicAddr, meshClientConfig(&clientLeaf, newOnly, a.spiffeID(p.dst)))
		if err != nil {
			return fmt.Errorf("strait public listener with new-root-only trust: %w", err)
		}
		defer conn.Close()
		return roundTrip(conn, []byte("new root"), key, 10*time.Second)
	})
	t.Logf("strait serves a new-root leaf %s after the rotation", time.Since(rotatedAt).Round(time.Millisecond))

	// New connections through the pair work after the rotation, for a
	// while (both sides on new leaves and roots).
	deadline := time.Now().Add(3 * time.Second)
	for i := 0; time.Now().Before(deadline); i++ {
		if err := echoVia("tcp", p.upstreamAddr, 32*1024, key); err != nil {
			t.Fatalf("new connection %d through the pair after the rotation: %v", i, err)
		}
	}
	progressSince(verified.Load(), "after the new leaves")

	// Finish the stream: everything written comes back, nothing else.
	close(stop)
	if err := <-writeDone; err != nil {
		t.Fatalf("stream writer: %v", err)
	}
	select {
	case err := <-readDone:
		if err != nil {
			t.Fatalf("stream reader: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("stream reader did not see EOF: %d of %d bytes verified", verified.Load(), written.Load())
	}
	if w, v := written.Load(), verified.Load(); w != v {
		t.Fatalf("stream: wrote %d bytes, got back %d", w, v)
	}
	t.Logf("streamed %d bytes across the CA rotation, byte-exact", written.Load())
}
