package admin

import (
	"strings"
	"testing"

	"github.com/straitproxy/strait/internal/testutil"
	"github.com/straitproxy/strait/proxy"
	"github.com/straitproxy/strait/tunnel"
)

// TestMetricsAtZeroWhenReady: once /ready says 200, and before the first
// periodic flush (FlushInterval is left at its 5s default) or any
// connection, /metrics has every strait series whose labels are known at
// start, at zero; and the exposition passes promtool.
func TestMetricsAtZeroWhenReady(t *testing.T) {
	t.Parallel()
	e := startWith(t, Settings{}, func(o *proxy.Options) { o.Tunnels = &tunnel.Pool{} })
	e.deliver()
	e.waitReady(t)
	code, body := get(t, e.base+"/metrics")
	if code != 200 {
		t.Fatalf("/metrics %d", code)
	}
	up := `{src="web",dst_type="service",dst="web"}`
	want := []string{
		`inbound_conns{dst="web"} 0`,
		`inbound_rx_bytes_total{dst="web"} 0`,
		`inbound_tx_bytes_total{dst="web"} 0`,
		`inbound_conn_duration_seconds_count{dst="web"} 0`,
		`inbound_conn_duration_seconds_sum{dst="web"} 0`,
		`inbound_app_dial_failed_total{dst="web",reason="app_refused"} 0`,
		`inbound_app_dial_failed_total{dst="web",reason="app_unreachable"} 0`,
		`upstream_conns` + up + ` 0`,
		`upstream_rx_bytes_total` + up + ` 0`,
		`upstream_tx_bytes_total` + up + ` 0`,
		`upstream_conn_duration_seconds_count` + up + ` 0`,
		`upstream_dial_failed_total` + up + ` 0`,
		`upstream_dial_retries_total` + up + ` 0`,
		`upstream_ejected_endpoints` + up + ` 0`,
		`upstream_healthy_endpoints` + up + ` `,
		`leaf_time_to_expiry_seconds{service="web"} `,
	}
	for _, r := range []string{"timeout", "no_client_cert", "untrusted_chain", "wrong_trust_domain", "not_a_service",
		"not_ready", "leaf_expired", "authz_error", "peer_closed", "shutdown", "tls_error"} {
		want = append(want, `inbound_handshake_failed_total{dst="web",reason="`+r+`"} 0`)
	}
	for _, r := range []string{"max_tunnels", "max_streams", "stream_rate", "bad_header", "framing"} {
		want = append(want, `inbound_tunnel_refused_total{dst="web",reason="`+r+`"} 0`)
	}
	for _, w := range want {
		if !strings.Contains(body, "\n"+w) {
			t.Errorf("/metrics of a fresh proxy lacks %q", w)
		}
	}
	if t.Failed() {
		t.Logf("/metrics:\n%s", body)
	}
	testutil.PromtoolCheck(t, body)
}
