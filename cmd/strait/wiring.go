package main

import (
	"crypto/tls"

	"github.com/hashicorp/go-hclog"

	"github.com/straitproxy/strait/authz"
	"github.com/straitproxy/strait/config"
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
	log     hclog.Logger
	curves  []tls.CurveID
	tunnels *tunnel.Pool // nil with -tunnels=off
}

// newParts returns the wiring of the proxy's parts; with tunnels, one
// tunnel pool (package defaults) for every upstream.
func newParts(agent *config.Agent, log hclog.Logger, curves []tls.CurveID, tunnels bool) parts {
	w := parts{agent: agent, log: log, curves: curves}
	if tunnels {
		w.tunnels = &tunnel.Pool{}
	}
	return w
}

// build is proxy.Options.Parts: the certificate source, the authorizer and
// the upstream factory for the service of the first Config, which in agent
// mode comes from the registration.
func (w parts) build(c *config.Config) proxy.Parts {
	src := tlsutil.NewSource(w.agent.Client, c.Service, tlsutil.SourceOptions{
		Namespace: c.Namespace, Partition: c.Partition, Logger: w.log.Named("certs"),
		CurvePreferences: w.curves, Tunnels: w.tunnels != nil,
	})
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
	newUpstream := func(u config.Upstream) (*upstream.Upstream, error) {
		var dc string // the agent's datacenter, from our own leaf
		if b := src.Bundle(); b != nil {
			dc = b.Identity.Datacenter
		}
		return upstream.New(u, upstream.Options{
			Client: w.agent.Client, TLS: src, LocalDatacenter: dc, Tunnels: w.tunnels, Peers: peers,
			Logger: w.log.Named("upstream").With("upstream", u.DestinationName),
		})
	}
	// Run only if the registration turns out to be a transparent proxy.
	mode := tproxy.NewMTLSMode(w.agent.Client, c.Service, c.Namespace, c.Partition, w.log)
	return proxy.Parts{Source: src, Authorizer: az, Upstream: newUpstream, MTLSMode: mode, Peering: peers}
}
