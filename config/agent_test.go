package config

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"

	"github.com/straitproxy/strait/internal/testutil"
)

// registration is what GET /v1/agent/service/web-sidecar-proxy returns for
// a sidecar registered with `connect { sidecar_service {} }` plus upstreams.
const registration = `{
  "Kind": "connect-proxy",
  "ID": "web-sidecar-proxy",
  "Service": "web-sidecar-proxy",
  "Tags": [],
  "Meta": {},
  "Port": 21000,
  "Address": "10.0.0.7",
  "TaggedAddresses": {
    "lan_ipv4": {"Address": "10.0.0.7", "Port": 21000},
    "wan_ipv4": {"Address": "10.0.0.7", "Port": 21000}
  },
  "Weights": {"Passing": 1, "Warning": 1},
  "EnableTagOverride": false,
  "Proxy": {
    "DestinationServiceName": "web",
    "DestinationServiceID": "web",
    "LocalServiceAddress": "127.0.0.1",
    "LocalServicePort": 8080,
    "Config": {"protocol": "tcp"},
    "Upstreams": [
      {
        "DestinationType": "service",
        "DestinationName": "db",
        "Datacenter": "dc2",
        "LocalBindAddress": "127.0.0.1",
        "LocalBindPort": 9191,
        "Config": {"protocol": "tcp"},
        "MeshGateway": {}
      },
      {
        "DestinationType": "prepared_query",
        "DestinationName": "geo",
        "LocalBindPort": 9192,
        "MeshGateway": {}
      }
    ],
    "MeshGateway": {},
    "Expose": {}
  },
  "ContentHash": "9f2b7a1c5e3d4f60",
  "Datacenter": "dc1"
}`

// decodeRegistration applies edits to the generic JSON of registration and
// decodes the result as the API client does.
func decodeRegistration(t testing.TB, edits ...func(m map[string]any)) *api.AgentService {
	t.Helper()
	b := registrationJSON(t, edits...)
	var svc api.AgentService
	if err := json.Unmarshal(b, &svc); err != nil {
		t.Fatalf("decoding registration: %v\n%s", err, b)
	}
	return &svc
}

