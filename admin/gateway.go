package admin

import (
	"net"
	"net/http"
	"runtime"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/straitproxy/strait/config"
	"github.com/straitproxy/strait/metrics"
)

// GatewayOptions configure the admin listener of strait -gateway mesh.
// Metrics, Ready, Routes and Stats are required.
type GatewayOptions struct {
	Metrics *metrics.Metrics
	// Ready reports whether the gateway routes, and if not why.
	Ready func() (bool, string)
	// Routes is /routes: the datacenters and services the gateway
	// routes, with their endpoints (gateway.Routes).
	Routes func() any
	// Stats is the gateway's connection counters (gateway.Stats), in
	// /stats.
	Stats func() any
	// Config is /config: the process's options, secrets redacted by the
	// caller.
	Config any
	Pprof  bool
	Logger hclog.Logger
	// Started is the process start, for uptime; zero means now.
	Started time.Time
}

var gatewayEndpoints = []string{"/ready", "/live", "/metrics", "/routes", "/stats", "/config"}

// GatewayHandler returns the gateway's admin endpoints.
func GatewayHandler(opts GatewayOptions) http.Handler {
	if opts.Logger == nil {
		opts.Logger = hclog.NewNullLogger()
	}
	if opts.Started.IsZero() {
		opts.Started = time.Now()
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		eps := gatewayEndpoints
		if opts.Pprof {
			eps = append(eps[:len(eps):len(eps)], "/debug/pprof/")
		}
		writeJSON(w, http.StatusOK, map[string]any{"endpoints": eps})
	})
	mux.HandleFunc("GET /ready", func(w http.ResponseWriter, r *http.Request) {
		ok, reason := opts.Ready()
		status := http.StatusOK
		if !ok {
			status = http.StatusServiceUnavailable
		}
		writeJSON(w, status, map[string]any{"ready": ok, "reason": reason})
	})
	mux.HandleFunc("GET /live", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]any{"live": true})
	})
	mux.HandleFunc("GET /metrics", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", metrics.PrometheusContentType)
		w.Header().Set("Cache-Control", "no-store")
		if err := opts.Metrics.WritePrometheus(w); err != nil {
			opts.Logger.Debug("writing /metrics", "error", err)
		}
	})
	mux.HandleFunc("GET /routes", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, opts.Routes())
	})
	mux.HandleFunc("GET /stats", func(w http.ResponseWriter, r *http.Request) {
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		writeJSON(w, http.StatusOK, map[string]any{
			"started_at":       opts.Started.UTC(),
			"uptime_seconds":   int64(time.Since(opts.Started).Seconds()),
			"goroutines":       runtime.NumGoroutine(),
			"open_fds":         openFDs(),
			"rlimit_nofile":    rlimitNofile(),
			"heap_alloc_bytes": ms.HeapAlloc,
			"sys_bytes":        ms.Sys,
			"gateway":          opts.Stats(),
		})
	})
	mux.HandleFunc("GET /config", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, opts.Config)
	})
	if opts.Pprof {
		mountPprof(mux)
	}
	return mux
}

// ListenGateway binds addr and serves GatewayHandler on it until Close.
func ListenGateway(addr string, opts GatewayOptions) (*Server, error) {
	if opts.Logger == nil {
		opts.Logger = hclog.NewNullLogger()
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	s := serve(ln, GatewayHandler(opts), opts.Logger, "admin")
	opts.Logger.Info("admin listening", "addr", ln.Addr().String(), "pprof", opts.Pprof)
	return s, nil
}

// GatewaySettings are strait -gateway mesh's options as /config shows
// them; the ACL token is only ever shown as Redacted.
type GatewaySettings struct {
	Gateway          string
	Service, ID      string
	Register         bool
	Address          string
	WANAddress       string
	Listen           []string
	API              config.API
	HTTPAddr         string
	LogLevel         string
	LogJSON          bool
	AccessLog        string
	AdminBind        string
	AdminPprof       bool
	PprofAddr        string
	ShutdownGrace    time.Duration
	HalfCloseTimeout time.Duration
	HelloTimeout     time.Duration
	MaxConnections   int
	MaxPending       int
	MaxWatches       int
}

type gatewaySettingsView struct {
	Gateway          string    `json:"gateway"`
	Service          string    `json:"service"`
	ID               string    `json:"id"`
	Register         bool      `json:"register"`
	Address          string    `json:"address"`
	WANAddress       string    `json:"wan_address,omitempty"`
	Listen           []string  `json:"listen"`
	Agent            agentView `json:"agent"`
	LogLevel         string    `json:"log_level"`
	LogJSON          bool      `json:"log_json"`
	AccessLog        string    `json:"access_log"`
	AdminBind        string    `json:"admin_bind"`
	AdminPprof       bool      `json:"admin_pprof"`
	PprofAddr        string    `json:"pprof_addr,omitempty"`
	ShutdownGrace    string    `json:"shutdown_grace"`
	HalfCloseTimeout string    `json:"half_close_timeout"`
	HelloTimeout     string    `json:"hello_timeout"`
	MaxConnections   int       `json:"max_connections"`
	MaxPending       int       `json:"max_pending"`
	MaxWatches       int       `json:"max_watches"`
}

// GatewayConfigView is /config in gateway mode: the settings (token
// redacted) and the telemetry in effect.
func GatewayConfigView(s GatewaySettings, tel metrics.Telemetry) any {
	return struct {
		Settings  gatewaySettingsView `json:"settings"`
		Telemetry metrics.Telemetry   `json:"telemetry"`
	}{
		Settings: gatewaySettingsView{
			Gateway: s.Gateway, Service: s.Service, ID: s.ID, Register: s.Register, Address: s.Address,
			WANAddress: s.WANAddress, Listen: s.Listen, Agent: agentViewOf(s.API, s.HTTPAddr),
			LogLevel: s.LogLevel, LogJSON: s.LogJSON, AccessLog: s.AccessLog, AdminBind: s.AdminBind,
			AdminPprof: s.AdminPprof, PprofAddr: s.PprofAddr, ShutdownGrace: s.ShutdownGrace.String(),
			HalfCloseTimeout: s.HalfCloseTimeout.String(), HelloTimeout: s.HelloTimeout.String(),
			MaxConnections: s.MaxConnections, MaxPending: s.MaxPending, MaxWatches: s.MaxWatches,
		},
		Telemetry: tel,
	}
}
