package tproxy

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/consul/sdk/iptables"
)

// DefaultOutboundPort is the transparent-proxy outbound listener's port
// when the registration does not set TransparentProxy.OutboundListenerPort.
const DefaultOutboundPort = iptables.DefaultTProxyOutboundPort

// Redirect says which traffic to send through the proxy; the fields are
// `consul connect redirect-traffic`'s flags. Either ProxyID (the ports
// come from the proxy's registration) or ProxyInboundPort is required, and
// ProxyUID always.
type Redirect struct {
	// ProxyUID is the user the proxy runs as: its own traffic is never
	// redirected.
	ProxyUID string
	// ProxyID is the proxy's service ID; NodeName, when set, finds it in
	// the catalog on that node (no client agent) instead of the agent.
	ProxyID  string
	NodeName string
	// ProxyInboundPort and ProxyOutboundPort are used without ProxyID; 0
	// outbound means DefaultOutboundPort.
	ProxyInboundPort  int
	ProxyOutboundPort int
	// Exclusions: inbound destination ports, outbound destination ports
	// and CIDRs, and users whose traffic is left alone.
	ExcludeInboundPorts  []string
	ExcludeOutboundPorts []string
	ExcludeOutboundCIDRs []string
	ExcludeUIDs          []string
	// ConsulDNSIP and ConsulDNSPort, when set, send DNS queries to Consul.
	ConsulDNSIP   string
	ConsulDNSPort int
	// NetNS is the path of the network namespace to apply the rules in
	// (through nsenter); empty means the current one.
	NetNS string
}

// Validate checks what can be checked without the agent.
func (r Redirect) Validate() error {
	if r.ProxyUID == "" {
		return errors.New("-proxy-uid is required")
	}
	if r.ProxyID == "" && r.ProxyInboundPort == 0 {
		return errors.New("either -proxy-id or -proxy-inbound-port is required")
	}
	if r.ProxyID != "" && (r.ProxyInboundPort != 0 || r.ProxyOutboundPort != 0) {
		return errors.New("-proxy-inbound-port and -proxy-outbound-port cannot be given with -proxy-id: the ports come from the proxy's registration")
	}
	if r.NodeName != "" && r.ProxyID == "" {
		return errors.New("-node-name needs -proxy-id")
	}
	for _, p := range []struct {
		name string
		v    int
	}{{"-proxy-inbound-port", r.ProxyInboundPort}, {"-proxy-outbound-port", r.ProxyOutboundPort}, {"-consul-dns-port", r.ConsulDNSPort}} {
		if p.v < 0 || p.v > 65535 {
			return fmt.Errorf("%s %d out of range 0-65535", p.name, p.v)
		}
	}
	for _, s := range append(append([]string{}, r.ExcludeInboundPorts...), r.ExcludeOutboundPorts...) {
		if n, err := strconv.Atoi(s); err != nil || n < 1 || n > 65535 {
			// iptables also takes ranges (a:b); accept those.
			if _, _, ok := portRange(s); !ok {
				return fmt.Errorf("excluded port %q is not a port (1-65535) or a range a:b", s)
			}
		}
	}
	for _, c := range r.ExcludeOutboundCIDRs {
		if _, err := netip.ParsePrefix(c); err != nil {
			if _, err2 := netip.ParseAddr(c); err2 != nil {
				return fmt.Errorf("-exclude-outbound-cidr %q is not an address or CIDR", c)
			}
		}
	}
	if r.ConsulDNSIP != "" && net.ParseIP(r.ConsulDNSIP) == nil {
		return fmt.Errorf("-consul-dns-ip %q is not an IP address", r.ConsulDNSIP)
	}
	return nil
}

func portRange(s string) (lo, hi int, ok bool) {
	var a, b int
	if n, err := fmt.Sscanf(s, "%d:%d", &a, &b); err != nil || n != 2 || a < 1 || b > 65535 || a > b {
		return 0, 0, false
	}
	if strconv.Itoa(a)+":"+strconv.Itoa(b) != s {
		return 0, 0, false
	}
	return a, b, true
}

