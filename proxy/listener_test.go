package proxy

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/straitproxy/strait/internal/testutil"
)

// TestServerShutdownDrains: Shutdown stops accepting at once, lets a live
// connection finish its exchange, and returns when it is done.
func TestServerShutdownDrains(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	echo := func(_ context.Context, c net.Conn, release func()) {
		defer release()
		defer c.Close()
		io.Copy(c, c)
	}
	s := newServer("test", ln, hclog.NewNullLogger(), nil, echo)
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("a")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1)
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		s.Shutdown(context.Background())
		close(done)
	}()
	// New connections are refused once the listener is closed.
	deadline := time.Now().Add(5 * time.Second)
	for {
		c2, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			break
		}
		c2.Close()
		if time.Now().After(deadline) {
			t.Fatal("listener still accepting during shutdown")
		}
	}
	// The live connection still works and Shutdown waits for it.
	if _, err := c.Write([]byte("b")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, buf); err != nil || buf[0] != 'b' {
		t.Fatalf("live connection broken during drain: %v %q", err, buf)
	}
	select {
	case <-done:
		t.Fatal("Shutdown returned while a connection was live")
	default:
	}
	c.Close()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Shutdown did not return after the last connection closed")
	}
}

// TestServerShutdownForces: when the grace period ends, what is left is
// closed.
func TestServerShutdownForces(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := newServer("test", ln, hclog.NewNullLogger(), nil, func(_ context.Context, c net.Conn, release func()) {
		defer release()
		defer c.Close()
		io.Copy(io.Discard, c)
	})
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// The accept loop registers the connection.
	testutil.Eventually(t, "the connection to be tracked", func() bool { return s.Active() != 0 })
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	s.Shutdown(ctx)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("connection still open after the grace period: %v", err)
	}
	if s.Active() != 0 {
		t.Fatalf("%d connections still tracked", s.Active())
	}
}
