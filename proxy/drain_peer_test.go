package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/straitproxy/strait/config"
	"github.com/straitproxy/strait/internal/testagent"
	"github.com/straitproxy/strait/internal/testutil"
	"github.com/straitproxy/strait/metrics"
)

// TestShutdownClosesHalfClosedPeer: the application has half-closed an
// upstream connection and the upstream peer holds its side open without a
// word. Only the peer-to-application direction is left, reading the peer;
// when the drain's grace ends, Shutdown must close the dialed side too, not
// only the accepted one (which no goroutine reads any more), or it waits
// for the half-close idle timeout.
func TestShutdownClosesHalfClosedPeer(t *testing.T) {
	t.Parallel()
	agent := testagent.Start(t)
	cert := agent.ClientCert("db")
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequireAnyClientCert})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	gotEOF := make(chan struct{})
	hold := make(chan struct{})
	defer close(hold)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		io.Copy(io.Discard, c) // until the application's half-close
		close(gotEOF)
		<-hold // then say nothing and keep the connection open
	}()
	agent.SetEndpoints("db", ln.Addr().String())

	sock := filepath.Join(t.TempDir(), "db.sock")
	p := New(Options{
		Parts: testParts(agent, nil, nil), Metrics: metrics.New(metrics.Options{}),
		HalfCloseTimeout: time.Minute, FlushInterval: 10 * time.Millisecond,
	})
	defer p.metrics.Close()
	cfgs := make(chan *config.Config, 1)
	cfgs <- &config.Config{Service: "web", Upstreams: []config.Upstream{{DestinationName: "db", LocalBindSocketPath: sock, ConnectTimeout: 5 * time.Second}}}
	done := make(chan error, 1)
	go func() { done <- p.Run(context.Background(), cfgs) }()
	testutil.EventuallyNil(t, func() error {
		if !p.Ready() {
			return errors.New("not ready: " + p.Readiness().Reason)
		}
		return nil
	})

	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	c.(*net.UnixConn).CloseWrite()
	select {
	case <-gotEOF:
	case <-time.After(10 * time.Second):
		t.Fatal("the upstream peer never saw the application's half-close")
	}

	close(cfgs)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	shut := make(chan struct{})
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		p.Shutdown(ctx)
		close(shut)
	}()
	select {
	case <-shut:
	case <-time.After(10 * time.Second):
		t.Fatal("Shutdown still waiting 10s after a 100ms grace: the half-closed connection's peer side was not closed")
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("application connection after the shutdown: %v", err)
	}
}
