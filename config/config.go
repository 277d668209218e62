// Package config defines what a strait proxy runs: its identity, its public
// listener and its upstreams. A Config comes either from command-line flags
// (static) or from the proxy's registration in the local Consul agent, which
// is watched and re-delivered on every change (Watcher).
//
// Every duration and address has a useful zero value; the accessor methods
// apply Consul's documented defaults.
package config

import (
	"fmt"
	"net"
	"os"
	"strconv"
	"time"
)

// Defaults, as documented for Consul's built-in proxy.
const (
	DefaultHandshakeTimeout    = 10 * time.Second
	DefaultLocalConnectTimeout = 1 * time.Second
	DefaultConnectTimeout      = 10 * time.Second
	DefaultBindAddress         = "0.0.0.0"
	DefaultUpstreamBindAddress = "127.0.0.1"
)

// Upstream destination types.
const (
	TypeService       = "service"
	TypePreparedQuery = "prepared_query"
)

// Config is the whole of what one strait process proxies.
type Config struct {
	// ProxyID is the proxy's service ID in the agent (agent mode); empty in
	// flags mode.
	ProxyID string
	// Service is the proxied (destination) service name: the leaf
	// certificate is issued for it and inbound connections are authorized
	// against its intentions.
	Service string
	// Namespace and Partition of Service; empty means "default".
	Namespace string
	Partition string

	// Public is the inbound mTLS listener; nil means no inbound traffic.
	Public *Public
	// Upstreams are the loopback listeners for outbound traffic.
	Upstreams []Upstream
	// Outbound is a transparent proxy's outbound listener, set when the
	// registration's Proxy.Mode is "transparent"; nil means none.
	Outbound *Outbound

	// Telemetry is the registration's Proxy.Config["telemetry"] block as
	// the agent returned it (agent mode; nil when absent). It is decoded
	// by package metrics, not here, and never printed: it is Consul's
	// agent telemetry block and may carry credentials.
	Telemetry any `json:"-"`
}

// Public configures the public (inbound) listener.
type Public struct {
	// BindAddress and BindPort are where peers connect. Empty address
	// means DefaultBindAddress.
	BindAddress string
	BindPort    int
	// LocalServiceAddress is the application's host:port.
	LocalServiceAddress string
	// HandshakeTimeout bounds the TLS handshake and authorization of one
	// inbound connection; zero means DefaultHandshakeTimeout.
	HandshakeTimeout time.Duration
	// LocalConnectTimeout bounds dialing the application; zero means
	// DefaultLocalConnectTimeout.
	LocalConnectTimeout time.Duration
	// MaxInboundConnections bounds concurrent inbound connections (tunnel
	// streams included) plus handshakes in progress; zero means no limit.
	// It is Proxy.Config's max_inbound_connections, which service-defaults
	// MaxInboundConnections sets.
	MaxInboundConnections int
	// Transparent is set when the registration's Proxy.Mode is
	// "transparent": iptables redirect inbound traffic to this listener,
	// and a connection's original destination port tells a plaintext
	// client of the application (ApplicationPort) from a mesh peer.
	Transparent bool
	// ApplicationPort is the application's TCP port, set for a transparent
	// proxy (0 when the application listens on a unix socket).
	// In transparent mode with permissive mTLS, connections originally
	// addressed to it are passed to the application in plaintext.
	ApplicationPort int
}

// Addr is the listen address, host:port.
func (p *Public) Addr() string {
	host := p.BindAddress
	if host == "" {
		host = DefaultBindAddress
	}
	return net.JoinHostPort(host, strconv.Itoa(p.BindPort))
}

// HandshakeTimeoutOrDefault returns HandshakeTimeout or its default.
func (p *Public) HandshakeTimeoutOrDefault() time.Duration {
	return orDefault(p.HandshakeTimeout, DefaultHandshakeTimeout)
}

// LocalConnectTimeoutOrDefault returns LocalConnectTimeout or its default.
func (p *Public) LocalConnectTimeoutOrDefault() time.Duration {
	return orDefault(p.LocalConnectTimeout, DefaultLocalConnectTimeout)
}

// DefaultOutboundPort is the outbound listener's port when the
// registration's TransparentProxy.OutboundListenerPort is zero (Consul's
// iptables.DefaultTProxyOutboundPort).
const DefaultOutboundPort = 15001

// Outbound configures a transparent proxy's outbound listener, to which
// iptables redirect the workload's outbound TCP: connections are routed by
// their original destination IP to the implicit upstreams.
type Outbound struct {
	// Port is TransparentProxy.OutboundListenerPort; zero means
	// DefaultOutboundPort.
	Port int
}

// Addrs are the listen addresses: the port on IPv4 and IPv6 loopback.
func (o *Outbound) Addrs() []string {
	port := o.Port
	if port == 0 {
		port = DefaultOutboundPort
	}
	return []string{net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), net.JoinHostPort("::1", strconv.Itoa(port))}
}