func registrationJSON(t testing.TB, edits ...func(m map[string]any)) []byte {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal([]byte(registration), &m); err != nil {
		t.Fatal(err)
	}
	for _, e := range edits {
		e(m)
	}
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func proxyOf(m map[string]any) map[string]any { return m["Proxy"].(map[string]any) }

func upstreamOf(m map[string]any, i int) map[string]any {
	return proxyOf(m)["Upstreams"].([]any)[i].(map[string]any)
}

// proxyConfig sets Proxy.Config to the literal JSON object raw.
func proxyConfig(raw string) func(map[string]any) {
	return func(m map[string]any) { proxyOf(m)["Config"] = json.RawMessage(raw) }
}

func set(path func(map[string]any) map[string]any, key string, v any) func(map[string]any) {
	return func(m map[string]any) { path(m)[key] = v }
}

func top(m map[string]any) map[string]any { return m }

func TestFromAgentServiceBase(t *testing.T) {
	t.Parallel()
	c, err := FromAgentService(decodeRegistration(t))
	if err != nil {
		t.Fatalf("FromAgentService: %v", err)
	}
	want := &Config{
		ProxyID: "web-sidecar-proxy",
		Service: "web",
		Public: &Public{
			BindAddress:         "10.0.0.7",
			BindPort:            21000,
			LocalServiceAddress: "127.0.0.1:8080",
		},
		Upstreams: []Upstream{
			{DestinationType: TypeService, DestinationName: "db", Datacenter: "dc2", LocalBindAddress: "127.0.0.1", LocalBindPort: 9191, Protocol: "tcp"},
			{DestinationType: TypePreparedQuery, DestinationName: "geo", LocalBindPort: 9192},
		},
	}
	if !reflect.DeepEqual(c, want) {
		t.Fatalf("FromAgentService\n got %+v %+v %+v\nwant %+v %+v %+v", c, c.Public, c.Upstreams, want, want.Public, want.Upstreams)
	}
	if got := c.Public.Addr(); got != "10.0.0.7:21000" {
		t.Errorf("Public.Addr() = %q", got)
	}
	if got := c.Public.HandshakeTimeoutOrDefault(); got != DefaultHandshakeTimeout {
		t.Errorf("handshake timeout default %v", got)
	}
	if got := c.Public.LocalConnectTimeoutOrDefault(); got != DefaultLocalConnectTimeout {
		t.Errorf("local connect timeout default %v", got)
	}
	if got := c.Upstreams[0].ConnectTimeoutOrDefault(); got != DefaultConnectTimeout {
		t.Errorf("connect timeout default %v", got)
	}
	if got := c.Upstreams[1].String(); got != "geo (prepared_query)" {
		t.Errorf("upstream String() = %q", got)
	}
	if got := c.Upstreams[0].String(); got != "db in dc2" {
		t.Errorf("upstream String() = %q", got)
	}
}

// TestFromAgentServiceChainOverrides: an upstream's Config.protocol and
// MeshGateway.Mode reach the Upstream (the discovery chain request's
// overrides); a non-string protocol is refused with its place.
func TestFromAgentServiceChainOverrides(t *testing.T) {
	t.Parallel()
	c, err := FromAgentService(decodeRegistration(t,
		set(func(m map[string]any) map[string]any { return upstreamOf(m, 0) }, "Config", map[string]any{"protocol": "HTTP", "connect_timeout_ms": 2500}),
		set(func(m map[string]any) map[string]any { return upstreamOf(m, 0) }, "MeshGateway", map[string]any{"Mode": "remote"}),
	))
	if err != nil {
		t.Fatal(err)
	}
	u := c.Upstreams[0]
	if u.Protocol != "http" || u.MeshGatewayMode != MeshGatewayRemote || u.ConnectTimeout != 2500*time.Millisecond {
		t.Errorf("upstream %+v", u)
	}
	if c.Upstreams[1].Protocol != "" || c.Upstreams[1].MeshGatewayMode != "" {
		t.Errorf("second upstream %+v, want no overrides", c.Upstreams[1])
	}
	_, err = FromAgentService(decodeRegistration(t,
		set(func(m map[string]any) map[string]any { return upstreamOf(m, 0) }, "Config", map[string]any{"protocol": 7}),
	))
	if err == nil || !strings.Contains(err.Error(), "upstream db") || !strings.Contains(err.Error(), "protocol") {
		t.Errorf("numeric protocol: err = %v", err)
	}
}

func TestFromAgentServicePublic(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name  string
		edits []func(map[string]any)
		want  Public
	}{
		{
			name:  "bind_address and bind_port override the service address",
			edits: []func(map[string]any){proxyConfig(`{"bind_address": "0.0.0.0", "bind_port": 21001}`)},
			want:  Public{BindAddress: "0.0.0.0", BindPort: 21001, LocalServiceAddress: "127.0.0.1:8080"},
		},
		{
			name:  "bind_port as a float",
			edits: []func(map[string]any){proxyConfig(`{"bind_port": 21002.0}`)},
			want:  Public{BindAddress: "10.0.0.7", BindPort: 21002, LocalServiceAddress: "127.0.0.1:8080"},
		},
		{
			name:  "bind_port as a string",
			edits: []func(map[string]any){proxyConfig(`{"bind_port": "21003"}`)},
			want:  Public{BindAddress: "10.0.0.7", BindPort: 21003, LocalServiceAddress: "127.0.0.1:8080"},
		},
		{
			name:  "bind_port with service port 0 enables the listener",
			edits: []func(map[string]any){set(top, "Port", 0), proxyConfig(`{"bind_port": 21004}`)},
			want:  Public{BindAddress: "10.0.0.7", BindPort: 21004, LocalServiceAddress: "127.0.0.1:8080"},
		},
		{
			name:  "no address",
			edits: []func(map[string]any){set(top, "Address", "")},
			want:  Public{BindPort: 21000, LocalServiceAddress: "127.0.0.1:8080"},
		},
		{
			name:  "local_service_address host:port",
			edits: []func(map[string]any){proxyConfig(`{"local_service_address": "127.0.0.2:9090"}`)},
			want:  Public{BindAddress: "10.0.0.7", BindPort: 21000, LocalServiceAddress: "127.0.0.2:9090"},
		},
		{
			name:  "local_service_address plain host takes LocalServicePort",
			edits: []func(map[string]any){proxyConfig(`{"local_service_address": "10.1.1.1"}`)},
			want:  Public{BindAddress: "10.0.0.7", BindPort: 21000, LocalServiceAddress: "10.1.1.1:8080"},
		},
		{
			name:  "local_service_address IPv6 host",
			edits: []func(map[string]any){proxyConfig(`{"local_service_address": "::1"}`)},
			want:  Public{BindAddress: "10.0.0.7", BindPort: 21000, LocalServiceAddress: "[::1]:8080"},
		},
		{
			name:  "local_service_address bracketed IPv6 with port",
			edits: []func(map[string]any){proxyConfig(`{"local_service_address": "[::1]:9000"}`)},
			want:  Public{BindAddress: "10.0.0.7", BindPort: 21000, LocalServiceAddress: "[::1]:9000"},
		},
		{
			name:  "LocalServiceAddress IPv6",
			edits: []func(map[string]any){set(proxyOf, "LocalServiceAddress", "fd00::5")},
			want:  Public{BindAddress: "10.0.0.7", BindPort: 21000, LocalServiceAddress: "[fd00::5]:8080"},
		},
		{
			name:  "no local address defaults to loopback",
			edits: []func(map[string]any){set(proxyOf, "LocalServiceAddress", "")},
			want:  Public{BindAddress: "10.0.0.7", BindPort: 21000, LocalServiceAddress: "127.0.0.1:8080"},
		},
		{
			name:  "local service socket",
			edits: []func(map[string]any){set(proxyOf, "LocalServiceSocketPath", "/run/web.sock"), set(proxyOf, "LocalServicePort", 0)},
			want:  Public{BindAddress: "10.0.0.7", BindPort: 21000, LocalServiceAddress: "unix:/run/web.sock"},
		},
		{
			name:  "timeouts as floats",
			edits: []func(map[string]any){proxyConfig(`{"handshake_timeout_ms": 2500.0, "local_connect_timeout_ms": 750.0}`)},
			want:  Public{BindAddress: "10.0.0.7", BindPort: 21000, LocalServiceAddress: "127.0.0.1:8080", HandshakeTimeout: 2500 * time.Millisecond, LocalConnectTimeout: 750 * time.Millisecond},
		},
		{
			name:  "timeouts as integers",
			edits: []func(map[string]any){proxyConfig(`{"handshake_timeout_ms": 2500, "local_connect_timeout_ms": 750}`)},
			want:  Public{BindAddress: "10.0.0.7", BindPort: 21000, LocalServiceAddress: "127.0.0.1:8080", HandshakeTimeout: 2500 * time.Millisecond, LocalConnectTimeout: 750 * time.Millisecond},
		},
		{
			name:  "timeouts as strings",
			edits: []func(map[string]any){proxyConfig(`{"handshake_timeout_ms": "2500", "local_connect_timeout_ms": " 750 "}`)},
			want:  Public{BindAddress: "10.0.0.7", BindPort: 21000, LocalServiceAddress: "127.0.0.1:8080", HandshakeTimeout: 2500 * time.Millisecond, LocalConnectTimeout: 750 * time.Millisecond},
		},
		{
			name:  "max_inbound_connections, as service-defaults MaxInboundConnections merges it",
			edits: []func(map[string]any){proxyConfig(`{"max_inbound_connections": 50}`)},
			want:  Public{BindAddress: "10.0.0.7", BindPort: 21000, LocalServiceAddress: "127.0.0.1:8080", MaxInboundConnections: 50},
		},
		{
			name:  "transparent mode knows the application's port",
			edits: []func(map[string]any){set(proxyOf, "Mode", "transparent")},
			want:  Public{BindAddress: "10.0.0.7", BindPort: 21000, LocalServiceAddress: "127.0.0.1:8080", Transparent: true, ApplicationPort: 8080},
		},
		{
			name:  "transparent mode, application port from local_service_address",
			edits: []func(map[string]any){set(proxyOf, "Mode", "transparent"), proxyConfig(`{"local_service_address": "127.0.0.2:9090"}`)},
			want:  Public{BindAddress: "10.0.0.7", BindPort: 21000, LocalServiceAddress: "127.0.0.2:9090", Transparent: true, ApplicationPort: 9090},
		},
		{
			name:  "timeouts null",
			edits: []func(map[string]any){proxyConfig(`{"handshake_timeout_ms": null, "bind_address": null}`)},
			want:  Public{BindAddress: "10.0.0.7", BindPort: 21000, LocalServiceAddress: "127.0.0.1:8080"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			c, err := FromAgentService(decodeRegistration(t, tc.edits...))
			if err != nil {
				t.Fatalf("FromAgentService: %v", err)
			}
			if c.Public == nil {
				t.Fatal("no public listener")
			}
			if *c.Public != tc.want {
				t.Fatalf("Public\n got %+v\nwant %+v", *c.Public, tc.want)
			}
		})
	}
}

