package main

import (
	"context"
	"net/http"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/straitproxy/strait/proxy"
)

// lifecycleEndpoints are consul-dataplane's graceful startup and shutdown
// endpoints, which consul-k8s's injected pod calls from its lifecycle
// hooks: startup answers 200 once the proxy is ready (or at once without a
// startup grace period, or after it has passed), 503 before; shutdown
// answers 200 at once and starts the drain, as SIGTERM does.
type lifecycleEndpoints struct {
	startupPath, shutdownPath string
	startupGrace              time.Duration
	p                         *proxy.Proxy
	log                       hclog.Logger
	started                   time.Time

	once     sync.Once
	shutdown chan struct{} // closed by the first shutdown request
}

func newLifecycleEndpoints(d *dataplaneOptions, p *proxy.Proxy, _ time.Duration, log hclog.Logger) *lifecycleEndpoints {
	return &lifecycleEndpoints{
		startupPath: d.gracefulStartupPath, shutdownPath: d.gracefulShutdownPath,
		startupGrace: time.Duration(d.startupGraceSeconds) * time.Second,
		p:            p, log: log, started: time.Now(), shutdown: make(chan struct{}),
	}
}

// shutdownRequested is closed by the first shutdown request.
func (l *lifecycleEndpoints) shutdownRequested() <-chan struct{} { return l.shutdown }

// handlers returns the endpoints by ServeMux pattern.
func (l *lifecycleEndpoints) handlers() map[string]http.Handler {
	return map[string]http.Handler{
		l.startupPath:  http.HandlerFunc(l.startup),
		l.shutdownPath: http.HandlerFunc(l.shutdownHandler),
	}
}

// startup waits (within the startup grace period and the request's life)
// for the proxy to be ready.
func (l *lifecycleEndpoints) startup(w http.ResponseWriter, r *http.Request) {
	if l.startupGrace <= 0 {
		w.WriteHeader(http.StatusOK)
		return
	}
	ctx, cancel := context.WithDeadline(r.Context(), l.started.Add(l.startupGrace))
	defer cancel()
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for {
		if l.p.Readiness().Ready {
			w.WriteHeader(http.StatusOK)
			return
		}
		select {
		case <-ctx.Done():
			if r.Context().Err() == nil { // the grace period is over
				w.WriteHeader(http.StatusOK)
				return
			}
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		case <-t.C:
		}
	}
}

func (l *lifecycleEndpoints) shutdownHandler(w http.ResponseWriter, _ *http.Request) {
	l.once.Do(func() {
		l.log.Info("graceful shutdown requested")
		close(l.shutdown)
	})
	w.WriteHeader(http.StatusOK)
}
