package main

import (
	"crypto/tls"

	"github.com/hashicorp/go-hclog"

	"github.com/straitproxy/strait/authz"
	"github.com/straitproxy/strait/config"
	"github.com/straitproxy/strait/dataplane"
	"github.com/straitproxy/strait/peering"
	"github.com/straitproxy/strait/proxy"
	"github.com/straitproxy/strait/tlsutil"
	"github.com/straitproxy/strait/tproxy"
	"github.com/straitproxy/strait/tunnel"
	"github.com/straitproxy/strait/upstream"
)

// parts is what the proxy is built from: the agent, the flags' TLS
// choices and the shared tunnel pool.
type parts struct {
	agent   *config.Agent
	dp      *dataplane.Dataplane // nil except in dataplane mode
	log     hclog.Logger
	curves  []tls.CurveID
	tunnels *tunnel.Pool // nil with -tunnels=off
}

// newParts returns the wiring of the proxy's parts; with tunnels, one
// tunnel pool (package defaults) for every upstream.
func newParts(agent *config.Agent, dp *dataplane.Dataplane, log hclog.Logger, curves []tls.CurveID, tunnels bool) parts {
	w := parts{agent: agent, dp: dp, log: log, curves: curves}
	if tunnels {
		w.tunnels = &tunnel.Pool{}
	}
	return w
}

// build is proxy.Options.Parts: the certificate source, the authorizer and
// the upstream factory for the service of the first Config, which in agent
// mode comes from the registration.
func (w parts) build(c *config.Config) proxy.Parts {
	so := tlsutil.SourceOptions{
		Namespace: c.Namespace, Partition: c.Partition, Logger: w.log.Named("certs"),
		CurvePreferences: w.curves, Tunnels: w.tunnels != nil,
	}
	if w.dp != nil { // no agent: roots and leaf from the servers
		so.Roots, so.Leaf = w.dp.CertOptions(c.Service, c.Namespace, c.Partition)
	}
	src := tlsutil.NewSource(w.agent.Client, c.Service, so)
	az := authz.New(w.agent.Client, authz.Options{
		Target: c.Service, Namespace: c.Namespace, Partition: c.Partition, Logger: w.log,
		AgentConfig: w.agent.Config,
	})
	// Cluster peering: peers' roots for upstreams in peers, and, with a
	// public listener, the roots of the peers the service is exported to.
	popts := peering.Options{Client: w.agent.Client, Logger: w.log, Partition: c.Partition}
	if c.Public != nil {
		popts.Service, popts.Inbound = c.Service, src.SetInboundPeers
	}
	peers := peering.New(popts)
	upstreamOptions := func() upstream.Options {
		var dc string // the agent's datacenter, from our own leaf
		if b := src.Bundle(); b != nil {
			dc = b.Identity.Datacenter
		}
		return upstream.Options{
			Client: w.agent.Client, TLS: src, LocalDatacenter: dc, Tunnels: w.tunnels, Peers: peers,
			Logger: w.log.Named("upstream"),
		}
	}
	newUpstream := func(u config.Upstream) (*upstream.Upstream, error) {
		o := upstreamOptions()
		o.Logger = o.Logger.With("upstream", u.DestinationName)
		return upstream.New(u, o)
	}
	// Run only if the registration turns out to be a transparent proxy.
	mode := tproxy.NewMTLSMode(w.agent.Client, c.Service, c.Namespace, c.Partition, w.log)
	out := tproxy.NewOutbound(tproxy.OutboundOptions{
		Client: w.agent.Client, Service: c.Service, Namespace: c.Namespace, Partition: c.Partition,
		Upstream: upstreamOptions, Logger: w.log,
		Self: func() string {
			if b := src.Bundle(); b != nil {
				return b.Identity.String()
			}
			return ""
		},
	})
	return proxy.Parts{Source: src, Authorizer: az, Upstream: newUpstream, MTLSMode: mode, Outbound: out, Peering: peers}
}
