package config

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"net"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"

	"github.com/straitproxy/strait/internal/watch"
)

// FromAgentService turns a connect-proxy registration, as the agent returns
// it from /v1/agent/service/<id> (central config already merged), into a
// Config. Unlike the built-in proxy it honours bind_address, bind_port,
// local_service_address, the timeouts and max_inbound_connections (set by
// service-defaults MaxInboundConnections) from Proxy.Config, and accepts
// numbers as JSON floats, integers or numeric strings. Per upstream it
// carries Config.protocol and MeshGateway.Mode, which the discovery chain
// request overrides with, as Consul's own proxy configuration does.
func FromAgentService(svc *api.AgentService) (*Config, error) {
	if svc == nil {
		return nil, fmt.Errorf("no service registration")
	}
	if svc.Kind != api.ServiceKindConnectProxy || svc.Proxy == nil {
		return nil, fmt.Errorf("service %q is not a connect-proxy (kind %q)", svc.ID, svc.Kind)
	}
	px := svc.Proxy
	if px.DestinationServiceName == "" {
		return nil, fmt.Errorf("proxy %q has no destination service name", svc.ID)
	}
	c := &Config{
		ProxyID:   svc.ID,
		Service:   px.DestinationServiceName,
		Namespace: svc.Namespace,
		Partition: svc.Partition,
	}
	pc := px.Config
	c.Telemetry = pc["telemetry"]

	bindAddr, err := stringKey(pc, "bind_address")
	if err != nil {
		return nil, err
	}
	if bindAddr == "" {
		bindAddr = svc.Address
	}
	bindPort, err := intKey(pc, "bind_port")
	if err != nil {
		return nil, err
	}
	if bindPort == 0 {
		bindPort = svc.Port
	}
	if bindPort != 0 {
		pub := &Public{BindAddress: bindAddr, BindPort: bindPort}
		if pub.BindPort < 0 || pub.BindPort > 65535 {
			return nil, fmt.Errorf("proxy %q: bind port %d out of range", svc.ID, pub.BindPort)
		}
		local, err := stringKey(pc, "local_service_address")
		if err != nil {
			return nil, err
		}
		switch {
		case px.LocalServiceSocketPath != "":
			pub.LocalServiceAddress = "unix:" + px.LocalServiceSocketPath
		case hasPort(local):
			pub.LocalServiceAddress = local // documented form: host:port
		default:
			host := local
			if host == "" {
				host = px.LocalServiceAddress
			}
			if host == "" {
				host = "127.0.0.1"
			}
			port := px.LocalServicePort
			if port < 1 || port > 65535 {
				return nil, fmt.Errorf("proxy %q: local service port %d out of range 1-65535", svc.ID, port)
			}
			pub.LocalServiceAddress = joinHostPort(host, port)
		}
		if pub.HandshakeTimeout, err = msKey(pc, "handshake_timeout_ms"); err != nil {
			return nil, err
		}
		if pub.LocalConnectTimeout, err = msKey(pc, "local_connect_timeout_ms"); err != nil {
			return nil, err
		}
		if pub.MaxInboundConnections, err = intKey(pc, "max_inbound_connections"); err != nil {
			return nil, err
		}
		pub.Transparent = px.Mode == api.ProxyModeTransparent
		if pub.Transparent && px.LocalServiceSocketPath == "" {
			if _, port, err := net.SplitHostPort(pub.LocalServiceAddress); err == nil {
				pub.ApplicationPort, _ = strconv.Atoi(port)
			}
		}
		c.Public = pub
	}
	if px.Mode == api.ProxyModeTransparent {
		c.Outbound = &Outbound{}
		if tp := px.TransparentProxy; tp != nil {
			if tp.OutboundListenerPort < 0 || tp.OutboundListenerPort > 65535 {
				return nil, fmt.Errorf("proxy %q: outbound listener port %d out of range 1-65535", svc.ID, tp.OutboundListenerPort)
			}
			c.Outbound.Port = tp.OutboundListenerPort
		}
	}

	for i, u := range px.Upstreams {
		up := Upstream{
			DestinationType:      string(u.DestinationType),
			DestinationName:      u.DestinationName,
			DestinationNamespace: u.DestinationNamespace,
			DestinationPartition: u.DestinationPartition,
			Datacenter:           u.Datacenter,
			DestinationPeer:      u.DestinationPeer,
			LocalBindAddress:     u.LocalBindAddress,
			LocalBindPort:        u.LocalBindPort,
			LocalBindSocketPath:  u.LocalBindSocketPath,
			MeshGatewayMode:      string(u.MeshGateway.Mode),
		}
		if u.LocalBindSocketMode != "" {
			m, err := strconv.ParseUint(u.LocalBindSocketMode, 8, 32)
			if err != nil {
				return nil, fmt.Errorf("proxy %q upstream %d (%s): local_bind_socket_mode %q is not an octal mode", svc.ID, i, u.DestinationName, u.LocalBindSocketMode)
			}
			up.LocalBindSocketMode = os.FileMode(m)
		}
		if up.ConnectTimeout, err = msKey(u.Config, "connect_timeout_ms"); err != nil {
			return nil, fmt.Errorf("proxy %q upstream %s: %w", svc.ID, u.DestinationName, err)
		}
		if up.Protocol, err = stringKey(u.Config, "protocol"); err != nil {
			return nil, fmt.Errorf("proxy %q upstream %s: %w", svc.ID, u.DestinationName, err)
		}
		up.Protocol = strings.ToLower(strings.TrimSpace(up.Protocol))
		if err := up.Validate(); err != nil {
			return nil, fmt.Errorf("proxy %q: %w", svc.ID, err)
		}
		c.Upstreams = append(c.Upstreams, up)
	}
	return c, nil
}

