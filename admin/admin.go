// Package admin serves strait's admin HTTP listener (-admin-bind): health
// (/ready, /live), Prometheus metrics (/metrics), and JSON views of the
// process (/stats), certificates (/certs), upstreams (/upstreams),
// intentions (/intentions), a transparent proxy's outbound routes
// (/outbound) and the effective configuration (/config, with
// secrets redacted), plus net/http/pprof under /debug/pprof/ when enabled.
// Every endpoint is GET-only and documented in docs/operations.md.
package admin

import (
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"runtime"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/straitproxy/strait/authz"
	"github.com/straitproxy/strait/config"
	"github.com/straitproxy/strait/metrics"
	"github.com/straitproxy/strait/proxy"
)

// DefaultAddr is -admin-bind's default.
const DefaultAddr = "127.0.0.1:19100"

// Proxy is what the admin endpoints read from the running proxy
// (implemented by *proxy.Proxy), one method per view.
type Proxy interface {
	Readiness() proxy.Readiness
	Listeners() []proxy.ListenerStats
	Tunnels() proxy.TunnelStats
	Certs() (proxy.CertInfo, bool)
	Upstreams() []proxy.UpstreamStatus
	Intentions() (authz.Snapshot, bool)
	Outbound() (proxy.OutboundStatus, bool)
	Config() *config.Config
}

var _ Proxy = (*proxy.Proxy)(nil)

// Options configure the admin server.
type Options struct {
	Proxy   Proxy            // required
	Metrics *metrics.Metrics // required
	// Settings are the process's options, shown by /config (redacted).
	Settings Settings
	// Pprof mounts net/http/pprof under /debug/pprof/.
	Pprof  bool
	Logger hclog.Logger
	// Started is the process start, for uptime; zero means now.
	Started time.Time
	// Extra are further endpoints, by ServeMux pattern (the dataplane
	// mode's lifecycle endpoints).
	Extra map[string]http.Handler
}

// Server is a bound admin (or pprof) listener. Close stops it and waits
// for its goroutine and the requests in progress.
type Server struct {
	ln  net.Listener
	srv *http.Server

	mu     sync.Mutex
	closed bool
	wg     sync.WaitGroup // Serve, and every handler running
}

// serve serves h on ln until Close; what names it in logs.
func serve(ln net.Listener, h http.Handler, log hclog.Logger, what string) *Server {
	s := &Server{ln: ln}
	s.srv = &http.Server{
		Handler:           s.track(h),
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          log.StandardLogger(&hclog.StandardLoggerOptions{InferLevels: true}),
	}
	s.wg.Go(func() {
		if err := s.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error(what+" listener stopped", "error", err)
		}
	})
	return s
}

// track counts h's calls in s.wg; once Close has begun, requests get 503.
func (s *Server) track(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			http.Error(w, "shutting down", http.StatusServiceUnavailable)
			return
		}
		s.wg.Add(1)
		s.mu.Unlock()
		defer s.wg.Done()
		h.ServeHTTP(w, r)
	})
}

// Handler returns the admin endpoints as an http.Handler.
func Handler(opts Options) http.Handler {
	if opts.Logger == nil {
		opts.Logger = hclog.NewNullLogger()
	}
	if opts.Started.IsZero() {
		opts.Started = time.Now()
	}
	h := &handlers{opts: opts}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", h.index)
	mux.HandleFunc("GET /ready", h.ready)
	mux.HandleFunc("GET /live", h.live)
	mux.HandleFunc("GET /metrics", h.metrics)
	mux.HandleFunc("GET /stats", h.stats)
	mux.HandleFunc("GET /certs", h.certs)
	mux.HandleFunc("GET /upstreams", h.upstreams)
	mux.HandleFunc("GET /intentions", h.intentions)
	mux.HandleFunc("GET /outbound", h.outbound)
	mux.HandleFunc("GET /config", h.config)
	if opts.Pprof {
		mountPprof(mux)
	}
	for pattern, eh := range opts.Extra {
		mux.Handle(pattern, eh)
	}
	return mux
}

// ListenHandler binds addr and serves h on it until Close; what names the
// listener in logs.
func ListenHandler(addr string, h http.Handler, log hclog.Logger, what string) (*Server, error) {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	log.Info(what+" listening", "addr", ln.Addr().String())
	return serve(ln, h, log, what), nil
}

// Listen binds addr and serves the admin endpoints on it until Close. It
// binds before returning, so that /ready can answer 503 while the proxy is
// still waiting for certificates.
func Listen(addr string, opts Options) (*Server, error) {
	if opts.Logger == nil {
		opts.Logger = hclog.NewNullLogger()
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	s := serve(ln, Handler(opts), opts.Logger, "admin")
	opts.Logger.Info("admin listening", "addr", ln.Addr().String(), "pprof", opts.Pprof)
	return s, nil
}

// Addr is the bound address.
func (s *Server) Addr() net.Addr { return s.ln.Addr() }

// Close stops the listener, closes open connections, and returns once the
// serving goroutine and the requests in progress are done (a request's
// context is cancelled when its connection closes).
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	err := s.srv.Close()
	s.wg.Wait()
	return err
}

type handlers struct{ opts Options }

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.SetEscapeHTML(false)
	_ = enc.Encode(v)
}

var endpoints = []string{"/ready", "/live", "/metrics", "/stats", "/certs", "/upstreams", "/intentions", "/outbound", "/config"}

func (h *handlers) index(w http.ResponseWriter, r *http.Request) {
	eps := endpoints
	if h.opts.Pprof {
		eps = append(eps[:len(eps):len(eps)], "/debug/pprof/")
	}
	writeJSON(w, http.StatusOK, map[string]any{"endpoints": eps})
}

