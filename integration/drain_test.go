package integration

import (
	"errors"
	"fmt"
	"os/exec"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// TestSigtermDrainsUnderLoad: SIGTERM to the public-side strait of a pair
// while paced multi-megabyte transfers are in flight through it. With the
// admin endpoint, /ready answers 503 while strait drains.
func TestSigtermDrainsUnderLoad(t *testing.T) {
	t.Parallel()
	a := startAgent(t)

	const (
		chunk    = 32 << 10
		interval = 40 * time.Millisecond // 800 KB/s per transfer
		grace    = 10 * time.Second
	)

	// load starts n paced digest transfers of size bytes through p and
	// waits until the app has accepted every one of them (each is then
	// established end to end). wait returns every transfer's result.
	load := func(t *testing.T, p *straitPair, n, size int) (finished *atomic.Int64, wait func(time.Duration) []error) {
		t.Helper()
		base := p.app.Accepts()
		finished = new(atomic.Int64)
		results := make([]error, n)
		var wg sync.WaitGroup
		for i := range n {
			wg.Go(func() {
				results[i] = digestTransfer(p.upstreamAddr, size, chunk, interval, nil)
				finished.Add(1)
			})
		}
		eventually(t, 20*time.Second, func() error {
			if got := p.app.Accepts() - base; got < int64(n) {
				return fmt.Errorf("app has accepted %d of %d transfers", got, n)
			}
			return nil
		})
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		return finished, func(d time.Duration) []error {
			select {
			case <-done:
			case <-time.After(d):
				t.Fatalf("%d of %d transfers still running after %s", int64(n)-finished.Load(), n, d)
			}
			return results
		}
	}
	ready := func(t *testing.T, p *straitPair) {
		t.Helper()
		eventually(t, 30*time.Second, func() error { return digestTransfer(p.upstreamAddr, 4096, 4096, time.Millisecond, nil) })
	}

	// 20 transfers of 2 MiB, each lasting ~2.6s: SIGTERM comes while all are
	// in flight. New connections are refused at once (the public port
	// closes; through the pair they are accepted and closed), every
	// transfer completes byte-exact, the app sees no connection after the
	// signal, and strait exits 0 as soon as the last transfer is done,
	// long before the 10s grace.
	t.Run("in-flight transfers complete", func(t *testing.T) {
		p := startStraitPair(t, a, modeDigest, 0, "-shutdown-grace", grace.String())
		ready(t, p)
		const n, size = 20, 2 << 20
		finished, wait := load(t, p, n, size)
		if f := finished.Load(); f != 0 {
			t.Fatalf("%d transfers finished before SIGTERM; the load is too short to test draining", f)
		}
		acceptsAtSignal := p.app.Accepts()
		sent := time.Now()
		if err := p.server.cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		eventually(t, 3*time.Second, func() error { return dialFails(p.publicAddr) })
		refusedAfter := time.Since(sent)
		if straitHasAdmin {
			// While it drains, strait reports not ready, so that a load
			// balancer or orchestrator stops sending traffic.
			code, r, err := adminReady(p.server)
			if err != nil {
				t.Fatalf("/ready while draining: %v", err)
			}
			if code != 503 || r.Ready {
				t.Errorf("/ready while draining: %d %+v, want 503 and not ready", code, r)
			}
		}
		for i := 0; i < 3; i++ {
			if err := refusedVia("tcp", p.upstreamAddr); err != nil {
				t.Fatalf("new connection %d through the pair while the public side drains: %v", i, err)
			}
		}
		inFlight := int64(n) - finished.Load()
		results := wait(grace + 10*time.Second)
		lastDone := time.Now()
		failed := 0
		for i, err := range results {
			if err != nil {
				failed++
				t.Errorf("transfer %d: %v", i, err)
			}
		}
		if failed > 0 {
			t.Fatalf("%d of %d in-flight transfers did not complete byte-exact across SIGTERM (grace %s)", failed, n, grace)
		}
		if got := p.app.Accepts(); got != acceptsAtSignal {
			t.Errorf("app accepted %d connections after SIGTERM", got-acceptsAtSignal)
		}
		select {
		case <-p.server.done:
		case <-time.After(5 * time.Second):
			t.Fatalf("strait still running 5s after its last connection finished (grace %s)", grace)
		}
		exitedAfter := time.Since(sent)
		if p.server.waitErr != nil {
			t.Fatalf("strait exit after draining: %v, want status 0", p.server.waitErr)
		}
		if exitedAfter >= grace {
			t.Errorf("strait exited %s after SIGTERM: it waited for the grace instead of the last connection", exitedAfter)
		}
		t.Logf("SIGTERM: public port closed after %s; %d transfers in flight then, all %d byte-exact (%d MiB each); last done %s after SIGTERM; exit 0 after %s",
			refusedAfter.Round(time.Millisecond), inFlight, n, size>>20, lastDone.Sub(sent).Round(time.Millisecond), exitedAfter.Round(time.Millisecond))
	})

	// A second SIGTERM during the drain exits at once with a non-zero
	// status; the transfers still in flight are cut.
	t.Run("second SIGTERM exits at once", func(t *testing.T) {
		p := startStraitPair(t, a, modeDigest, 0, "-shutdown-grace", grace.String())
		ready(t, p)
		const n, size = 5, 8 << 20 // ~10s each: still running when strait exits
		finished, wait := load(t, p, n, size)
		if err := p.server.cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		eventually(t, 3*time.Second, func() error { return dialFails(p.publicAddr) })
		if p.server.exited() {
			t.Fatalf("strait exited on the first SIGTERM with %d transfers in flight (grace %s): %v", int64(n)-finished.Load(), grace, p.server.waitErr)
		}
		second := time.Now()
		if err := p.server.cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		select {
		case <-p.server.done:
		case <-time.After(5 * time.Second):
			t.Fatalf("strait still running 5s after a second SIGTERM")
		}
		took := time.Since(second)
		t.Logf("exited %s after the second SIGTERM: %v", took.Round(time.Millisecond), p.server.waitErr)
		if took > 1500*time.Millisecond {
			t.Errorf("strait took %s to exit after the second SIGTERM, want at once (~1s)", took.Round(time.Millisecond))
		}
		var ee *exec.ExitError
		if !errors.As(p.server.waitErr, &ee) || ee.ExitCode() == 0 {
			t.Errorf("exit after a second SIGTERM: %v (%s), want a non-zero exit status", p.server.waitErr, p.server.cmd.ProcessState)
		}
		cut := 0
		for _, err := range wait(30 * time.Second) {
			if err != nil {
				cut++
			}
		}
		if cut != n {
			t.Errorf("%d of %d transfers in flight completed although strait exited on the second SIGTERM", n-cut, n)
		}
	})
}