func TestFromAgentServiceTimeoutAccessors(t *testing.T) {
	t.Parallel()
	c, err := FromAgentService(decodeRegistration(t, proxyConfig(`{"handshake_timeout_ms": 2500, "local_connect_timeout_ms": 250}`)))
	if err != nil {
		t.Fatal(err)
	}
	if got := c.Public.HandshakeTimeoutOrDefault(); got != 2500*time.Millisecond {
		t.Errorf("HandshakeTimeoutOrDefault = %v", got)
	}
	if got := c.Public.LocalConnectTimeoutOrDefault(); got != 250*time.Millisecond {
		t.Errorf("LocalConnectTimeoutOrDefault = %v", got)
	}
}

func TestFromAgentServiceNoPublic(t *testing.T) {
	t.Parallel()
	// Port 0: no public listener, and then no local service port is needed.
	c, err := FromAgentService(decodeRegistration(t, set(top, "Port", 0), set(proxyOf, "LocalServicePort", 0)))
	if err != nil {
		t.Fatalf("FromAgentService: %v", err)
	}
	if c.Public != nil {
		t.Fatalf("public listener %+v with port 0", c.Public)
	}
	if len(c.Upstreams) != 2 {
		t.Fatalf("upstreams %+v", c.Upstreams)
	}
}