func hasPort(hostport string) bool {
	_, port, err := net.SplitHostPort(hostport)
	return err == nil && port != ""
}

func joinHostPort(host string, port int) string {
	if strings.Contains(host, ":") && !strings.HasPrefix(host, "[") {
		return "[" + host + "]:" + strconv.Itoa(port)
	}
	return host + ":" + strconv.Itoa(port)
}

func stringKey(m map[string]any, k string) (string, error) {
	v, ok := m[k]
	if !ok || v == nil {
		return "", nil
	}
	s, ok := v.(string)
	if !ok {
		return "", fmt.Errorf("config key %s: want a string, got %T", k, v)
	}
	return s, nil
}

// intKey reads an integer that JSON decoding may have made a float64, or
// that a user wrote as a string.
func intKey(m map[string]any, k string) (int, error) {
	v, ok := m[k]
	if !ok || v == nil {
		return 0, nil
	}
	var f float64
	switch x := v.(type) {
	case float64:
		f = x
	case int:
		f = float64(x)
	case int64:
		f = float64(x)
	case json.Number:
		var err error
		if f, err = x.Float64(); err != nil {
			return 0, fmt.Errorf("config key %s: %q is not a number", k, x)
		}
	case string:
		var err error
		if f, err = strconv.ParseFloat(strings.TrimSpace(x), 64); err != nil {
			return 0, fmt.Errorf("config key %s: %q is not a number", k, x)
		}
	default:
		return 0, fmt.Errorf("config key %s: want a number, got %T", k, v)
	}
	if f != math.Trunc(f) || f < 0 || f > math.MaxInt32 {
		return 0, fmt.Errorf("config key %s: %v is not a non-negative integer", k, v)
	}
	return int(f), nil
}

func msKey(m map[string]any, k string) (time.Duration, error) {
	n, err := intKey(m, k)
	return time.Duration(n) * time.Millisecond, err
}

// SidecarFor finds the ID of the one connect-proxy registered on the agent
// for the service instance with ID serviceID (case-insensitive, as Consul
// does). Zero or several matches are errors that list what was found.
func SidecarFor(client *api.Client, serviceID string) (string, error) {
	svcs, err := client.Agent().Services()
	if err != nil {
		return "", fmt.Errorf("listing agent services: %w", err)
	}
	var ids []string
	for id, s := range svcs {
		if s.Kind == api.ServiceKindConnectProxy && s.Proxy != nil && strings.EqualFold(s.Proxy.DestinationServiceID, serviceID) {
			ids = append(ids, id)
		}
	}
	sort.Strings(ids)
	switch len(ids) {
	case 0:
		return "", fmt.Errorf("no sidecar proxy registered for service %q", serviceID)
	case 1:
		return ids[0], nil
	}
	return "", fmt.Errorf("several sidecar proxies registered for service %q (%s); use -proxy-id", serviceID, strings.Join(ids, ", "))
}

// WatchAgent delivers proxyID's configuration on out every time its
// registration changes (hash-blocking queries on /v1/agent/service/<id>).
// A registration that does not decode is logged and skipped; the previous
// one stays in force. It returns when ctx is done.
func WatchAgent(ctx context.Context, client *api.Client, proxyID string, log hclog.Logger, out chan<- *Config) {
	hash := ""
	watch.Loop(ctx, log, "agent-service "+proxyID, watch.Backoff{}, func(ctx context.Context, index uint64) (uint64, error) {
		q := &api.QueryOptions{WaitHash: hash, WaitTime: 10 * time.Minute}
		svc, meta, err := client.Agent().Service(proxyID, q.WithContext(ctx))
		if err != nil {
			return index, fmt.Errorf("reading registration of %q: %w", proxyID, err)
		}
		if meta.LastContentHash == hash {
			return index + 1, nil
		}
		hash = meta.LastContentHash
		c, err := FromAgentService(svc)
		if err != nil {
			log.Error("ignoring proxy registration that cannot be used", "proxy_id", proxyID, "error", err)
			return index + 1, nil
		}
		select {
		case out <- c:
		case <-ctx.Done():
		}
		return index + 1, nil
	})
}
