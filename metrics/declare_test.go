package metrics

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/straitproxy/strait/internal/testutil"
)

// TestDeclare: declared counters and summaries are exposed at zero under
// the prefix, filtered like emissions, and never sent to statsd.
func TestDeclare(t *testing.T) {
	t.Parallel()
	statsd := listenUDP(t)
	m := New(Options{})
	t.Cleanup(m.Close)
	if err := m.Configure(Telemetry{MetricsPrefix: "strait", StatsdAddr: statsd.LocalAddr().String(),
		BlockedPrefixes: []string{"strait.watch"}}); err != nil {
		t.Fatal(err)
	}
	l := []Label{{Name: "src", Value: "web"}, {Name: "dst_type", Value: "service"}, {Name: "dst", Value: "db"}}
	m.Declare(UpstreamRxBytes, l)
	m.Declare(UpstreamDuration, l)
	m.Declare(UpstreamConns, l) // a gauge: not declared
	m.Declare(WatchErrors, []Label{{Name: "watch", Value: "leaf web"}})
	var prom bytes.Buffer
	m.WritePrometheus(&prom)
	s := prom.String()
	for _, w := range []string{
		`strait_upstream_rx_bytes_total{src="web",dst_type="service",dst="db"} 0`,
		`strait_upstream_conn_duration_seconds_sum{src="web",dst_type="service",dst="db"} 0`,
		`strait_upstream_conn_duration_seconds_count{src="web",dst_type="service",dst="db"} 0`,
	} {
		if !strings.Contains(s, w+"\n") {
			t.Errorf("lacks %q", w)
		}
	}
	if strings.Contains(s, "conns") || strings.Contains(s, "watch") {
		t.Errorf("a gauge or a filtered series was declared")
	}
	if t.Failed() {
		t.Fatalf("prometheus:\n%s", s)
	}
	// The first line statsd sees is the first real emission.
	m.IncrCounter(UpstreamDialFailed, 1, l)
	buf := make([]byte, 65536)
	statsd.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, _, err := statsd.ReadFrom(buf)
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.SplitN(string(buf[:n]), "\n", 2)[0]; got != "strait.upstream.dial_failed.web.service.db:1.000000|c" {
		t.Fatalf("statsd's first line %q", got)
	}
}

// TestEveryNamePassesPromtool: every name strait knows, emitted under a
// dotted prefix, makes an exposition Prometheus's linter accepts.
func TestEveryNamePassesPromtool(t *testing.T) {
	t.Parallel()
	m := New(Options{})
	t.Cleanup(m.Close)
	if err := m.Configure(Telemetry{MetricsPrefix: "consul.proxy"}); err != nil {
		t.Fatal(err)
	}
	l := []Label{{Name: "dst", Value: "web"}}
	for dotted, d := range promDescs {
		key := strings.Split(dotted, ".")
		switch d.kind {
		case kindCounter:
			m.IncrCounter(key, 1, l)
			m.SetGauge(key, 2, []Label{{Name: "dst", Value: "gauge-fed"}})
		case kindGauge:
			m.SetGauge(key, 1, l)
		case kindSummary:
			m.AddSample(key, 1, l)
		}
	}
	m.EmitRuntimeStats()
	var prom bytes.Buffer
	m.WritePrometheus(&prom)
	if !strings.Contains(prom.String(), `consul_proxy_inbound_rx_bytes_total{dst="web"} 1`) {
		t.Fatalf("prefix not applied:\n%s", prom.String())
	}
	testutil.PromtoolCheck(t, prom.String())
}
