package upstream

import (
	"cmp"
	"context"
	"fmt"
	"net"
	"strconv"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/straitproxy/strait/config"
	"github.com/straitproxy/strait/internal/watch"
)

// Run keeps the endpoints current until ctx is done. Call it once.
//
// A service upstream follows its discovery chain (runChain): a blocking
// watch of the compiled chain, and blocking watches of each target's
// instances and, for targets behind mesh gateways, of the gateways. A
// prepared query upstream is executed at once and then again whenever a
// Dial finds the answer older than QueryTTL. Errors back off (see
// watch.Loop) and leave the last good answers in place.
func (u *Upstream) Run(ctx context.Context) {
	if u.isQuery() {
		u.runQuery(ctx)
		return
	}
	u.runChain(ctx)
}

func (u *Upstream) isQuery() bool { return u.cfg.Type() == config.TypePreparedQuery }

func (u *Upstream) runQuery(ctx context.Context) {
	watch.Loop(ctx, u.log, "query/"+u.cfg.DestinationName, watch.Backoff{}, func(ctx context.Context, _ uint64) (uint64, error) {
		if u.fresh() {
			select {
			case <-ctx.Done():
				return 0, ctx.Err()
			case <-u.kick:
			}
		}
		select {
		case u.fetchSem <- struct{}{}:
		case <-ctx.Done():
			return 0, ctx.Err()
		}
		defer func() { <-u.fetchSem }()
		if u.fresh() {
			// A first Dial fetched while we waited, or the kick was
			// queued during our own last fetch.
			return 1, nil
		}
		_, err := u.fetchQuery(ctx)
		return 1, err
	})
}

// fresh reports whether a prepared query answer is cached and younger than
// the TTL.
func (u *Upstream) fresh() bool {
	s := u.set.Load()
	return s != nil && time.Since(s.fetched) < u.queryTTL
}

// firstQuery is the prepared query fetch of a Dial that found nothing
// cached. It waits for a fetch already in flight rather than starting a
// second one.
func (u *Upstream) firstQuery(ctx context.Context) (*endpointSet, error) {
	select {
	case u.fetchSem <- struct{}{}:
	case <-ctx.Done():
		return nil, fmt.Errorf("upstream %s: waiting for the prepared query: %w", u.name, context.Cause(ctx))
	}
	defer func() { <-u.fetchSem }()
	if s := u.set.Load(); s != nil {
		return s, nil
	}
	return u.fetchQuery(ctx)
}

// fetchQuery executes the prepared query and stores its answer. The caller
// holds fetchSem.
func (u *Upstream) fetchQuery(ctx context.Context) (*endpointSet, error) {
	q := &api.QueryOptions{Datacenter: u.cfg.Datacenter, Connect: true}
	resp, _, err := u.client.PreparedQuery().Execute(u.cfg.DestinationName, q.WithContext(ctx))
	if err != nil {
		return nil, fmt.Errorf("upstream %s: execute prepared query: %w", u.name, err)
	}
	if resp == nil {
		resp = &api.PreparedQueryExecuteResponse{}
	}
	eps := make([]Endpoint, 0, len(resp.Nodes))
	for i := range resp.Nodes {
		// The answer may come from a failover datacenter, which it names.
		if ep, ok := u.endpointOf(&resp.Nodes[i], resp.Namespace, "", resp.Datacenter); ok {
			eps = append(eps, ep)
		}
	}
	return u.store(eps), nil
}

// endpointOf turns a health entry into an Endpoint. Namespace, partition and
// datacenter come from the entry when Consul sets them (Enterprise sets
// namespace and partition, every version sets the node's datacenter), else
// from the fallbacks given, else "default" or the upstream's datacenter.
func (u *Upstream) endpointOf(e *api.ServiceEntry, ns, partition, dc string) (Endpoint, bool) {
	s := e.Service
	if s == nil {
		return Endpoint{}, false
	}
	var service string
	switch {
	case s.Kind == api.ServiceKindConnectProxy && s.Proxy != nil:
		service = s.Proxy.DestinationServiceName
	case s.Connect != nil && s.Connect.Native:
		service = s.Service
	}
	var node, nodeAddr, nodeDC, nodePartition string
	if n := e.Node; n != nil {
		node, nodeAddr, nodeDC, nodePartition = n.Node, n.Address, n.Datacenter, n.Partition
	}
	host := cmp.Or(s.Address, nodeAddr)
	if service == "" || host == "" || s.Port <= 0 {
		u.log.Debug("skipping unusable entry", "service_id", s.ID, "kind", s.Kind, "node", node)
		return Endpoint{}, false
	}
	return Endpoint{
		Addr:       net.JoinHostPort(host, strconv.Itoa(s.Port)),
		Node:       node,
		Service:    service,
		Namespace:  cmp.Or(s.Namespace, ns, "default"),
		Partition:  cmp.Or(s.Partition, nodePartition, partition, "default"),
		Datacenter: cmp.Or(nodeDC, s.Datacenter, dc, u.dc),
	}, true
}
