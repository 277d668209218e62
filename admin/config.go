package admin

import (
	"os"
	"strconv"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/straitproxy/strait/config"
	"github.com/straitproxy/strait/metrics"
	"github.com/straitproxy/strait/proxy"
)

// Redacted replaces secrets in admin output.
const Redacted = "<redacted>"

// Settings are the process's options as /config shows them. The ACL token
// is only ever shown as Redacted.
type Settings struct {
	Mode       string // "agent" or "flags"
	ProxyID    string
	SidecarFor string
	Register   bool
	RegisterID string
	// API holds the agent API flags; Token is never printed.
	API config.API
	// HTTPAddr is the agent address in effect (flag, environment or
	// default).
	HTTPAddr         string
	LogLevel         string
	LogJSON          bool
	AccessLog        string
	AdminBind        string
	AdminPprof       bool
	PprofAddr        string
	ShutdownGrace    time.Duration
	HalfCloseTimeout time.Duration
	TLSKex           string
	KTLS             string
	// MaxInboundConnections (0: the registration's) and MaxHandshakes
	// are the limit flags.
	MaxInboundConnections, MaxHandshakes int
}

type settingsView struct {
	Mode             string    `json:"mode"`
	ProxyID          string    `json:"proxy_id,omitempty"`
	SidecarFor       string    `json:"sidecar_for,omitempty"`
	Register         bool      `json:"register,omitempty"`
	RegisterID       string    `json:"register_id,omitempty"`
	Agent            agentView `json:"agent"`
	LogLevel         string    `json:"log_level"`
	LogJSON          bool      `json:"log_json"`
	AccessLog        string    `json:"access_log"`
	AdminBind        string    `json:"admin_bind"`
	AdminPprof       bool      `json:"admin_pprof"`
	PprofAddr        string    `json:"pprof_addr,omitempty"`
	ShutdownGrace    string    `json:"shutdown_grace"`
	HalfCloseTimeout string    `json:"half_close_timeout"`
	TLSKex           string    `json:"tls_kex"`
	KTLS             string    `json:"ktls"`
	MaxInbound       int       `json:"max_inbound_connections,omitempty"`
	MaxHandshakes    int       `json:"max_handshakes,omitempty"`
}

type agentView struct {
	HTTPAddr      string `json:"http_addr"`
	Token         string `json:"token,omitempty"`
	TokenFile     string `json:"token_file,omitempty"`
	CAFile        string `json:"ca_file,omitempty"`
	CAPath        string `json:"ca_path,omitempty"`
	ClientCert    string `json:"client_cert,omitempty"`
	ClientKey     string `json:"client_key,omitempty"`
	TLSServerName string `json:"tls_server_name,omitempty"`
	Datacenter    string `json:"datacenter,omitempty"`
}

type proxyView struct {
	ProxyID   string         `json:"proxy_id,omitempty"`
	Service   string         `json:"service"`
	Namespace string         `json:"namespace,omitempty"`
	Partition string         `json:"partition,omitempty"`
	Public    *publicView    `json:"public"`
	Upstreams []upstreamView `json:"upstreams"`
}

type publicView struct {
	Listen              string `json:"listen"`
	LocalServiceAddress string `json:"local_service_address"`
	HandshakeTimeout    string `json:"handshake_timeout"`
	LocalConnectTimeout string `json:"local_connect_timeout"`
	// MaxInboundConnections is the registration's (0: none); the
	// settings' flag, if set, wins.
	MaxInboundConnections int `json:"max_inbound_connections"`
}

type upstreamView struct {
	proxy.UpstreamDestination
	Listen     string `json:"listen"`
	Network    string `json:"network"`
	SocketMode string `json:"local_bind_socket_mode,omitempty"`
	// ConnectTimeout is a prepared query's (default applied) and a service
	// upstream's connect_timeout_ms override; without one a service
	// upstream's timeouts are its chain's resolvers' (/upstreams).
	ConnectTimeout string `json:"connect_timeout,omitempty"`
	// Protocol and MeshGatewayMode are the discovery chain overrides.
	Protocol        string `json:"protocol,omitempty"`
	MeshGatewayMode string `json:"mesh_gateway_mode,omitempty"`
}