func TestFromAgentServiceUpstreams(t *testing.T) {
	t.Parallel()
	t.Run("connect_timeout_ms float", func(t *testing.T) {
		t.Parallel()
		c, err := FromAgentService(decodeRegistration(t, set(func(m map[string]any) map[string]any { return upstreamOf(m, 0) }, "Config", json.RawMessage(`{"connect_timeout_ms": 1500.0}`))))
		if err != nil {
			t.Fatal(err)
		}
		if got := c.Upstreams[0].ConnectTimeout; got != 1500*time.Millisecond {
			t.Fatalf("ConnectTimeout = %v, want 1.5s", got)
		}
		if got := c.Upstreams[0].ConnectTimeoutOrDefault(); got != 1500*time.Millisecond {
			t.Fatalf("ConnectTimeoutOrDefault = %v, want 1.5s", got)
		}
		if got := c.Upstreams[1].ConnectTimeout; got != 0 {
			t.Fatalf("other upstream ConnectTimeout = %v", got)
		}
	})
	t.Run("connect_timeout_ms string", func(t *testing.T) {
		t.Parallel()
		c, err := FromAgentService(decodeRegistration(t, set(func(m map[string]any) map[string]any { return upstreamOf(m, 1) }, "Config", json.RawMessage(`{"connect_timeout_ms": "3000"}`))))
		if err != nil {
			t.Fatal(err)
		}
		if got := c.Upstreams[1].ConnectTimeout; got != 3*time.Second {
			t.Fatalf("ConnectTimeout = %v, want 3s", got)
		}
	})
	t.Run("socket with mode", func(t *testing.T) {
		t.Parallel()
		c, err := FromAgentService(decodeRegistration(t, func(m map[string]any) {
			u := upstreamOf(m, 0)
			delete(u, "LocalBindPort")
			delete(u, "LocalBindAddress")
			u["LocalBindSocketPath"] = "/run/strait/db.sock"
			u["LocalBindSocketMode"] = "0660"
		}))
		if err != nil {
			t.Fatal(err)
		}
		u := c.Upstreams[0]
		if u.LocalBindSocketPath != "/run/strait/db.sock" || u.LocalBindSocketMode != os.FileMode(0o660) {
			t.Fatalf("socket upstream %+v", u)
		}
		if u.Network() != "unix" || u.Addr() != "/run/strait/db.sock" {
			t.Fatalf("listens on %s %s", u.Network(), u.Addr())
		}
	})
	t.Run("namespace and partition", func(t *testing.T) {
		t.Parallel()
		c, err := FromAgentService(decodeRegistration(t, func(m map[string]any) {
			m["Namespace"] = "team"
			m["Partition"] = "part1"
			u := upstreamOf(m, 0)
			u["DestinationNamespace"] = "data"
			u["DestinationPartition"] = "part2"
		}))
		if err != nil {
			t.Fatal(err)
		}
		if c.Namespace != "team" || c.Partition != "part1" {
			t.Fatalf("config namespace/partition %q/%q", c.Namespace, c.Partition)
		}
		if u := c.Upstreams[0]; u.DestinationNamespace != "data" || u.DestinationPartition != "part2" {
			t.Fatalf("upstream namespace/partition %q/%q", u.DestinationNamespace, u.DestinationPartition)
		}
	})
	t.Run("default type", func(t *testing.T) {
		t.Parallel()
		c, err := FromAgentService(decodeRegistration(t, func(m map[string]any) { delete(upstreamOf(m, 0), "DestinationType") }))
		if err != nil {
			t.Fatal(err)
		}
		if got := c.Upstreams[0].Type(); got != TypeService {
			t.Fatalf("Type() = %q", got)
		}
	})
}

