package gateway

import (
	"cmp"
	"context"
	"fmt"
	"reflect"
	"slices"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"

	"github.com/straitproxy/strait/config"
	"github.com/straitproxy/strait/internal/watch"
)

// IngressWatch follows an ingress gateway's config entry
// (/v1/catalog/gateway-services/<Name>, blocking) and turns its tcp
// listeners into a proxy configuration: one upstream listener per listener
// port, bound on BindAddress, whose connections go through the listed
// service's discovery chain. The proxy that runs it presents the leaf of
// Name, so the intentions of each service see the gateway as the source,
// as with Envoy as the ingress gateway. The proxy diffs configurations, so
// a listener added, removed or pointed at another service touches only
// that listener.
type IngressWatch struct {
	Client *api.Client
	// Name is the gateway's service name (and the config entry's).
	Name string
	// Namespace and Partition of the gateway; empty means default.
	Namespace, Partition string
	// BindAddress is the host the listeners bind ("" means 0.0.0.0).
	BindAddress string
	Logger      hclog.Logger
}

// Run sends a configuration at the first answer and at every change of the
// listeners until ctx is done. A send waits for the receiver or ctx.
func (w *IngressWatch) Run(ctx context.Context, out chan<- *config.Config) {
	log := w.Logger
	if log == nil {
		log = hclog.NewNullLogger()
	}
	var last *config.Config
	watch.Loop(ctx, log, "gateway-services "+w.Name, watch.Backoff{}, func(ctx context.Context, index uint64) (uint64, error) {
		q := &api.QueryOptions{WaitIndex: index, WaitTime: 10 * time.Minute,
			Namespace: ceScope(w.Namespace), Partition: ceScope(w.Partition)}
		gs, meta, err := w.Client.Catalog().GatewayServices(w.Name, q.WithContext(ctx))
		if err != nil {
			return index, fmt.Errorf("reading the listeners of ingress gateway %q: %w", w.Name, err)
		}
		c := w.Config(gs, log)
		if last != nil && reflect.DeepEqual(last.Upstreams, c.Upstreams) {
			return meta.LastIndex, nil
		}
		select {
		case out <- c:
			last = c
		case <-ctx.Done():
			return index, ctx.Err()
		}
		return meta.LastIndex, nil
	})
}

// Config is the proxy configuration of the ingress gateway's services: one
// upstream per tcp listener. Listeners of other protocols (HTTP routing)
// are skipped and logged: strait is an L4 gateway.
func (w *IngressWatch) Config(gs []*api.GatewayService, log hclog.Logger) *config.Config {
	c := &config.Config{Service: w.Name, Namespace: w.Namespace, Partition: w.Partition}
	seen := map[int]string{}
	for _, g := range gs {
		if g.GatewayKind != "" && g.GatewayKind != api.ServiceKindIngressGateway {
			continue
		}
		proto := cmp.Or(g.Protocol, "tcp")
		if proto != "tcp" {
			log.Warn("ingress listener skipped: strait serves tcp listeners only", "port", g.Port, "protocol", proto, "service", g.Service.Name)
			continue
		}
		if other, dup := seen[g.Port]; dup {
			log.Warn("ingress listener has more than one service; a tcp listener carries exactly one", "port", g.Port, "kept", other, "skipped", g.Service.Name)
			continue
		}
		seen[g.Port] = g.Service.Name
		c.Upstreams = append(c.Upstreams, config.Upstream{
			DestinationName:      g.Service.Name,
			DestinationNamespace: ceScope(g.Service.Namespace),
			DestinationPartition: ceScope(g.Service.Partition),
			LocalBindAddress:     cmp.Or(w.BindAddress, "0.0.0.0"),
			LocalBindPort:        g.Port,
		})
	}
	slices.SortFunc(c.Upstreams, func(a, b config.Upstream) int { return a.LocalBindPort - b.LocalBindPort })
	return c
}
