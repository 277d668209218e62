package config

import (
	"encoding/json"
	"net"
	"strings"
	"testing"

	"github.com/hashicorp/consul/api"
)

// FuzzFromAgentService feeds arbitrary bytes through the path a proxy
// registration takes in agent mode: JSON from /v1/agent/service/<id>
// decoded into api.AgentService (as the API client does), then
// FromAgentService. It must never panic, and whatever it accepts must be
// usable: every upstream passes Validate, the public listener's port is a
// real port, the app address is set, and the identity and timeouts are
// sane.
func FuzzFromAgentService(f *testing.F) {
	f.Add([]byte(registration))
	for _, s := range []string{
		// minimal sidecar
		`{"Kind":"connect-proxy","ID":"p","Port":21000,"Proxy":{"DestinationServiceName":"web","LocalServicePort":8080}}`,
		// every key strait reads, numbers in every accepted form
		`{"Kind":"connect-proxy","ID":"web-sidecar-proxy","Service":"web-sidecar-proxy","Port":21000,"Address":"127.0.0.1",
		  "Proxy":{"DestinationServiceName":"web","DestinationServiceID":"web","LocalServiceAddress":"127.0.0.1","LocalServicePort":8080,
		    "Config":{"bind_address":"0.0.0.0","bind_port":"21001","handshake_timeout_ms":2000,"local_connect_timeout_ms":"500",
		              "local_service_address":"127.0.0.2:9090","telemetry":{"prometheus_retention_time":"60s"}},
		    "Upstreams":[
		      {"DestinationType":"service","DestinationName":"db","LocalBindPort":9191,"Config":{"connect_timeout_ms":1500.0}},
		      {"DestinationType":"prepared_query","DestinationName":"pq","LocalBindAddress":"127.0.0.2","LocalBindPort":9192,"Datacenter":"dc2"},
		      {"DestinationName":"sock","LocalBindSocketPath":"/run/db.sock","LocalBindSocketMode":"0660"}]}}`,
		// unix app socket, IPv6 hosts
		`{"Kind":"connect-proxy","ID":"p","Address":"::1","Port":443,"Proxy":{"DestinationServiceName":"web","LocalServiceSocketPath":"/run/app.sock",
		  "Upstreams":[{"DestinationName":"db","LocalBindAddress":"::1","LocalBindPort":1}]}}`,
		// no public listener
		`{"Kind":"connect-proxy","ID":"p","Proxy":{"DestinationServiceName":"web","Upstreams":[{"DestinationName":"db","LocalBindPort":65535}]}}`,
		// out of range, wrong types, wrong kinds
		`{"Kind":"connect-proxy","ID":"p","Port":70000,"Proxy":{"DestinationServiceName":"web","LocalServicePort":1}}`,
		`{"Kind":"connect-proxy","ID":"p","Port":-1,"Proxy":{"DestinationServiceName":"web","LocalServicePort":1}}`,
		`{"Kind":"connect-proxy","ID":"p","Port":1,"Proxy":{"DestinationServiceName":"web","LocalServicePort":1,"Config":{"bind_port":1e10}}}`,
		`{"Kind":"connect-proxy","ID":"p","Port":1,"Proxy":{"DestinationServiceName":"web","LocalServicePort":1,"Config":{"bind_port":80.5}}}`,
		`{"Kind":"connect-proxy","ID":"p","Port":1,"Proxy":{"DestinationServiceName":"web","LocalServicePort":1,"Config":{"bind_port":true}}}`,
		`{"Kind":"connect-proxy","ID":"p","Port":1,"Proxy":{"DestinationServiceName":"web","LocalServicePort":1,"Config":{"handshake_timeout_ms":-5}}}`,
		`{"Kind":"connect-proxy","ID":"p","Port":1,"Proxy":{"DestinationServiceName":"web","LocalServicePort":1,"Config":{"bind_address":7}}}`,
		`{"Kind":"connect-proxy","ID":"p","Port":1,"Proxy":{"DestinationServiceName":"web"}}`,
		`{"Kind":"connect-proxy","ID":"p","Proxy":{"DestinationServiceName":"web","Upstreams":[{"DestinationName":"db","LocalBindPort":0}]}}`,
		`{"Kind":"connect-proxy","ID":"p","Proxy":{"DestinationServiceName":"web","Upstreams":[{"DestinationType":"bogus","DestinationName":"db","LocalBindPort":1}]}}`,
		`{"Kind":"connect-proxy","ID":"p","Proxy":{"DestinationServiceName":"web","Upstreams":[{"DestinationName":"","LocalBindPort":1}]}}`,
		`{"Kind":"connect-proxy","ID":"p","Proxy":{"DestinationServiceName":"web","Upstreams":[{"DestinationName":"s","LocalBindSocketPath":"/x","LocalBindSocketMode":"999"}]}}`,
		`{"Kind":"connect-proxy","ID":"p","Proxy":{"DestinationServiceName":"web","Upstreams":[{"DestinationName":"db","LocalBindPort":1,"Config":{"connect_timeout_ms":"soon"}}]}}`,
		`{"Kind":"connect-proxy","ID":"p","Proxy":{"DestinationServiceName":""}}`,
		`{"Kind":"connect-proxy","ID":"p"}`,
		`{"Kind":"mesh-gateway","ID":"g","Port":8443,"Proxy":{"DestinationServiceName":"web"}}`,
		`{"Kind":"","ID":"web","Port":8080}`,
		`{"Kind":"connect-proxy","ID":"p","Port":1,"Proxy":{"DestinationServiceName":"web","LocalServicePort":1,"Config":null,"Upstreams":null}}`,
		`null`, `{}`, `[]`, `"x"`, ``,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var svc *api.AgentService
		if err := json.Unmarshal(data, &svc); err != nil {
			return
		}
		c, err := FromAgentService(svc)
		if err != nil {
			if c != nil {
				t.Fatalf("FromAgentService returned a config with error %v", err)
			}
			return
		}
		if c == nil {
			t.Fatal("FromAgentService returned neither a config nor an error")
		}
		if svc.Kind != api.ServiceKindConnectProxy || svc.Proxy == nil {
			t.Fatalf("accepted a %q registration without a proxy block: %s", svc.Kind, data)
		}
		if c.Service == "" || c.Service != svc.Proxy.DestinationServiceName {
			t.Fatalf("service %q, registration's destination %q", c.Service, svc.Proxy.DestinationServiceName)
		}
		if c.ProxyID != svc.ID {
			t.Fatalf("proxy ID %q, registration ID %q", c.ProxyID, svc.ID)
		}
		for i, u := range c.Upstreams {
			if err := u.Validate(); err != nil {
				t.Fatalf("upstream %d %+v accepted but fails Validate: %v", i, u, err)
			}
			if u.ConnectTimeout < 0 {
				t.Fatalf("upstream %d: negative connect timeout %s", i, u.ConnectTimeout)
			}
		}
		if len(c.Upstreams) != len(svc.Proxy.Upstreams) {
			t.Fatalf("%d upstreams registered, %d in the config", len(svc.Proxy.Upstreams), len(c.Upstreams))
		}
		if p := c.Public; p != nil {
			if p.BindPort < 1 || p.BindPort > 65535 {
				t.Fatalf("public listener port %d out of range 1-65535", p.BindPort)
			}
			if _, _, err := ParseListen(p.Addr()); err != nil {
				t.Fatalf("public listener address %q does not parse: %v", p.Addr(), err)
			}
			if p.LocalServiceAddress == "" {
				t.Fatal("public listener without an app address")
			}
			if !strings.HasPrefix(p.LocalServiceAddress, "unix:") {
				if _, _, err := net.SplitHostPort(p.LocalServiceAddress); err != nil {
					t.Fatalf("app address %q is not host:port: %v", p.LocalServiceAddress, err)
				}
			}
			if p.HandshakeTimeout < 0 || p.LocalConnectTimeout < 0 {
				t.Fatalf("negative public timeouts: handshake %s, local connect %s", p.HandshakeTimeout, p.LocalConnectTimeout)
			}
		}
	})
}