// proxyConfig is what the rules read from the registration's Proxy.Config:
// the public port strait listens on (bind_port), and the Envoy metrics
// listeners consul-k8s sets, which must stay reachable.
type proxyConfig struct {
	BindPort           int
	PrometheusBindAddr string
	StatsBindAddr      string
}

func readProxyConfig(m map[string]any) (proxyConfig, error) {
	var pc proxyConfig
	if v, ok := m["bind_port"]; ok {
		n, err := toInt(v)
		if err != nil {
			return pc, fmt.Errorf("Proxy.Config bind_port: %w", err)
		}
		pc.BindPort = n
	}
	for key, dst := range map[string]*string{"envoy_prometheus_bind_addr": &pc.PrometheusBindAddr, "envoy_stats_bind_addr": &pc.StatsBindAddr} {
		if v, ok := m[key]; ok {
			s, ok := v.(string)
			if !ok {
				return pc, fmt.Errorf("Proxy.Config %s: %v is not a string", key, v)
			}
			*dst = s
		}
	}
	return pc, nil
}

func toInt(v any) (int, error) {
	switch n := v.(type) {
	case float64:
		if n != float64(int(n)) {
			return 0, fmt.Errorf("%v is not an integer", n)
		}
		return int(n), nil
	case int:
		return n, nil
	case string:
		return strconv.Atoi(n)
	}
	return 0, fmt.Errorf("%v is not a number", v)
}

// Config resolves r into the iptables configuration: with ProxyID, the
// inbound port (bind_port, else the registration's port), the outbound
// listener port, and the ports that must stay unredirected (Envoy metrics
// listeners, exposed paths and checks) come from the proxy's registration.
func (r Redirect) Config(client *api.Client) (iptables.Config, error) {
	cfg := iptables.Config{
		ConsulDNSIP:       r.ConsulDNSIP,
		ConsulDNSPort:     r.ConsulDNSPort,
		ProxyUserID:       r.ProxyUID,
		ProxyInboundPort:  r.ProxyInboundPort,
		ProxyOutboundPort: r.ProxyOutboundPort,
		NetNS:             r.NetNS,
	}
	if cfg.ProxyOutboundPort == 0 {
		cfg.ProxyOutboundPort = DefaultOutboundPort
	}
	if r.ProxyID != "" {
		svc, err := r.proxyService(client)
		if err != nil {
			return iptables.Config{}, err
		}
		if svc.Kind != api.ServiceKindConnectProxy || svc.Proxy == nil {
			return iptables.Config{}, fmt.Errorf("service %q is not a connect proxy (kind %q)", r.ProxyID, svc.Kind)
		}
		pc, err := readProxyConfig(svc.Proxy.Config)
		if err != nil {
			return iptables.Config{}, fmt.Errorf("proxy %q: %w", r.ProxyID, err)
		}
		cfg.ProxyInboundPort = svc.Port
		if pc.BindPort != 0 {
			cfg.ProxyInboundPort = pc.BindPort
		}
		if tp := svc.Proxy.TransparentProxy; tp != nil && tp.OutboundListenerPort != 0 {
			cfg.ProxyOutboundPort = tp.OutboundListenerPort
		}
		for key, addr := range map[string]string{"envoy_prometheus_bind_addr": pc.PrometheusBindAddr, "envoy_stats_bind_addr": pc.StatsBindAddr} {
			if addr == "" {
				continue
			}
			_, port, err := net.SplitHostPort(addr)
			if err != nil {
				return iptables.Config{}, fmt.Errorf("proxy %q: Proxy.Config %s %q: %w", r.ProxyID, key, addr, err)
			}
			cfg.ExcludeInboundPorts = append(cfg.ExcludeInboundPorts, port)
		}
		for _, p := range svc.Proxy.Expose.Paths {
			if p.ListenerPort != 0 {
				cfg.ExcludeInboundPorts = append(cfg.ExcludeInboundPorts, strconv.Itoa(p.ListenerPort))
			}
		}
		if svc.Proxy.Expose.Checks && r.NodeName == "" {
			checks, err := client.Agent().ChecksWithFilter(fmt.Sprintf("ServiceName == %q", svc.Proxy.DestinationServiceName))
			if err != nil {
				return iptables.Config{}, fmt.Errorf("proxy %q: exposed checks: %w", r.ProxyID, err)
			}
			for _, c := range checks {
				if c.ExposedPort != 0 {
					cfg.ExcludeInboundPorts = append(cfg.ExcludeInboundPorts, strconv.Itoa(c.ExposedPort))
				}
			}
		}
	}
	if cfg.ProxyInboundPort < 1 || cfg.ProxyInboundPort > 65535 {
		return iptables.Config{}, fmt.Errorf("proxy inbound port %d out of range 1-65535", cfg.ProxyInboundPort)
	}
	cfg.ExcludeInboundPorts = append(cfg.ExcludeInboundPorts, r.ExcludeInboundPorts...)
	cfg.ExcludeOutboundPorts = append(cfg.ExcludeOutboundPorts, r.ExcludeOutboundPorts...)
	cfg.ExcludeOutboundCIDRs = append(cfg.ExcludeOutboundCIDRs, r.ExcludeOutboundCIDRs...)
	cfg.ExcludeUIDs = append(cfg.ExcludeUIDs, r.ExcludeUIDs...)
	return cfg, nil
}

