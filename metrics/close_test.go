package metrics

import (
	"bufio"
	"bytes"
	"fmt"
	"net"
	"runtime"
	"strings"
	"testing"
	"time"
)

// TestCloseJoinsSenders: Close sends what the push sinks hold and returns
// only once their goroutines are gone; after it, emitting is harmless and
// Configure refuses. Not parallel: it inspects every goroutine, and the
// other tests close their Metrics in their cleanups.
func TestCloseJoinsSenders(t *testing.T) {
	statsd := listenUDP(t)
	dog := listenUDP(t)
	statsite, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer statsite.Close()
	lines := make(chan string, 16)
	go func() {
		c, err := statsite.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		sc := bufio.NewScanner(c)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()

	m := New(Options{})
	if err := m.Configure(Telemetry{StatsdAddr: statsd.LocalAddr().String(), StatsiteAddr: statsite.Addr().String(),
		DogstatsdAddr: dog.LocalAddr().String()}); err != nil {
		t.Fatal(err)
	}
	waitGoroutines(t, 3, "after Configure")
	m.IncrCounter(WatchErrors, 1, nil)
	// A second Configure replaces the sinks: the first ones stop.
	if err := m.Configure(Telemetry{StatsdAddr: statsd.LocalAddr().String(), StatsiteAddr: statsite.Addr().String(),
		DogstatsdAddr: dog.LocalAddr().String()}); err != nil {
		t.Fatal(err)
	}
	waitGoroutines(t, 3, "after a second Configure")
	m.Close()
	waitGoroutines(t, 0, "after Close")
	// What was emitted before the first Configure's sinks stopped was sent.
	if l := <-lines; l != "watch.errors:1.000000|c" {
		t.Fatalf("statsite got %q", l)
	}
	m.IncrCounter(WatchErrors, 1, nil) // no panic, no goroutine
	m.Close()                          // idempotent
	if err := m.Configure(Telemetry{StatsdAddr: statsd.LocalAddr().String()}); err == nil {
		t.Fatal("Configure after Close succeeded")
	}
	waitGoroutines(t, 0, "after Configure on a closed Metrics")
}

// waitGoroutines polls until pushGoroutines is want. A joined goroutine
// has signalled its end but may still be returning for a moment; one that
// is not joined (go-metrics' senders) never goes away.
func waitGoroutines(t *testing.T, want int, when string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		n := pushGoroutines()
		if n == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines of the package %s, want %d:\n%s", n, when, want, stacks())
		}
		time.Sleep(time.Millisecond) // poll interval, not synchronisation
	}
}

func stacks() string {
	buf := make([]byte, 1<<20)
	return string(buf[:runtime.Stack(buf, true)])
}

// pushGoroutines counts the goroutines running code of this package or of
// go-metrics, tests' own goroutines aside.
func pushGoroutines() int {
	n := 0
	for _, g := range bytes.Split([]byte(stacks()), []byte("\n\n")) {
		s := string(g)
		if (strings.Contains(s, "straitproxy/strait/metrics.") || strings.Contains(s, "armon/go-metrics.")) &&
			!strings.Contains(s, "straitproxy/strait/metrics.Test") {
			n++
		}
	}
	return n
}

// TestStatsdLine: strait's statsd sink writes exactly what go-metrics'
// StatsdSink wrote (fmt's %f of a float32), so statsd dashboards built for
// the built-in proxy keep working.
func TestStatsdLine(t *testing.T) {
	s := statsdSink{}
	for _, v := range []float32{0, 1, 5, -3.25, 0.1, 123456.78, 3e9, 1e-7} {
		key, labels := []string{"inbound", "rx_bytes"}, []Label{{Name: "dst", Value: "my web:1"}}
		want := fmt.Sprintf("%s:%f|c\n", "inbound.rx_bytes.my_web_1", v)
		if got := s.line(key, v, "c", labels); got != want {
			t.Errorf("line(%v) = %q, want %q", v, got, want)
		}
	}
}
