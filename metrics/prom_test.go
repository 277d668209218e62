package metrics

import (
	"bytes"
	"net"
	"os"
	"strings"
	"testing"
	"time"
)

func exposition(t *testing.T, p *PromSink) string {
	t.Helper()
	var b bytes.Buffer
	if _, err := p.WriteTo(&b); err != nil {
		t.Fatal(err)
	}
	return b.String()
}

func TestPromSinkExposition(t *testing.T) {
	p := newPromSink()
	l := []Label{{Name: "src", Value: "web"}, {Name: "dst_type", Value: "service"}, {Name: "dst", Value: "db"}}
	p.IncrCounterWithLabels([]string{"upstream", "rx_bytes"}, 1000, l)
	p.IncrCounterWithLabels([]string{"upstream", "rx_bytes"}, 24, l)
	p.SetGaugeWithLabels([]string{"upstream", "conns"}, 3, l)
	p.SetGaugeWithLabels([]string{"upstream", "conns"}, 2, l)
	p.AddSampleWithLabels([]string{"upstream", "conn_duration"}, 10, l)
	p.AddSampleWithLabels([]string{"upstream", "conn_duration"}, 5.5, l)
	p.IncrCounterWithLabels([]string{"inbound", "denied"}, 1, []Label{{Name: "src", Value: `we"ird\svc` + "\n"}, {Name: "dst", Value: "web"}})
	p.IncrCounter([]string{"9lives", "a-b"}, 1)
	p.SetGauge([]string{"runtime", "malloc_count"}, 7) // a cumulative gauge becomes a counter
	p.SetGauge([]string{"runtime", "malloc_count"}, 9)
	want := `# HELP _lives_a_b_total go-metrics key 9lives.a-b (not documented by strait).
# TYPE _lives_a_b_total counter
_lives_a_b_total 1
# HELP inbound_denied_total Inbound connections refused by intentions, by source service.
# TYPE inbound_denied_total counter
inbound_denied_total{src="we\"ird\\svc\n",dst="web"} 1
# HELP runtime_mallocs_total Heap objects allocated since start.
# TYPE runtime_mallocs_total counter
runtime_mallocs_total 9
# HELP upstream_conn_duration_seconds Duration of proxied upstream connections in seconds.
# TYPE upstream_conn_duration_seconds summary
upstream_conn_duration_seconds_sum{src="web",dst_type="service",dst="db"} 0.0155
upstream_conn_duration_seconds_count{src="web",dst_type="service",dst="db"} 2
# HELP upstream_conns Open proxied connections per upstream (built-in proxy's upstream.conns).
# TYPE upstream_conns gauge
upstream_conns{src="web",dst_type="service",dst="db"} 2
# HELP upstream_rx_bytes_total Bytes received from the local application per upstream (built-in proxy's upstream.rx_bytes).
# TYPE upstream_rx_bytes_total counter
upstream_rx_bytes_total{src="web",dst_type="service",dst="db"} 1024
`
	if got := exposition(t, p); got != want {
		t.Fatalf("got\n%s\nwant\n%s", got, want)
	}
}

func TestPromSinkGaugeTTL(t *testing.T) {
	now := time.Unix(1000, 0)
	p := &PromSink{GaugeTTL: time.Minute, now: func() time.Time { return now }}
	p.SetGauge([]string{"upstream", "healthy_endpoints"}, 2)
	p.IncrCounter([]string{"upstream", "rx_bytes"}, 1)
	now = now.Add(59 * time.Second)
	if got := exposition(t, p); !strings.Contains(got, "upstream_healthy_endpoints 2") {
		t.Fatalf("gauge gone before its TTL:\n%s", got)
	}
	now = now.Add(2 * time.Second)
	got := exposition(t, p)
	if strings.Contains(got, "healthy_endpoints") || !strings.Contains(got, "upstream_rx_bytes_total 1") {
		t.Fatalf("after the TTL, want the gauge gone and the counter kept:\n%s", got)
	}
}