type configDoc struct {
	Settings  settingsView      `json:"settings"`
	Proxy     *proxyView        `json:"proxy"` // null before the first configuration
	Telemetry metrics.Telemetry `json:"telemetry"`
}

// agentViewOf is the agent API settings as /config shows them. The token
// itself never leaves the process: the view says only that one is set and
// where it comes from.
func agentViewOf(a config.API, httpAddr string) agentView {
	v := agentView{
		HTTPAddr: httpAddr, TokenFile: a.TokenFile, CAFile: a.CAFile, CAPath: a.CAPath,
		ClientCert: a.ClientCert, ClientKey: a.ClientKey, TLSServerName: a.TLSServerName,
		Datacenter: a.Datacenter,
	}
	switch {
	case a.Token != "":
		v.Token = Redacted
	case a.TokenFile == "" && os.Getenv(api.HTTPTokenFileEnvName) == "" && os.Getenv(api.HTTPTokenEnvName) != "":
		v.Token = Redacted + " (" + api.HTTPTokenEnvName + ")"
	}
	if v.TokenFile == "" {
		v.TokenFile = os.Getenv(api.HTTPTokenFileEnvName)
	}
	return v
}

func configView(s Settings, c *config.Config, tel metrics.Telemetry) configDoc {
	doc := configDoc{Telemetry: tel}
	doc.Settings = settingsView{
		Mode: s.Mode, ProxyID: s.ProxyID, SidecarFor: s.SidecarFor, Register: s.Register, RegisterID: s.RegisterID,
		Agent:    agentViewOf(s.API, s.HTTPAddr),
		LogLevel: s.LogLevel, LogJSON: s.LogJSON, AccessLog: s.AccessLog, AdminBind: s.AdminBind,
		AdminPprof: s.AdminPprof, PprofAddr: s.PprofAddr,
		ShutdownGrace: s.ShutdownGrace.String(), HalfCloseTimeout: s.HalfCloseTimeout.String(),
		TLSKex: s.TLSKex, KTLS: s.KTLS, MaxInbound: s.MaxInboundConnections, MaxHandshakes: s.MaxHandshakes,
	}
	if c == nil {
		return doc
	}
	pv := &proxyView{ProxyID: c.ProxyID, Service: c.Service, Namespace: c.Namespace, Partition: c.Partition, Upstreams: []upstreamView{}}
	if c.Public != nil {
		pv.Public = &publicView{
			Listen: c.Public.Addr(), LocalServiceAddress: c.Public.LocalServiceAddress,
			HandshakeTimeout:      c.Public.HandshakeTimeoutOrDefault().String(),
			LocalConnectTimeout:   c.Public.LocalConnectTimeoutOrDefault().String(),
			MaxInboundConnections: c.Public.MaxInboundConnections,
		}
	}
	for _, u := range c.Upstreams {
		uv := upstreamView{
			UpstreamDestination: proxy.DestinationOf(u), Listen: u.Addr(), Network: u.Network(),
			Protocol: u.Protocol, MeshGatewayMode: u.MeshGatewayMode,
		}
		if u.Type() == config.TypePreparedQuery || u.ConnectTimeout > 0 {
			uv.ConnectTimeout = u.ConnectTimeoutOrDefault().String()
		}
		if u.LocalBindSocketMode != 0 {
			uv.SocketMode = "0" + strconv.FormatUint(uint64(u.LocalBindSocketMode.Perm()), 8)
		}
		pv.Upstreams = append(pv.Upstreams, uv)
	}
	doc.Proxy = pv
	return doc
}
