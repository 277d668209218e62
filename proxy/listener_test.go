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

// TestListenerShutdownDrains: Shutdown stops accepting at once, lets a live
// connection finish its exchange, and returns when it is done.
func TestListenerShutdownDrains(t *testing.T) {
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
	s := newListener(kindUpstream, "test", ln, hclog.NewNullLogger())
	s.handle = echo
	s.start()
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

// TestListenerShutdownForces: when the grace period ends, what is left is
// closed.
func TestListenerShutdownForces(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := newListener(kindUpstream, "test", ln, hclog.NewNullLogger())
	s.handle = func(_ context.Context, c net.Conn, release func()) {
		defer release()
		defer c.Close()
		io.Copy(io.Discard, c)
	}
	s.start()
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

// TestListenerStartsOnlyWhenStarted: a constructed listener accepts
// nothing until start; one shut down before start never accepts.
func TestListenerStartsOnlyWhenStarted(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := newListener(kindUpstream, "test", ln, hclog.NewNullLogger())
	handled := make(chan struct{}, 1)
	s.handle = func(_ context.Context, c net.Conn, release func()) {
		c.Close()
		release()
		handled <- struct{}{}
	}
	c, err := net.Dial("tcp", ln.Addr().String()) // completes in the kernel's backlog
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	select {
	case <-handled:
		t.Fatal("handled before start")
	case <-time.After(50 * time.Millisecond):
	}
	if n := s.accepted.Load(); n != 0 {
		t.Fatalf("accepted %d before start", n)
	}
	s.start()
	select {
	case <-handled:
	case <-time.After(10 * time.Second):
		t.Fatal("not handled after start")
	}
	s.Shutdown(context.Background())

	ln2, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s2 := newListener(kindUpstream, "test", ln2, hclog.NewNullLogger())
	s2.handle = s.handle
	s2.Shutdown(context.Background())
	s2.start()
	if _, err := net.Dial("tcp", ln2.Addr().String()); err == nil {
		t.Fatal("a listener shut down before start still takes connections")
	}
}
