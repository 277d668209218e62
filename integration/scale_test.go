package integration

import (
	"crypto/rand"
	"fmt"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// scaleConns is how many concurrent connections TestNineThousandConnections
// holds through the pair. STRAIT_IT_SCALE_CONNS overrides it (e.g. a
// smaller number for a quick local run under -race).
func scaleConns(t testing.TB) int {
	if v := os.Getenv("STRAIT_IT_SCALE_CONNS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			t.Fatalf("STRAIT_IT_SCALE_CONNS=%q: want a positive number", v)
		}
		return n
	}
	return 9000
}

// TestNineThousandConnections: 9,000 connections held open at once through
// a strait pair, each established end to end, each carrying data again
// once all are open; after they are closed, both strait processes return
// to their baseline of open file descriptors (/proc/<pid>/fd) and
// goroutines (the admin endpoint's /stats, which must agree with /proc on
// descriptors and count the connections; -pprof-addr for a binary without
// an admin endpoint).
//
// Every connection costs each strait two descriptors (the accepted one and
// the one it dials), so each holds ~18,000 at the peak. Both are started
// with a soft RLIMIT_NOFILE of 1024 (systemd's default) and must raise it
// to the hard limit themselves (Go's runtime raises it to hard-1 at start;
// strait must not undo that). The echo app runs as a process of its own, so that
// the test process holds only the 9,000 client sockets.
//
// The test is not parallel: it needs ~45,000 descriptors and ~27,000
// loopback ephemeral ports, and its CPU burst (18,000 TLS handshakes)
// would distort the timing assertions of the tests running next to it.
// It runs before the parallel tests start.
func TestNineThousandConnections(t *testing.T) {
	n := scaleConns(t)
	const key = 0x77
	// Each strait: 2 descriptors per connection plus its own.
	need := uint64(2*n + 512)
	if lim := raiseNoFile(t); lim < uint64(n+512) {
		t.Fatalf("RLIMIT_NOFILE hard limit %d: the test process needs %d for %d connections", lim, n+512, n)
	}
	a := startAgent(t)
	appProc, appAddr := startEchoProcess(t, key)
	dst, src := uniq("db"), uniq("web")
	ports := freePorts(t, 4)
	pub, up := hostPort(ports[0]), hostPort(ports[1])
	// Goroutines come from the admin endpoint's /stats; a binary without
	// one is measured through -pprof-addr instead.
	var pprofB, pprofA []string
	if !straitHasAdmin {
		pprofB, pprofA = []string{"-pprof-addr", hostPort(ports[2])}, []string{"-pprof-addr", hostPort(ports[3])}
	}
	const lowSoft = 1024
	// x25519 key exchange: the same handshake path at a lower CPU cost,
	// which matters for 18,000 handshakes on a 2-core box under -race.
	// -tunnels=off: this test measures the classic path, one TLS
	// connection (two descriptors) per connection end to end;
	// TestStraitPairTunnels covers streams over tunnels.
	kex := []string{"-tls-kex", "x25519", "-tunnels", "off"}
	server := startStraitNoFile(t, a, lowSoft, slices.Concat([]string{"-service", dst, "-listen", pub, "-service-addr", appAddr}, kex, pprofB)...)
	a.registerProxy(t, dst, ports[0])
	client := startStraitNoFile(t, a, lowSoft, slices.Concat([]string{"-service", src, "-upstream", dst + ":" + portOf(up)}, kex, pprofA)...)
	eventually(t, 30*time.Second, func() error { return echoVia("tcp", up, 1024, key) })

	type side struct {
		name  string
		p     *proc
		pprof string
		fds   int
		gs    int
	}
	sides := []*side{{name: "upstream-side strait", p: client}, {name: "public-side strait", p: server}}
	if !straitHasAdmin {
		sides[0].pprof, sides[1].pprof = pprofA[1], pprofB[1]
	}
	// measure returns a strait's open descriptors (from /proc), goroutines
	// and, with the admin endpoint, its active connections (else -1). It
	// checks that /stats agrees with /proc on descriptors (within slack,
	// as the two are read at slightly different moments).
	measure := func(s *side, slack int) (fds, gs, active int, err error) {
		if !straitHasAdmin {
			if fds, err = fdCount(s.p.Pid()); err != nil {
				return
			}
			gs, err = goroutinesNoKeepAlive(s.pprof)
			return fds, gs, -1, err
		}
		st, err := adminGetStats(s.p)
		if err != nil {
			return 0, 0, 0, err
		}
		if fds, err = fdCount(s.p.Pid()); err != nil {
			return
		}
		if d := st.OpenFDs - fds; d < -slack || d > slack {
			return 0, 0, 0, fmt.Errorf("%s: /stats open_fds %d, /proc/%d/fd %d", s.name, st.OpenFDs, s.p.Pid(), fds)
		}
		return fds, st.Goroutines, st.ActiveConnections, nil
	}
	for _, s := range sides {
		soft, hard, err := nofileLimits(s.p.Pid())
		if err != nil {
			t.Fatal(err)
		}
		if straitHasAdmin {
			st, err := adminGetStats(s.p)
			if err != nil {
				t.Fatal(err)
			}
			if r := st.RlimitNofile; r == nil || r.Soft != soft || r.Hard != hard {
				t.Errorf("%s: /stats rlimit_nofile %+v, /proc/%d/limits soft %d hard %d", s.name, r, s.p.Pid(), soft, hard)
			}
		}
		t.Logf("%s pid %d: RLIMIT_NOFILE soft %d hard %d (started with soft %d)", s.name, s.p.Pid(), soft, hard, lowSoft)
		// Go's runtime raises the soft limit to hard-1 (on purpose, see
		// syscall/rlimit.go); strait may go all the way.
		if soft+1 < hard {
			t.Errorf("%s pid %d runs with soft RLIMIT_NOFILE %d, below its hard limit %d: it must raise the soft limit at start", s.name, s.p.Pid(), soft, hard)
		}
		if soft < need {
			t.Fatalf("%s pid %d: RLIMIT_NOFILE soft %d hard %d; %d connections need ~%d descriptors", s.name, s.p.Pid(), soft, hard, n, need)
		}
	}

	// Baseline, after some traffic so that pools and caches exist.
	for i := 0; i < 20; i++ {
		if err := echoVia("tcp", up, 4096, key); err != nil {
			t.Fatalf("warm-up %d: %v", i, err)
		}
	}
	for _, s := range sides {
		var err error
		if s.fds, s.gs, _, err = measure(s, 4); err != nil {
			t.Fatal(err)
		}
		t.Logf("%s baseline: %d descriptors, %d goroutines", s.name, s.fds, s.gs)
	}

	// Open n connections, each with one round trip: established end to end.
	conns := make([]net.Conn, n)
	t.Cleanup(func() {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
	})
	start := time.Now()
	if errs := forEachParallel(n, 64, func(i int) error {
		c, err := net.DialTimeout("tcp", up, 30*time.Second)
		if err != nil {
			return fmt.Errorf("dial: %w", err)
		}
		conns[i] = c
		return roundTrip(c, []byte("hello "+strconv.Itoa(i)), key, 60*time.Second)
	}); len(errs) > 0 {
		t.Fatalf("%d of %d connections failed to open end to end; first: %v", len(errs), n, errs[0])
	}
	t.Logf("%d connections open end to end after %s", n, time.Since(start).Round(time.Millisecond))

	// All are held at once: each strait holds two descriptors and two
	// goroutines per connection, the app one descriptor.
	for _, s := range sides {
		fds, gs, active, err := measure(s, n/100+4)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%s with %d connections: %d descriptors, %d goroutines, %d active connections", s.name, n, fds, gs, active)
		if straitHasAdmin && active != n {
			t.Errorf("%s: /stats active_connections %d with %d connections open", s.name, active, n)
		}
		if fds < 2*n {
			t.Errorf("%s holds %d descriptors with %d connections open, want at least %d", s.name, fds, n, 2*n)
		}
		if gs < 2*n {
			t.Errorf("%s runs %d goroutines with %d connections open, want at least %d", s.name, gs, n, 2*n)
		}
	}
	if fds, err := fdCount(appProc.Pid()); err != nil {
		t.Fatal(err)
	} else if fds < n {
		t.Errorf("the app holds %d descriptors with %d connections open", fds, n)
	}

	// Every connection carries data again.
	start = time.Now()
	if errs := forEachParallel(n, 64, func(i int) error {
		payload := make([]byte, 512)
		_, _ = rand.Read(payload)
		return roundTrip(conns[i], payload, key, 60*time.Second)
	}); len(errs) > 0 {
		t.Fatalf("%d of %d open connections failed the second round trip; first: %v", len(errs), n, errs[0])
	}
	t.Logf("second round trip on all %d connections after %s", n, time.Since(start).Round(time.Millisecond))

	// Close them all: descriptors and goroutines return to the baseline.
	for i, c := range conns {
		c.Close()
		conns[i] = nil
	}
	closed := time.Now()
	for _, s := range sides {
		const fdSlack, gSlack = 8, 16
		var fds, gs int
		eventually(t, 60*time.Second, func() error {
			var active int
			var err error
			if fds, gs, active, err = measure(s, 4); err != nil {
				return err
			}
			if fds > s.fds+fdSlack || gs > s.gs+gSlack || active > 0 {
				return fmt.Errorf("%s after closing %d connections: %d descriptors (baseline %d), %d goroutines (baseline %d), %d active connections",
					s.name, n, fds, s.fds, gs, s.gs, active)
			}
			return nil
		})
		t.Logf("%s back to %d descriptors, %d goroutines %s after the close", s.name, fds, gs, time.Since(closed).Round(time.Millisecond))
	}
	if err := echoVia("tcp", up, 4096, key); err != nil {
		t.Fatalf("new connection after the load: %v", err)
	}
}

// forEachParallel runs fn(0..n-1) on workers goroutines and returns the
// errors.
func forEachParallel(n, workers int, fn func(i int) error) []error {
	var (
		next atomic.Int64
		mu   sync.Mutex
		errs []error
		wg   sync.WaitGroup
	)
	for range workers {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				if err := fn(i); err != nil {
					mu.Lock()
					errs = append(errs, fmt.Errorf("connection %d: %w", i, err))
					mu.Unlock()
				}
			}
		})
	}
	wg.Wait()
	return errs
}

// goroutinesNoKeepAlive is goroutines over a connection that is closed
// afterwards, so that measuring leaves nothing open in strait.
func goroutinesNoKeepAlive(addr string) (int, error) {
	return goroutinesWith(&http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}, addr)
}
