package integration

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// TestMetricsFromStart: a strait that has just logged "proxy ready", with
// no connection yet, already exposes every series whose labels are known at
// start, at zero; the exposition passes promtool; and the statsd sink gets
// the built-in proxy's names. SIGTERM then stops strait, its statsd sender
// included, with a clean exit.
func TestMetricsFromStart(t *testing.T) {
	t.Parallel()
	if !straitHasAdmin {
		t.Fatal("the strait binary has no admin endpoint")
	}
	a := startAgent(t)
	app := startApp(t, modeEcho, 0x5a)
	statsd, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer statsd.Close()
	svc, dst := uniq("web"), uniq("db")
	p := startStrait(t, a, "-service", svc, "-listen", hostPort(freePort(t)), "-service-addr", app.Addr(),
		"-upstream", fmt.Sprintf("%s:%d", dst, freePort(t)), "-statsd-addr", statsd.LocalAddr().String(), "-disable-hostname")
	defer p.stop(t)

	resp, err := adminClient.Get("http://" + p.adminAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: %d %v", resp.StatusCode, err)
	}
	body := string(b)
	in := fmt.Sprintf(`{dst=%q}`, svc)
	up := fmt.Sprintf(`{src=%q,dst_type="service",dst=%q}`, svc, dst)
	want := []string{
		"inbound_conns" + in + " 0",
		"inbound_rx_bytes_total" + in + " 0",
		"inbound_conn_duration_seconds_count" + in + " 0",
		fmt.Sprintf(`inbound_handshake_failed_total{dst=%q,reason="timeout"} 0`, svc),
		fmt.Sprintf(`inbound_app_dial_failed_total{dst=%q,reason="app_refused"} 0`, svc),
		fmt.Sprintf(`inbound_tunnel_refused_total{dst=%q,reason="max_streams"} 0`, svc),
		"upstream_conns" + up + " 0",
		"upstream_tx_bytes_total" + up + " 0",
		"upstream_dial_failed_total" + up + " 0",
		"upstream_healthy_endpoints" + up + " ",
		fmt.Sprintf(`leaf_time_to_expiry_seconds{service=%q} `, svc),
	}
	for _, w := range want {
		if !strings.Contains(body, "\n"+w) {
			t.Errorf("/metrics right after readiness lacks %q", w)
		}
	}
	if t.Failed() {
		t.Fatalf("/metrics:\n%s", body)
	}
	promtoolCheck(t, body)

	// The gauges emitted at readiness reach statsd under the built-in's
	// names (labels' values appended to the key).
	wantLine := "inbound.conns." + svc + ":0.000000|g"
	buf := make([]byte, 65536)
	statsd.SetReadDeadline(time.Now().Add(30 * time.Second))
	var seen []string
	for found := false; !found; {
		n, _, err := statsd.ReadFrom(buf)
		if err != nil {
			t.Fatalf("statsd never got %q (got %q): %v", wantLine, seen, err)
		}
		for _, l := range strings.Split(strings.TrimSpace(string(buf[:n])), "\n") {
			seen = append(seen, l)
			found = found || l == wantLine
		}
	}
}

// promtoolCheck runs Prometheus's own linter on an exposition and fails on
// any finding. Without promtool it skips, unless STRAIT_REQUIRE_TOOLS=1.
func promtoolCheck(t *testing.T, exposition string) {
	t.Helper()
	path, err := exec.LookPath("promtool")
	if err != nil {
		if os.Getenv("STRAIT_REQUIRE_TOOLS") == "1" {
			t.Fatalf("promtool not found and STRAIT_REQUIRE_TOOLS=1 (install the Debian package prometheus): %v", err)
		}
		t.Skip("promtool not on PATH; set STRAIT_REQUIRE_TOOLS=1 to make this a failure")
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, path, "check", "metrics")
	cmd.Stdin = strings.NewReader(exposition)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil || strings.TrimSpace(out.String()) != "" {
		t.Fatalf("promtool check metrics: %v\n%s", err, out.String())
	}
}
