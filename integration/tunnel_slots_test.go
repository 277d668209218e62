package integration

import (
	"crypto/rand"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"
)

// TestTunnelSlotsAfterMixedWorkload: after bulk transfers on 1 and 8
// connections, aborted transfers, a thousand short connections and
// request/response on 32 connections through one strait pair, 2,000
// connections open at the same time all work (the two ends agree on the
// tunnels' stream slots: none leaked; what does not fit the tunnels goes
// classic), and the server never refused a stream for max_streams.
func TestTunnelSlotsAfterMixedWorkload(t *testing.T) {
	t.Parallel()
	if !straitHasAdmin {
		t.Skip("strait binary has no admin endpoint")
	}
	a := startAgent(t)
	const key = 0x3c
	on := []string{"-tunnels", "on"}
	p := startStraitPairArgs(t, a, modeEcho, key, on, on)
	eventually(t, 30*time.Second, func() error { return echoVia("tcp", p.upstreamAddr, 1024, key) })

	parallel := func(n, inFlight int, f func(i int) error) {
		t.Helper()
		var wg sync.WaitGroup
		sem := make(chan struct{}, inFlight)
		errs := make(chan error, n)
		for i := range n {
			sem <- struct{}{}
			wg.Go(func() {
				defer func() { <-sem }()
				if err := f(i); err != nil {
					errs <- fmt.Errorf("#%d: %w", i, err)
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
	}
	// Bulk on 1, then on 8 connections.
	parallel(1, 1, func(int) error { return echoVia("tcp", p.upstreamAddr, 8<<20, key) })
	parallel(8, 8, func(int) error { return echoVia("tcp", p.upstreamAddr, 2<<20, key) })
	// Transfers the client aborts (RST) in the middle while the server's
	// side still has more to send than the stream's initial window: more
	// of them than one tunnel has slots.
	parallel(1200, 8, func(int) error {
		c, err := net.DialTimeout("tcp", p.upstreamAddr, 5*time.Second)
		if err != nil {
			return err
		}
		go c.Write(make([]byte, 320<<10))
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Read(make([]byte, 100)); err != nil {
			return err
		}
		c.(*net.TCPConn).SetLinger(0)
		return c.Close()
	})
	// Short connections.
	parallel(1000, 32, func(int) error { return echoVia("tcp", p.upstreamAddr, 100, key) })
	// Request/response on 32 connections.
	parallel(32, 32, func(int) error {
		c, err := net.DialTimeout("tcp", p.upstreamAddr, 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		for range 100 {
			if err := roundTrip(c, []byte("ping"), key, 10*time.Second); err != nil {
				return err
			}
		}
		return nil
	})

	// 2,000 at once, then one more round trip each once all are open.
	const n = 2000
	if errs := concurrentRoundTrips(p.upstreamAddr, n, key, func(i int) int { return 512 + i }, func(int) int { return 64 }); len(errs) > 0 {
		for _, err := range errs[:min(5, len(errs))] {
			t.Error(err)
		}
		t.Fatalf("%d of %d concurrent connections failed after the mixed workload", len(errs), n)
	}
	t.Logf("client after %d concurrent: %+v", n, *getTunnelStats(t, p.client).Tunnels)
	series, err := promSeries(p.server, "inbound_tunnel_refused_total")
	if err != nil {
		t.Fatal(err)
	}
	for labels, v := range series {
		if promLabel(labels, "reason") == "max_streams" && v != 0 {
			t.Errorf("the server refused %v streams for max_streams: the ends disagree on slots", v)
		}
	}
}

func randomPayload(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return b
}

// concurrentRoundTrips opens n connections to addr at the same time (dials
// paced, 100 in flight, so that the burst does not test the app's accept
// backlog), round-trips first(i) random bytes on each, and once all are
// open second(i) bytes more. It returns the failures.
func concurrentRoundTrips(addr string, n int, key byte, first, second func(i int) int) []error {
	var conns sync.WaitGroup
	conns.Add(n)
	allOpen := make(chan struct{})
	go func() { conns.Wait(); close(allOpen) }()
	var wg sync.WaitGroup
	dialing := make(chan struct{}, 100)
	errs := make(chan error, n)
	for i := range n {
		wg.Go(func() {
			dialing <- struct{}{}
			c, err := net.DialTimeout("tcp", addr, 5*time.Second)
			if err == nil {
				err = roundTrip(c, randomPayload(first(i)), key, 30*time.Second)
			}
			<-dialing
			conns.Done()
			if c != nil {
				defer c.Close()
			}
			if err != nil {
				errs <- fmt.Errorf("connection %d: %w", i, err)
				return
			}
			<-allOpen
			if err := roundTrip(c, randomPayload(second(i)), key, 30*time.Second); err != nil {
				errs <- fmt.Errorf("connection %d, with all open: %w", i, err)
			}
		})
	}
	wg.Wait()
	close(errs)
	var out []error
	for err := range errs {
		out = append(out, err)
	}
	return out
}
