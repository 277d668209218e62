package tproxy

import (
	"context"
	"fmt"
	"sync"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"

	"github.com/straitproxy/strait/internal/watch"
)

// Mutual TLS modes (service-defaults and proxy-defaults MutualTLSMode).
const (
	MTLSStrict     = "strict"
	MTLSPermissive = "permissive"
)

// MTLSMode follows a service's mutual TLS mode. Consul keeps it out of
// the proxy's registration (ConnectProxyConfig.MutualTLSMode is not
// serialized), so it is watched in the config entries: service-defaults
// for the service when it sets one, else proxy-defaults "global"; and it
// is permissive only while the mesh entry still has
// AllowEnablingPermissiveMutualTLS (strait fails closed if an operator
// withdraws it). The zero mode is strict. Each kind is one blocking list
// query (a list answers even when no entry exists, where a get would
// answer 404 and could not block).
type MTLSMode struct {
	client    *api.Client
	service   string
	namespace string
	partition string
	log       hclog.Logger

	mu        sync.Mutex
	svcMode   string
	proxyMode string
	meshAllow bool
	changed   chan struct{}
}

// NewMTLSMode returns a watcher of service's mode; Run starts it.
func NewMTLSMode(client *api.Client, service, namespace, partition string, log hclog.Logger) *MTLSMode {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	return &MTLSMode{client: client, service: service, namespace: namespace, partition: partition,
		log: log.Named("mtls-mode"), changed: make(chan struct{})}
}

// Permissive reports whether plaintext may reach the application now.
func (m *MTLSMode) Permissive() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.effective() == MTLSPermissive
}

func (m *MTLSMode) effective() string {
	mode := m.svcMode
	if mode == "" {
		mode = m.proxyMode
	}
	if mode == MTLSPermissive && !m.meshAllow {
		return MTLSStrict
	}
	if mode == "" {
		return MTLSStrict
	}
	return mode
}

// Changed is closed at the next change of the effective mode.
func (m *MTLSMode) Changed() <-chan struct{} {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.changed
}

func (m *MTLSMode) set(f func()) {
	m.mu.Lock()
	before := m.effective()
	f()
	after := m.effective()
	if before != after {
		close(m.changed)
		m.changed = make(chan struct{})
	}
	m.mu.Unlock()
	if before != after {
		m.log.Info("mutual TLS mode changed", "service", m.service, "mode", after)
	}
}

// Run watches the three entries until ctx is done.
func (m *MTLSMode) Run(ctx context.Context) {
	var wg sync.WaitGroup
	wg.Go(func() {
		m.watchKind(ctx, api.ServiceDefaults, func(es []api.ConfigEntry) {
			mode := ""
			for _, e := range es {
				if sd, ok := e.(*api.ServiceConfigEntry); ok && sd.Name == m.service {
					mode = string(sd.MutualTLSMode)
				}
			}
			m.set(func() { m.svcMode = mode })
		})
	})
	wg.Go(func() {
		m.watchKind(ctx, api.ProxyDefaults, func(es []api.ConfigEntry) {
			mode := ""
			for _, e := range es {
				if pd, ok := e.(*api.ProxyConfigEntry); ok && pd.Name == api.ProxyConfigGlobal {
					mode = string(pd.MutualTLSMode)
				}
			}
			m.set(func() { m.proxyMode = mode })
		})
	})
	wg.Go(func() {
		m.watchKind(ctx, api.MeshConfig, func(es []api.ConfigEntry) {
			allow := false
			for _, e := range es {
				if me, ok := e.(*api.MeshConfigEntry); ok {
					allow = me.AllowEnablingPermissiveMutualTLS
				}
			}
			m.set(func() { m.meshAllow = allow })
		})
	})
	wg.Wait()
}

func (m *MTLSMode) watchKind(ctx context.Context, kind string, apply func([]api.ConfigEntry)) {
	watch.Loop(ctx, m.log, "config/"+kind, watch.Backoff{}, func(ctx context.Context, index uint64) (uint64, error) {
		q := &api.QueryOptions{WaitIndex: index, Namespace: m.namespace, Partition: m.partition}
		es, meta, err := m.client.ConfigEntries().List(kind, q.WithContext(ctx))
		if err != nil {
			return 0, fmt.Errorf("mutual TLS mode: list %s: %w", kind, err)
		}
		apply(es)
		return meta.LastIndex, nil
	})
}