// TestConfigurePrefixAndSinks: the prefix applies to every sink; statsd
// gets the built-in names with labels flattened into the key and the
// hostname in gauge names (Consul's rules); dogstatsd gets labels and the
// configured tags as tags, and no hostname in names.
func TestConfigurePrefixAndSinks(t *testing.T) {
	statsd := listenUDP(t)
	dog := listenUDP(t)
	m := New(Options{})
	t.Cleanup(m.Close)
	m.IncrCounter([]string{"watch", "errors"}, 1, nil) // before Configure: dropped with the old prefix
	if err := m.Configure(Telemetry{
		MetricsPrefix: "strait", StatsdAddr: statsd.LocalAddr().String(), DogstatsdAddr: dog.LocalAddr().String(),
		DogstatsdTags: []string{"env:test"},
	}); err != nil {
		t.Fatal(err)
	}
	l := []Label{{Name: "src", Value: "web"}, {Name: "dst_type", Value: "service"}, {Name: "dst", Value: "db"}}
	m.IncrCounter(UpstreamRxBytes, 5, l)
	m.SetGauge(UpstreamConns, 1, l)
	host, _ := os.Hostname()

	var prom bytes.Buffer
	m.WritePrometheus(&prom)
	if s := prom.String(); !strings.Contains(s, `strait_upstream_rx_bytes_total{src="web",dst_type="service",dst="db"} 5`) ||
		!strings.Contains(s, `strait_upstream_conns{src="web",dst_type="service",dst="db"} 1`) || strings.Contains(s, "watch_errors") {
		t.Fatalf("prometheus:\n%s", s)
	}
	waitLines(t, statsd, "strait.upstream.rx_bytes.web.service.db:5.000000|c", "strait."+host+".upstream.conns.web.service.db:1.000000|g")
	waitLines(t, dog, "strait.upstream.rx_bytes:5|c|#src:web,dst_type:service,dst:db,env:test", "strait.upstream.conns:1|g|#src:web,dst_type:service,dst:db,env:test")
	if got := m.Telemetry().MetricsPrefix; got != "strait" {
		t.Fatalf("Telemetry().MetricsPrefix = %q", got)
	}
}

func TestConfigureDisableHostnameAndFilters(t *testing.T) {
	statsd := listenUDP(t)
	m := New(Options{})
	t.Cleanup(m.Close)
	no := false
	yes := true
	if err := m.Configure(Telemetry{StatsdAddr: statsd.LocalAddr().String(), DisableHostname: &yes, FilterDefault: &no, AllowedPrefixes: []string{"inbound"}}); err != nil {
		t.Fatal(err)
	}
	m.SetGauge(UpstreamConns, 7, nil) // filtered out
	m.SetGauge(InboundConns, 1, []Label{{Name: "dst", Value: "web"}})
	waitLines(t, statsd, "inbound.conns.web:1.000000|g")
	var prom bytes.Buffer
	m.WritePrometheus(&prom)
	if strings.Contains(prom.String(), "upstream_conns") {
		t.Fatalf("filtered metric in prometheus:\n%s", prom.String())
	}
}

func listenUDP(t *testing.T) net.PacketConn {
	t.Helper()
	c, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// waitLines reads datagrams until every wanted line has been seen.
func waitLines(t *testing.T, c net.PacketConn, want ...string) {
	t.Helper()
	missing := map[string]bool{}
	for _, w := range want {
		missing[w] = true
	}
	var seen []string
	buf := make([]byte, 65536)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	for len(missing) > 0 {
		n, _, err := c.ReadFrom(buf)
		if err != nil {
			t.Fatalf("still missing %v (saw %q): %v", missing, seen, err)
		}
		for _, line := range strings.Split(strings.TrimSpace(string(buf[:n])), "\n") {
			seen = append(seen, line)
			delete(missing, line)
		}
	}
}