// Upstream configures one outbound listener and its destination.
type Upstream struct {
	// DestinationType is TypeService (the zero value means this) or
	// TypePreparedQuery.
	DestinationType string
	// DestinationName is the service or prepared query name.
	DestinationName      string
	DestinationNamespace string // empty means "default"
	DestinationPartition string // empty means "default"
	// Datacenter is the destination datacenter; empty means the agent's.
	Datacenter string
	// DestinationPeer is the cluster peer the service is imported from
	// (the upstream's destination_peer; flags: <name>@<peer>). Its
	// instances are /v1/health/connect/<name>?peer=<peer>; no discovery
	// chain is followed, as in Consul. Empty means our own cluster.
	DestinationPeer string

	// LocalBindAddress and LocalBindPort form the TCP listener, unless
	// LocalBindSocketPath is set, in which case a unix socket with mode
	// LocalBindSocketMode is used instead. Mode 0 leaves the socket as the
	// umask makes it (0777 &^ umask, 0755 under the usual 022), as Envoy does.
	LocalBindAddress    string
	LocalBindPort       int
	LocalBindSocketPath string
	LocalBindSocketMode os.FileMode

	// ConnectTimeout bounds dialing and handshaking with the destination,
	// retries included; zero means DefaultConnectTimeout. For a service
	// upstream a non-zero value is sent to Consul as the discovery chain's
	// OverrideConnectTimeout, and the compiled chain's resolver timeout
	// (Consul's default 5s when neither is set) bounds each dial.
	ConnectTimeout time.Duration

	// Protocol is the upstream's config "protocol" (agent mode; flags mode
	// has no way to set it), sent to Consul as the discovery chain's
	// OverrideProtocol. Empty leaves the protocol service-defaults and
	// proxy-defaults give the chain.
	Protocol string
	// MeshGatewayMode is the upstream's MeshGateway.Mode: "", "none",
	// "local" or "remote", sent as the chain's OverrideMeshGateway. Empty
	// leaves the mode service-defaults and proxy-defaults give each
	// target. It matters only for targets in another datacenter.
	MeshGatewayMode string

	// Implicit marks an implicit upstream of a transparent proxy: a
	// service the intentions let this one reach, dialed through the
	// outbound listener by its virtual IPs. It has no listener of its
	// own (LocalBind* are unused).
	Implicit bool
}

// Mesh gateway modes (Upstream.MeshGatewayMode, a chain target's mode).
const (
	MeshGatewayDefault = ""
	MeshGatewayNone    = "none"
	MeshGatewayLocal   = "local"
	MeshGatewayRemote  = "remote"
)

// Type returns DestinationType with its default applied.
func (u Upstream) Type() string {
	if u.DestinationType == "" {
		return TypeService
	}
	return u.DestinationType
}

// Network and Addr return the listen address as net.Listen takes it.
func (u Upstream) Network() string {
	if u.LocalBindSocketPath != "" {
		return "unix"
	}
	return "tcp"
}

// Addr is the listen address: a socket path or host:port.
func (u Upstream) Addr() string {
	if u.LocalBindSocketPath != "" {
		return u.LocalBindSocketPath
	}
	host := u.LocalBindAddress
	if host == "" {
		host = DefaultUpstreamBindAddress
	}
	return net.JoinHostPort(host, strconv.Itoa(u.LocalBindPort))
}

// ConnectTimeoutOrDefault returns ConnectTimeout or its default.
func (u Upstream) ConnectTimeoutOrDefault() time.Duration {
	return orDefault(u.ConnectTimeout, DefaultConnectTimeout)
}

// String names the upstream for logs and metrics: "db", "pq (prepared_query)",
// with the datacenter when one is set.
func (u Upstream) String() string {
	s := u.DestinationName
	if u.Type() != TypeService {
		s += " (" + u.Type() + ")"
	}
	if u.Datacenter != "" {
		s += " in " + u.Datacenter
	}
	if u.DestinationPeer != "" {
		s += " in peer " + u.DestinationPeer
	}
	return s
}

// Validate checks an upstream for the mistakes the agent accepts but a
// listener cannot use.
func (u Upstream) Validate() error {
	if u.DestinationName == "" {
		return fmt.Errorf("upstream has no destination name")
	}
	switch u.Type() {
	case TypeService, TypePreparedQuery:
	default:
		return fmt.Errorf("upstream %s: unknown destination type %q", u.DestinationName, u.DestinationType)
	}
	switch u.MeshGatewayMode {
	case MeshGatewayDefault, MeshGatewayNone, MeshGatewayLocal, MeshGatewayRemote:
	default:
		return fmt.Errorf("upstream %s: mesh gateway mode %q: want none, local or remote", u.DestinationName, u.MeshGatewayMode)
	}
	if u.DestinationPeer != "" {
		switch {
		case u.Type() != TypeService:
			return fmt.Errorf("upstream %s: a prepared query cannot have a destination peer", u.DestinationName)
		case u.Datacenter != "":
			return fmt.Errorf("upstream %s: destination peer %q and datacenter %q: set one", u.DestinationName, u.DestinationPeer, u.Datacenter)
		}
	}
	if !u.Implicit && u.LocalBindSocketPath == "" && (u.LocalBindPort < 1 || u.LocalBindPort > 65535) {
		return fmt.Errorf("upstream %s: local bind port %d out of range 1-65535", u.DestinationName, u.LocalBindPort)
	}
	return nil
}

func orDefault(d, def time.Duration) time.Duration {
	if d <= 0 {
		return def
	}
	return d
}
