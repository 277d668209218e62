package config

import (
	"reflect"
	"testing"

	"github.com/hashicorp/consul/api"
)

// TestFromAgentServiceKeepsTelemetry: the telemetry block is handed on
// undecoded (package metrics decodes it), and its absence is nil.
func TestFromAgentServiceKeepsTelemetry(t *testing.T) {
	block := map[string]any{"statsd_address": "127.0.0.1:8125", "disable_hostname": true}
	svc := &api.AgentService{
		ID: "web-sidecar-proxy", Kind: api.ServiceKindConnectProxy, Port: 21000,
		Proxy: &api.AgentServiceConnectProxyConfig{
			DestinationServiceName: "web", LocalServicePort: 8080,
			Config: map[string]any{"telemetry": block},
		},
	}
	c, err := FromAgentService(svc)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(c.Telemetry, block) {
		t.Fatalf("Telemetry = %#v, want %#v", c.Telemetry, block)
	}
	svc.Proxy.Config = nil
	if c, err = FromAgentService(svc); err != nil || c.Telemetry != nil {
		t.Fatalf("without a block: Telemetry = %#v, err %v", c.Telemetry, err)
	}
}