func (r Redirect) proxyService(client *api.Client) (*api.AgentService, error) {
	if r.NodeName == "" {
		svc, _, err := client.Agent().Service(r.ProxyID, nil)
		if err != nil {
			return nil, fmt.Errorf("proxy %q from the agent: %w", r.ProxyID, err)
		}
		return svc, nil
	}
	list, _, err := client.Catalog().NodeServiceList(r.NodeName, &api.QueryOptions{
		Filter: fmt.Sprintf("ID == %q", r.ProxyID), MergeCentralConfig: true,
	})
	if err != nil {
		return nil, fmt.Errorf("proxy %q on node %q from the catalog: %w", r.ProxyID, r.NodeName, err)
	}
	if list == nil || len(list.Services) != 1 {
		n := 0
		if list != nil {
			n = len(list.Services)
		}
		return nil, fmt.Errorf("proxy %q on node %q: %d services with that ID, want 1", r.ProxyID, r.NodeName, n)
	}
	return list.Services[0], nil
}

// DualStack reports whether the agent binds an IPv6 address, as Consul's
// command decides whether to install ip6tables rules too.
func DualStack(client *api.Client) (bool, error) {
	self, err := client.Agent().Self()
	if err != nil {
		return false, fmt.Errorf("agent configuration: %w", err)
	}
	s, _ := self["Config"]["BindAddr"].(string)
	if s == "" {
		return false, nil
	}
	ip, err := netip.ParseAddr(s)
	if err != nil {
		return false, fmt.Errorf("agent BindAddr %q: %w", s, err)
	}
	return ip.Is6() && !ip.Is4In6(), nil
}

// Apply installs the rules (iptables, and ip6tables when dualStack).
func Apply(cfg iptables.Config, dualStack bool) error {
	if err := iptables.Setup(cfg, dualStack); err != nil {
		return fmt.Errorf("applying redirection rules: %w", err)
	}
	return nil
}

// Rules returns the commands Apply would run, without running them.
func Rules(cfg iptables.Config, dualStack bool) ([]string, error) {
	rec := &recorder{}
	cfg.IptablesProvider = rec
	if err := iptables.SetupWithAdditionalRules(cfg, nil, dualStack); err != nil {
		return nil, err
	}
	out := rec.rules
	if dualStack {
		rec.rules = nil
		if err := iptables.SetupWithAdditionalRulesIPv6(cfg, nil, dualStack); err != nil {
			return nil, err
		}
		out = append(out, rec.rules...)
	}
	return out, nil
}

// recorder is an iptables.Provider that only records.
type recorder struct {
	rules []string
	cur   []string
}

func (r *recorder) AddRule(name string, args ...string) {
	line := name
	for _, a := range args {
		line += " " + a
	}
	r.cur = append(r.cur, line)
}
func (r *recorder) ApplyRules(string) error {
	r.rules = append(r.rules, r.cur...)
	r.cur = nil
	return nil
}
func (r *recorder) Rules() []string { return r.cur }
func (r *recorder) ClearAllRules()  { r.cur = nil }
