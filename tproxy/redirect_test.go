package tproxy

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"

	"github.com/hashicorp/consul/api"
)

func TestValidate(t *testing.T) {
	t.Parallel()
	ok := Redirect{ProxyUID: "5995", ProxyID: "web-sidecar-proxy"}
	if err := ok.Validate(); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		r    Redirect
		want string
	}{
		{Redirect{ProxyID: "p"}, "-proxy-uid is required"},
		{Redirect{ProxyUID: "1"}, "either -proxy-id or -proxy-inbound-port"},
		{Redirect{ProxyUID: "1", ProxyID: "p", ProxyInboundPort: 20000}, "cannot be given with -proxy-id"},
		{Redirect{ProxyUID: "1", ProxyInboundPort: 70000}, "-proxy-inbound-port 70000 out of range"},
		{Redirect{ProxyUID: "1", ProxyInboundPort: 1, NodeName: "n"}, "-node-name needs -proxy-id"},
		{Redirect{ProxyUID: "1", ProxyInboundPort: 1, ExcludeInboundPorts: []string{"ssh"}}, `excluded port "ssh"`},
		{Redirect{ProxyUID: "1", ProxyInboundPort: 1, ExcludeOutboundPorts: []string{"9:3"}}, `excluded port "9:3"`},
		{Redirect{ProxyUID: "1", ProxyInboundPort: 1, ExcludeOutboundCIDRs: []string{"10.0.0.0/33"}}, `"10.0.0.0/33" is not an address or CIDR`},
		{Redirect{ProxyUID: "1", ProxyInboundPort: 1, ConsulDNSIP: "dns"}, `-consul-dns-ip "dns"`},
	} {
		err := tc.r.Validate()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: %v, want an error containing %q", tc.r, err, tc.want)
		}
	}
	good := Redirect{ProxyUID: "1", ProxyInboundPort: 1, ExcludeInboundPorts: []string{"22", "8000:8100"}, ExcludeOutboundCIDRs: []string{"10.0.0.0/8", "192.0.2.1"}}
	if err := good.Validate(); err != nil {
		t.Errorf("ranges and plain addresses: %v", err)
	}
}

// fakeAgent serves the proxy registration and the exposed checks.
func fakeAgent(t *testing.T, svc *api.AgentService, checks map[string]*api.AgentCheck) *api.Client {
	t.Helper()
	mux := http.NewServeMux()
	mux.HandleFunc("/v1/agent/service/", func(w http.ResponseWriter, r *http.Request) {
		if strings.TrimPrefix(r.URL.Path, "/v1/agent/service/") != svc.ID {
			http.NotFound(w, r)
			return
		}
		json.NewEncoder(w).Encode(svc)
	})
	mux.HandleFunc("/v1/agent/checks", func(w http.ResponseWriter, r *http.Request) {
		if got := r.URL.Query().Get("filter"); got != `ServiceName == "web"` {
			t.Errorf("checks filter %q", got)
		}
		json.NewEncoder(w).Encode(checks)
	})
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	c, err := api.NewClient(&api.Config{Address: srv.Listener.Addr().String()})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestConfigFromRegistration: with -proxy-id the ports come from the
// registration as Consul's command reads them: bind_port over the
// registered port, the outbound listener port, Envoy's metrics listeners,
// exposed paths and exposed checks excluded; flags are added after.
func TestConfigFromRegistration(t *testing.T) {
	t.Parallel()
	svc := &api.AgentService{
		ID: "web-sidecar-proxy", Service: "web-sidecar-proxy", Kind: api.ServiceKindConnectProxy, Port: 21000,
		Proxy: &api.AgentServiceConnectProxyConfig{
			DestinationServiceName: "web",
			Mode:                   api.ProxyModeTransparent,
			TransparentProxy:       &api.TransparentProxyConfig{OutboundListenerPort: 15123},
			Config:                 map[string]any{"bind_port": 21001, "envoy_prometheus_bind_addr": "0.0.0.0:20200"},
			Expose:                 api.ExposeConfig{Checks: true, Paths: []api.ExposePath{{ListenerPort: 21500, Path: "/health", LocalPathPort: 8080}}},
		},
	}
	client := fakeAgent(t, svc, map[string]*api.AgentCheck{"c": {CheckID: "c", ExposedPort: 21600}})
	r := Redirect{ProxyUID: "5995", ProxyID: "web-sidecar-proxy", ExcludeInboundPorts: []string{"22"}, ExcludeUIDs: []string{"0"}}
	cfg, err := r.Config(client)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.ProxyInboundPort != 21001 || cfg.ProxyOutboundPort != 15123 || cfg.ProxyUserID != "5995" {
		t.Errorf("ports %d/%d uid %s, want 21001/15123 5995", cfg.ProxyInboundPort, cfg.ProxyOutboundPort, cfg.ProxyUserID)
	}
	slices.Sort(cfg.ExcludeInboundPorts)
	if want := []string{"20200", "21500", "21600", "22"}; !slices.Equal(cfg.ExcludeInboundPorts, want) {
		t.Errorf("excluded inbound ports %v, want %v", cfg.ExcludeInboundPorts, want)
	}
	if !slices.Equal(cfg.ExcludeUIDs, []string{"0"}) {
		t.Errorf("excluded uids %v", cfg.ExcludeUIDs)
	}

	if _, err := (Redirect{ProxyUID: "1", ProxyID: "nope"}).Config(client); err == nil || !strings.Contains(err.Error(), `proxy "nope"`) {
		t.Errorf("unknown proxy: %v", err)
	}
	svc.Kind = ""
	if _, err := r.Config(client); err == nil || !strings.Contains(err.Error(), "not a connect proxy") {
		t.Errorf("not a proxy: %v", err)
	}
}

func TestRulesWithoutAgent(t *testing.T) {
	t.Parallel()
	cfg, err := Redirect{ProxyUID: "5995", ProxyInboundPort: 20000, ExcludeOutboundCIDRs: []string{"10.0.0.0/8"}}.Config(nil)
	if err != nil {
		t.Fatal(err)
	}
	rules, err := Rules(cfg, false)
	if err != nil {
		t.Fatal(err)
	}
	all := strings.Join(rules, "\n")
	for _, want := range []string{
		"iptables -t nat -A CONSUL_PROXY_REDIRECT -p tcp -j REDIRECT --to-port 15001",
		"iptables -t nat -A CONSUL_PROXY_IN_REDIRECT -p tcp -j REDIRECT --to-port 20000",
		"iptables -t nat -A CONSUL_PROXY_OUTPUT -m owner --uid-owner 5995 -j RETURN",
		"iptables -t nat -I CONSUL_PROXY_OUTPUT -d 10.0.0.0/8 -j RETURN",
	} {
		if !strings.Contains(all, want) {
			t.Errorf("rules lack %q:\n%s", want, all)
		}
	}
	dual, err := Rules(cfg, true)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(dual, func(s string) bool { return strings.HasPrefix(s, "ip6tables ") }) {
		t.Errorf("dual stack without ip6tables rules:\n%s", strings.Join(dual, "\n"))
	}
}