func TestFromAgentServiceErrors(t *testing.T) {
	t.Parallel()
	up0 := func(m map[string]any) map[string]any { return upstreamOf(m, 0) }
	tests := []struct {
		name    string
		edits   []func(map[string]any)
		wantErr string
	}{
		{"not a proxy", []func(map[string]any){func(m map[string]any) { delete(m, "Kind") }}, "not a connect-proxy"},
		{"mesh gateway", []func(map[string]any){set(top, "Kind", "mesh-gateway")}, "not a connect-proxy"},
		{"no proxy block", []func(map[string]any){func(m map[string]any) { delete(m, "Proxy") }}, "not a connect-proxy"},
		{"no destination", []func(map[string]any){set(proxyOf, "DestinationServiceName", "")}, "destination"},
		{"negative handshake timeout", []func(map[string]any){proxyConfig(`{"handshake_timeout_ms": -1}`)}, "handshake_timeout_ms"},
		{"fractional handshake timeout", []func(map[string]any){proxyConfig(`{"handshake_timeout_ms": 2500.5}`)}, "handshake_timeout_ms"},
		{"non-numeric handshake timeout", []func(map[string]any){proxyConfig(`{"handshake_timeout_ms": "2.5s"}`)}, "handshake_timeout_ms"},
		{"boolean handshake timeout", []func(map[string]any){proxyConfig(`{"handshake_timeout_ms": true}`)}, "handshake_timeout_ms"},
		{"negative string local connect timeout", []func(map[string]any){proxyConfig(`{"local_connect_timeout_ms": "-5"}`)}, "local_connect_timeout_ms"},
		{"fractional local connect timeout", []func(map[string]any){proxyConfig(`{"local_connect_timeout_ms": 0.5}`)}, "local_connect_timeout_ms"},
		{"huge timeout", []func(map[string]any){proxyConfig(`{"local_connect_timeout_ms": 1e300}`)}, "local_connect_timeout_ms"},
		{"NaN string", []func(map[string]any){proxyConfig(`{"local_connect_timeout_ms": "NaN"}`)}, "local_connect_timeout_ms"},
		{"negative max_inbound_connections", []func(map[string]any){proxyConfig(`{"max_inbound_connections": -1}`)}, "max_inbound_connections"},
		{"bind_port out of range", []func(map[string]any){proxyConfig(`{"bind_port": 70000}`)}, "bind port"},
		{"bind_port negative", []func(map[string]any){proxyConfig(`{"bind_port": -1}`)}, "bind_port"},
		{"bind_address not a string", []func(map[string]any){proxyConfig(`{"bind_address": 10}`)}, "bind_address"},
		{"local_service_address not a string", []func(map[string]any){proxyConfig(`{"local_service_address": ["a"]}`)}, "local_service_address"},
		{"no local service port", []func(map[string]any){set(proxyOf, "LocalServicePort", 0)}, "local service port"},
		{"negative connect_timeout_ms", []func(map[string]any){set(up0, "Config", json.RawMessage(`{"connect_timeout_ms": -100}`))}, "connect_timeout_ms"},
		{"fractional connect_timeout_ms", []func(map[string]any){set(up0, "Config", json.RawMessage(`{"connect_timeout_ms": 100.25}`))}, "connect_timeout_ms"},
		{"bad socket mode", []func(map[string]any){set(up0, "LocalBindSocketPath", "/run/db.sock"), set(up0, "LocalBindSocketMode", "rw-rw----")}, "local_bind_socket_mode"},
		{"non-octal socket mode", []func(map[string]any){set(up0, "LocalBindSocketPath", "/run/db.sock"), set(up0, "LocalBindSocketMode", "0999")}, "local_bind_socket_mode"},
		{"upstream without port", []func(map[string]any){func(m map[string]any) { delete(up0(m), "LocalBindPort") }}, "port"},
		{"upstream without name", []func(map[string]any){set(up0, "DestinationName", "")}, "destination name"},
		{"upstream unknown type", []func(map[string]any){set(up0, "DestinationType", "peer")}, "destination type"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			c, err := FromAgentService(decodeRegistration(t, tc.edits...))
			if err == nil {
				t.Fatalf("FromAgentService accepted it: %+v", c)
			}
			if c != nil {
				t.Errorf("config returned along with error %v", err)
			}
			if !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("error %q does not mention %q", err, tc.wantErr)
			}
		})
	}
	if _, err := FromAgentService(nil); err == nil {
		t.Error("FromAgentService(nil) succeeded")
	}
}

