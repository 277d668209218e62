package admin

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/straitproxy/strait/config"
	"github.com/straitproxy/strait/metrics"
)

// TestGatewayHandler: /ready follows the gateway's readiness with its
// reason, /routes and /stats show what the gateway returns, /config never
// shows the token.
func TestGatewayHandler(t *testing.T) {
	t.Parallel()
	var ready atomic.Bool
	m := metrics.Discard()
	m.IncrCounter(metrics.GatewayConnections, 3, []metrics.Label{{Name: "result", Value: "routed"}})
	h := GatewayHandler(GatewayOptions{
		Metrics: m,
		Ready: func() (bool, string) {
			if ready.Load() {
				return true, ""
			}
			return false, "waiting for the agent"
		},
		Routes: func() any { return map[string]any{"datacenter": "dc1"} },
		Stats:  func() any { return map[string]any{"active_connections": 2} },
		Config: GatewayConfigView(GatewaySettings{Gateway: "mesh", Service: "mesh-gateway",
			API: config.API{Token: "s3cr3t-token"}}, m.Telemetry()),
	})
	srv := httptest.NewServer(h)
	defer srv.Close()
	get := func(path string) (int, string) {
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := get("/ready"); code != http.StatusServiceUnavailable || !strings.Contains(body, "waiting for the agent") {
		t.Errorf("/ready before: %d %s", code, body)
	}
	ready.Store(true)
	if code, _ := get("/ready"); code != http.StatusOK {
		t.Errorf("/ready after: %d", code)
	}
	if _, body := get("/routes"); !strings.Contains(body, `"datacenter": "dc1"`) {
		t.Errorf("/routes: %s", body)
	}
	_, body := get("/stats")
	var st map[string]any
	if err := json.Unmarshal([]byte(body), &st); err != nil || st["gateway"] == nil || st["goroutines"] == nil {
		t.Errorf("/stats: %s (%v)", body, err)
	}
	if _, body := get("/config"); strings.Contains(body, "s3cr3t") || !strings.Contains(body, Redacted) {
		t.Errorf("/config leaks or omits the token: %s", body)
	}
	if _, body := get("/metrics"); !strings.Contains(body, `gateway_connections_total{result="routed"} 3`) {
		t.Errorf("/metrics: %s", body)
	}
	if code, _ := get("/upstreams"); code != http.StatusNotFound {
		t.Errorf("/upstreams in gateway mode: %d, want 404", code)
	}
}
