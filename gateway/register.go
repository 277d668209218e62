package gateway

import (
	"cmp"
	"context"
	"net"
	"strconv"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"

	"github.com/straitproxy/strait/internal/watch"
)

// DeregisterCriticalAfter is the registration check's
// DeregisterCriticalServiceAfter (`consul connect envoy`'s
// -deregister-after-critical default).
const DeregisterCriticalAfter = "6h"

// Register is `consul connect envoy -gateway=mesh -register`: it registers
// the gateway with the local agent as Kind mesh-gateway, with lan and wan
// tagged addresses and a TCP check on the LAN address, re-registers every
// 30s if the agent lost it, and deregisters when ctx is done.
type Register struct {
	Client *api.Client
	// Kind of the registration; empty means mesh-gateway. Terminating and
	// ingress gateways register the same way with their own kind.
	Kind api.ServiceKind
	// ID and Name of the registration (both -service by default).
	ID, Name string
	// LANHost:LANPort is where the gateway listens; an empty or
	// unspecified host (0.0.0.0, ::) advertises the node's address.
	LANHost string
	LANPort int
	// WANHost:WANPort is the address other datacenters dial; empty means
	// none is advertised (Consul then falls back to the node's).
	WANHost string
	WANPort int
	// NoCheck registers without the TCP check: an ingress gateway listens
	// on its config entry's ports, not on LANPort.
	NoCheck bool
	Logger  hclog.Logger
}

// Registration is what Register sends to the agent.
func (r *Register) Registration() *api.AgentServiceRegistration {
	lan := advertised(r.LANHost)
	tagged := map[string]api.ServiceAddress{}
	if lan != "" {
		tagged["lan"] = api.ServiceAddress{Address: lan, Port: r.LANPort}
	}
	if r.WANHost != "" {
		tagged["wan"] = api.ServiceAddress{Address: r.WANHost, Port: r.WANPort}
	}
	reg := &api.AgentServiceRegistration{
		Kind:            r.kind(),
		ID:              r.ID,
		Name:            r.Name,
		Address:         lan,
		Port:            r.LANPort,
		TaggedAddresses: tagged,
		Check: &api.AgentServiceCheck{
			Name: string(r.kind()) + " listening",
			// The gateway shares the agent's network namespace, as
			// Consul's own registration assumes.
			TCP:                            net.JoinHostPort(cmp.Or(lan, "127.0.0.1"), strconv.Itoa(r.LANPort)),
			Interval:                       "10s",
			DeregisterCriticalServiceAfter: DeregisterCriticalAfter,
		},
	}
	if r.NoCheck {
		reg.Check = nil
	}
	return reg
}

func (r *Register) kind() api.ServiceKind { return cmp.Or(r.Kind, api.ServiceKindMeshGateway) }

// Unspecified reports whether host is empty or an unspecified address
// (0.0.0.0, ::): listening on it means every address.
func Unspecified(host string) bool {
	ip := net.ParseIP(host)
	return host == "" || ip != nil && ip.IsUnspecified()
}

// advertised is host unless Unspecified.
func advertised(host string) string {
	if Unspecified(host) {
		return ""
	}
	return host
}

// Run registers, keeps the registration until ctx is done, then
// deregisters.
func (r *Register) Run(ctx context.Context) {
	log := r.Logger
	if log == nil {
		log = hclog.NewNullLogger()
	}
	reg := r.Registration()
	registered := r.register(log, reg)
	t := time.NewTicker(30 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			r.deregister(log)
			return
		case <-t.C:
		}
		if registered {
			if _, _, err := r.Client.Agent().Service(r.ID, nil); err != nil {
				log.Warn("gateway registration not found; registering again", "id", r.ID, "error", err)
				registered = false
			}
		}
		if !registered {
			registered = r.register(log, reg)
		}
	}
}

func (r *Register) register(log hclog.Logger, reg *api.AgentServiceRegistration) bool {
	if err := r.Client.Agent().ServiceRegister(reg); err != nil {
		log.Warn("registering the gateway failed; will retry", "id", r.ID, "error", err)
		return false
	}
	args := []any{"id", r.ID, "name", r.Name, "port", r.LANPort}
	for k, a := range reg.TaggedAddresses {
		args = append(args, k, net.JoinHostPort(a.Address, strconv.Itoa(a.Port)))
	}
	log.Info("registered "+string(r.kind()), args...)
	return true
}

func (r *Register) deregister(log hclog.Logger) {
	for i := range 3 {
		err := r.Client.Agent().ServiceDeregister(r.ID)
		if err == nil {
			log.Info("deregistered "+string(r.kind()), "id", r.ID)
			return
		}
		log.Warn("deregistering the gateway failed", "id", r.ID, "attempt", i+1, "error", err)
		watch.Sleep(context.Background(), 500*time.Millisecond)
	}
}