// Values put into Proxy.Config by Go code rather than JSON.
func TestFromAgentServiceGoTypes(t *testing.T) {
	t.Parallel()
	for name, v := range map[string]any{
		"int":         2500,
		"int64":       int64(2500),
		"json.Number": json.Number("2500"),
	} {
		svc := decodeRegistration(t)
		svc.Proxy.Config = map[string]any{"handshake_timeout_ms": v}
		c, err := FromAgentService(svc)
		if err != nil {
			t.Errorf("%s: %v", name, err)
			continue
		}
		if c.Public.HandshakeTimeout != 2500*time.Millisecond {
			t.Errorf("%s: HandshakeTimeout = %v", name, c.Public.HandshakeTimeout)
		}
	}
	svc := decodeRegistration(t)
	svc.Proxy.Config = map[string]any{"handshake_timeout_ms": json.Number("x")}
	if _, err := FromAgentService(svc); err == nil {
		t.Error("bad json.Number accepted")
	}
}

// ---- fake agent ----

func newAPIClient(t testing.TB, srv *httptest.Server) *api.Client {
	t.Helper()
	c, err := api.NewClient(&api.Config{Address: strings.TrimPrefix(srv.URL, "http://"), Scheme: "http"})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestSidecarFor(t *testing.T) {
	t.Parallel()
	proxy := func(id, dest string) *api.AgentService {
		return &api.AgentService{
			Kind: api.ServiceKindConnectProxy, ID: id, Service: id, Port: 21000,
			Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceName: "web", DestinationServiceID: dest},
		}
	}
	plain := func(id string) *api.AgentService { return &api.AgentService{ID: id, Service: id, Port: 8080} }
	tests := []struct {
		name     string
		services []*api.AgentService
		query    string
		want     string
		wantErrs []string
	}{
		{
			name:     "one match",
			services: []*api.AgentService{plain("web"), proxy("web-sidecar-proxy", "web"), proxy("api-sidecar-proxy", "api")},
			query:    "web",
			want:     "web-sidecar-proxy",
		},
		{
			name:     "case-insensitive",
			services: []*api.AgentService{plain("Web-1"), proxy("web-1-sidecar-proxy", "Web-1")},
			query:    "WEB-1",
			want:     "web-1-sidecar-proxy",
		},
		{
			name:     "none",
			services: []*api.AgentService{plain("web"), proxy("api-sidecar-proxy", "api")},
			query:    "web",
			wantErrs: []string{`"web"`, "no sidecar"},
		},
		{
			name: "a non-proxy with a Proxy block does not count",
			services: []*api.AgentService{{
				ID: "fake", Service: "fake",
				Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceID: "web"},
			}},
			query:    "web",
			wantErrs: []string{"no sidecar"},
		},
		{
			name:     "two",
			services: []*api.AgentService{proxy("web-sidecar-proxy", "web"), proxy("web-proxy-2", "WEB"), plain("web")},
			query:    "web",
			wantErrs: []string{"web-sidecar-proxy", "web-proxy-2", "several"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			body := map[string]*api.AgentService{}
			for _, s := range tc.services {
				body[s.ID] = s
			}
			var mu sync.Mutex
			var paths []string
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				mu.Lock()
				paths = append(paths, r.Method+" "+r.URL.Path)
				mu.Unlock()
				if r.URL.Path != "/v1/agent/services" {
					http.NotFound(w, r)
					return
				}
				_ = json.NewEncoder(w).Encode(body)
			}))
			defer srv.Close()
			got, err := SidecarFor(newAPIClient(t, srv), tc.query)
			mu.Lock()
			if len(paths) != 1 || paths[0] != "GET /v1/agent/services" {
				t.Errorf("requests %v, want one GET /v1/agent/services", paths)
			}
			mu.Unlock()
			if tc.wantErrs == nil {
				if err != nil || got != tc.want {
					t.Fatalf("SidecarFor(%q) = %q, %v; want %q", tc.query, got, err, tc.want)
				}
				return
			}
			if err == nil {
				t.Fatalf("SidecarFor(%q) = %q, want an error", tc.query, got)
			}
			for _, s := range tc.wantErrs {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error %q does not mention %q", err, s)
				}
			}
		})
	}
}

