package config

import (
	"context"
	"fmt"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"

	"github.com/straitproxy/strait/internal/watch"
)

// Register is `consul connect proxy -register`: it registers a
// connect-proxy for Service at Address:Port with a 30s TTL check, passes
// the check every 10s, re-registers every 30s if the agent lost it, and
// deregisters when ctx is done. IDs follow the built-in: the proxy is
// "<service>-proxy[-<IDSuffix>]", its check "<id>-ttl".
type Register struct {
	Client   *api.Client
	Service  string
	Address  string
	Port     int
	IDSuffix string
	Logger   hclog.Logger
}

// ID is the registered proxy's service ID.
func (r *Register) ID() string {
	id := r.Service + "-proxy"
	if r.IDSuffix != "" {
		id += "-" + r.IDSuffix
	}
	return id
}

func (r *Register) checkID() string { return r.ID() + "-ttl" }

// Run registers and heartbeats until ctx is done, then deregisters.
func (r *Register) Run(ctx context.Context) {
	log := r.Logger
	if log == nil {
		log = hclog.NewNullLogger()
	}
	heartbeat := time.NewTicker(10 * time.Second)
	defer heartbeat.Stop()
	reconcile := time.NewTicker(30 * time.Second)
	defer reconcile.Stop()
	registered := r.register(log)
	for {
		select {
		case <-ctx.Done():
			r.deregister(log)
			return
		case <-heartbeat.C:
			if err := r.Client.Agent().PassTTL(r.checkID(), ""); err != nil {
				log.Warn("heartbeat failed", "check", r.checkID(), "error", err)
				registered = false
			}
		case <-reconcile.C:
		}
		if !registered {
			registered = r.register(log)
		}
	}
}

func (r *Register) register(log hclog.Logger) bool {
	err := r.Client.Agent().ServiceRegister(&api.AgentServiceRegistration{
		Kind:    api.ServiceKindConnectProxy,
		ID:      r.ID(),
		Name:    r.Service + "-proxy",
		Address: r.Address,
		Port:    r.Port,
		Proxy:   &api.AgentServiceConnectProxyConfig{DestinationServiceName: r.Service},
		Check: &api.AgentServiceCheck{
			CheckID: r.checkID(),
			Name:    "proxy heartbeat",
			TTL:     "30s",
			Notes:   "strait heartbeats this check.",
			Status:  api.HealthPassing,
		},
	})
	if err != nil {
		log.Warn("registering proxy failed; will retry", "id", r.ID(), "error", err)
		return false
	}
	log.Info("registered proxy", "id", r.ID(), "addr", fmt.Sprintf("%s:%d", r.Address, r.Port))
	return true
}

func (r *Register) deregister(log hclog.Logger) {
	for i := range 3 {
		err := r.Client.Agent().ServiceDeregister(r.ID())
		if err == nil {
			log.Info("deregistered proxy", "id", r.ID())
			return
		}
		log.Warn("deregistering proxy failed", "id", r.ID(), "attempt", i+1, "error", err)
		watch.Sleep(context.Background(), 500*time.Millisecond)
	}
}