// ready is 200 once the proxy serves (even if degraded), 503 otherwise;
// the body is proxy.Readiness.
func (h *handlers) ready(w http.ResponseWriter, r *http.Request) {
	rd := h.opts.Proxy.Readiness()
	status := http.StatusOK
	if !rd.Ready {
		status = http.StatusServiceUnavailable
	}
	writeJSON(w, status, rd)
}

// live is 200 while the process can answer HTTP at all.
func (h *handlers) live(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, map[string]any{"live": true})
}

func (h *handlers) metrics(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", metrics.PrometheusContentType)
	w.Header().Set("Cache-Control", "no-store")
	if err := h.opts.Metrics.WritePrometheus(w); err != nil {
		h.opts.Logger.Debug("writing /metrics", "error", err)
	}
}

// Stats is /stats.
type Stats struct {
	StartedAt     time.Time             `json:"started_at"`
	UptimeSeconds int64                 `json:"uptime_seconds"`
	Goroutines    int                   `json:"goroutines"`
	OpenFDs       int                   `json:"open_fds"` // -1 where /proc/self/fd cannot be read
	RlimitNofile  *Rlimit               `json:"rlimit_nofile,omitempty"`
	HeapBytes     uint64                `json:"heap_alloc_bytes"`
	SysBytes      uint64                `json:"sys_bytes"`
	Listeners     []proxy.ListenerStats `json:"listeners"`
	// Totals over every listener.
	ActiveConnections int   `json:"active_connections"`
	RxBytes           int64 `json:"rx_bytes"`
	TxBytes           int64 `json:"tx_bytes"`
	// Tunnels counts strait-mux/2 tunnels and their streams.
	Tunnels proxy.TunnelStats `json:"tunnels"`
}

// Rlimit is RLIMIT_NOFILE.
type Rlimit struct {
	Soft uint64 `json:"soft"`
	Hard uint64 `json:"hard"`
}

func (h *handlers) stats(w http.ResponseWriter, r *http.Request) {
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	s := Stats{
		StartedAt:     h.opts.Started.UTC(),
		UptimeSeconds: int64(time.Since(h.opts.Started).Seconds()),
		Goroutines:    runtime.NumGoroutine(),
		OpenFDs:       openFDs(),
		RlimitNofile:  rlimitNofile(),
		HeapBytes:     ms.HeapAlloc,
		SysBytes:      ms.Sys,
		Listeners:     h.opts.Proxy.Listeners(),
		Tunnels:       h.opts.Proxy.Tunnels(),
	}
	for _, l := range s.Listeners {
		s.ActiveConnections += l.Active
		s.RxBytes += l.RxBytes
		s.TxBytes += l.TxBytes
	}
	writeJSON(w, http.StatusOK, s)
}

// openFDs counts /proc/self/fd, minus the descriptor used to read it.
func openFDs() int {
	f, err := os.Open("/proc/self/fd")
	if err != nil {
		return -1
	}
	defer f.Close()
	names, err := f.Readdirnames(-1)
	if err != nil {
		return -1
	}
	return len(names) - 1
}

func (h *handlers) certs(w http.ResponseWriter, r *http.Request) {
	c, ok := h.opts.Proxy.Certs()
	if !ok {
		writeJSON(w, http.StatusServiceUnavailable, map[string]any{"error": "certificates not loaded yet"})
		return
	}
	writeJSON(w, http.StatusOK, c)
}

func (h *handlers) upstreams(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, map[string]any{"upstreams": h.opts.Proxy.Upstreams()})
}

func (h *handlers) intentions(w http.ResponseWriter, r *http.Request) {
	s, ok := h.opts.Proxy.Intentions()
	if !ok {
		writeJSON(w, http.StatusServiceUnavailable, map[string]any{"error": "intentions not loaded yet"})
		return
	}
	writeJSON(w, http.StatusOK, s)
}

// outbound is a transparent proxy's outbound side: its listeners, the
// implicit upstreams and the routing table; 404 on a proxy without one.
func (h *handlers) outbound(w http.ResponseWriter, r *http.Request) {
	s, ok := h.opts.Proxy.Outbound()
	if !ok {
		writeJSON(w, http.StatusNotFound, map[string]any{"error": "not a transparent proxy (no outbound listener)"})
		return
	}
	writeJSON(w, http.StatusOK, s)
}

func (h *handlers) config(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, configView(h.opts.Settings, h.opts.Proxy.Config(), h.opts.Metrics.Telemetry()))
}

// mountPprof registers net/http/pprof's handlers under /debug/pprof/ on
// mux. /debug/pprof/cmdline is redacted: strait's command line may carry
// -token.
func mountPprof(mux *http.ServeMux) {
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
}

func cmdline(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	_, _ = w.Write([]byte(strings.Join(redactArgs(os.Args), "\x00")))
}

// redactArgs replaces the value of -token (in every flag form) with
// "<redacted>".
func redactArgs(args []string) []string {
	out := make([]string, len(args))
	copy(out, args)
	for i := 0; i < len(out); i++ {
		a := out[i]
		name := strings.TrimLeft(a, "-")
		if name == a { // not a flag
			continue
		}
		if n, _, ok := strings.Cut(name, "="); ok {
			if n == "token" {
				out[i] = a[:len(a)-len(name)] + "token=" + Redacted
			}
			continue
		}
		if name == "token" && i+1 < len(out) {
			out[i+1] = Redacted
			i++
		}
	}
	return out
}

// ServePprof serves mountPprof's handlers alone on addr (-pprof-addr)
// until Close.
func ServePprof(addr string, log hclog.Logger) (*Server, error) {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	mux := http.NewServeMux()
	mountPprof(mux)
	s := serve(ln, mux, log, "pprof")
	log.Info("pprof listening", "addr", ln.Addr().String())
	return s, nil
}