func TestSidecarForAgentError(t *testing.T) {
	t.Parallel()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "Permission denied", http.StatusForbidden)
	}))
	defer srv.Close()
	if id, err := SidecarFor(newAPIClient(t, srv), "web"); err == nil {
		t.Fatalf("SidecarFor with a 403 agent = %q, want an error", id)
	}
}

// fakeServiceAgent serves /v1/agent/service/<id> with hash blocking: a
// request whose ?hash= equals the current content hash is held until the
// registration changes or hold elapses.
type fakeServiceAgent struct {
	id   string
	hold time.Duration

	mu       sync.Mutex
	body     []byte
	hash     string
	changed  chan struct{}
	hashesIn []string       // ?hash= of every request, in order
	served   map[string]int // responses by content hash
	badPaths []string
}

func newFakeServiceAgent(id string) *fakeServiceAgent {
	return &fakeServiceAgent{id: id, hold: 50 * time.Millisecond, changed: make(chan struct{}), served: map[string]int{}}
}

func (f *fakeServiceAgent) set(body []byte, hash string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.body, f.hash = body, hash
	close(f.changed)
	f.changed = make(chan struct{})
}

func (f *fakeServiceAgent) requests() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.hashesIn...)
}

func (f *fakeServiceAgent) servedCount(hash string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.served[hash]
}

func (f *fakeServiceAgent) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet || r.URL.Path != "/v1/agent/service/"+f.id {
		f.mu.Lock()
		f.badPaths = append(f.badPaths, r.Method+" "+r.URL.Path)
		f.mu.Unlock()
		http.NotFound(w, r)
		return
	}
	want := r.URL.Query().Get("hash")
	f.mu.Lock()
	f.hashesIn = append(f.hashesIn, want)
	f.mu.Unlock()
	timer := time.NewTimer(f.hold)
	defer timer.Stop()
	for {
		f.mu.Lock()
		body, hash, changed := f.body, f.hash, f.changed
		f.mu.Unlock()
		if want == "" || want != hash {
			f.mu.Lock()
			f.served[hash]++
			f.mu.Unlock()
			w.Header().Set("X-Consul-ContentHash", hash)
			w.Header().Set("Content-Type", "application/json")
			_, _ = w.Write(body)
			return
		}
		select {
		case <-changed:
		case <-timer.C:
			want = "" // answer with the unchanged registration
		case <-r.Context().Done():
			return
		}
	}
}

func receive(t *testing.T, out <-chan *Config) *Config {
	t.Helper()
	select {
	case c := <-out:
		return c
	case <-time.After(15 * time.Second):
		t.Fatal("timed out waiting for a config")
	}
	return nil
}

func TestWatchAgent(t *testing.T) {
	t.Parallel()
	f := newFakeServiceAgent("web-sidecar-proxy")
	f.set(registrationJSON(t), "h1")
	srv := httptest.NewServer(f)
	defer srv.Close()
	logs := &testutil.Buffer{}
	log := hclog.New(&hclog.LoggerOptions{Output: logs, Level: hclog.Debug})

	ctx, cancel := context.WithCancel(context.Background())
	out := make(chan *Config, 8)
	done := make(chan struct{})
	go func() {
		defer close(done)
		WatchAgent(ctx, newAPIClient(t, srv), "web-sidecar-proxy", log, out)
	}()
	defer func() {
		cancel()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Error("WatchAgent did not return after cancel")
		}
	}()

	c := receive(t, out)
	if c.ProxyID != "web-sidecar-proxy" || c.Public == nil || c.Public.BindPort != 21000 {
		t.Fatalf("first config %+v", c)
	}

	// Unchanged hash: the watch blocks again and delivers nothing.
	testutil.Eventually(t, "two more blocking requests", func() bool { return len(f.requests()) >= 3 })
	reqs := f.requests()
	if reqs[0] != "" || reqs[1] != "h1" || reqs[2] != "h1" {
		t.Fatalf("request hashes %q, want \"\", h1, h1", reqs[:3])
	}
	if len(out) != 0 {
		t.Fatalf("unchanged registration delivered again: %+v", <-out)
	}

	// Changed registration: delivered.
	f.set(registrationJSON(t, set(top, "Port", 21005), set(proxyOf, "LocalServicePort", 8081)), "h2")
	c = receive(t, out)
	if c.Public == nil || c.Public.BindPort != 21005 || c.Public.LocalServiceAddress != "127.0.0.1:8081" {
		t.Fatalf("second config public %+v", c.Public)
	}

	// A registration that is not a usable proxy is skipped, and the watch
	// moves on to its hash.
	f.set(registrationJSON(t, set(top, "Kind", "")), "h3")
	testutil.Eventually(t, "a request blocking on h3", func() bool { return slices.Contains(f.requests(), "h3") })
	if len(out) != 0 {
		t.Fatalf("unusable registration delivered: %+v", <-out)
	}
	if !strings.Contains(logs.String(), "ignoring proxy registration") {
		t.Errorf("unusable registration not logged:\n%s", logs.String())
	}

	// A body that does not decode at all: retried, not delivered.
	f.set([]byte(`{"Kind": "connect-proxy", "Port": `), "h4")
	testutil.Eventually(t, "the broken body to be retried", func() bool { return f.servedCount("h4") >= 2 })
	if len(out) != 0 {
		t.Fatalf("undecodable registration delivered: %+v", <-out)
	}

	// Fixed: delivered.
	f.set(registrationJSON(t, set(top, "Port", 21007)), "h5")
	c = receive(t, out)
	if c.Public == nil || c.Public.BindPort != 21007 {
		t.Fatalf("config after recovery: %+v", c.Public)
	}
	f.mu.Lock()
	bad := f.badPaths
	f.mu.Unlock()
	if len(bad) != 0 {
		t.Fatalf("unexpected requests %v", bad)
	}
}

func TestWatchAgentStopsWhileDelivering(t *testing.T) {
	t.Parallel()
	f := newFakeServiceAgent("p")
	f.set(registrationJSON(t, set(top, "ID", "p")), "h1")
	srv := httptest.NewServer(f)
	defer srv.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		WatchAgent(ctx, newAPIClient(t, srv), "p", hclog.NewNullLogger(), make(chan *Config)) // nobody reads
	}()
	testutil.Eventually(t, "the first response", func() bool { return f.servedCount("h1") >= 1 })
	cancel()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("WatchAgent blocked on delivery after cancel")
	}
}

func TestFromAgentServiceLocalPortRange(t *testing.T) {
	t.Parallel()
	for _, port := range []int{-3, 70000} {
		svc := &api.AgentService{
			ID: "web-sidecar-proxy", Kind: api.ServiceKindConnectProxy, Port: 21000,
			Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceName: "web", LocalServicePort: port},
		}
		if _, err := FromAgentService(svc); err == nil || !strings.Contains(err.Error(), "out of range") {
			t.Errorf("local service port %d: err %v, want out of range", port, err)
		}
	}
}
