package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/straitproxy/strait/admin"
	"github.com/straitproxy/strait/config"
	"github.com/straitproxy/strait/metrics"
	"github.com/straitproxy/strait/proxy"
	"github.com/straitproxy/strait/tlsutil"
)

// usageError is invalid input: reported in one line, exit status 2, and
// nothing has been started.
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func usagef(format string, a ...any) error { return usageError{fmt.Sprintf(format, a...)} }

type upstreamFlags []config.Upstream

func (u *upstreamFlags) String() string {
	if u == nil || len(*u) == 0 {
		return "" // no default to show in -h
	}
	return fmt.Sprint(len(*u), " upstreams")
}
func (u *upstreamFlags) Set(s string) error {
	up, err := config.ParseUpstream(s)
	if err != nil {
		return err
	}
	*u = append(*u, up)
	return nil
}

type options struct {
	proxyID, sidecarFor       string
	service, serviceAddr      string
	listen                    string
	upstreams                 upstreamFlags
	register                  bool
	registerID                string
	logLevel                  string
	logJSON                   bool
	pprofAddr                 string
	shutdownGrace             time.Duration
	halfCloseTimeout          time.Duration
	tlsKex                    string
	tunnels                   string
	ktls                      string
	maxInbound, maxHandshakes int
	maxOutbound               int
	api                       config.API
	flagsModeSet, registerSet bool

	adminBind       string
	adminBindSet    bool
	adminPprof      bool
	accessLog       string
	statsdAddr      string
	statsiteAddr    string
	dogstatsdAddr   string
	dogstatsdTags   string
	metricsPrefix   string
	disableHostname bool
	disableHostSet  bool

	// gw holds the flags of -gateway mode (gateway.go).
	gw gatewayOptions
	// dp holds the flags of `strait dataplane` (dataplane.go); nil in
	// the other modes.
	dp *dataplaneOptions
	// set names the flags given on the command line.
	set map[string]bool
}

// newFlagSet defines strait's flags on o. Each flag also needs a place in
// help's groups (help.go); TestHelpListsEveryFlag enforces it.
func newFlagSet(o *options) *flag.FlagSet {
	fs := flag.NewFlagSet("strait", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.StringVar(&o.proxyID, "proxy-id", os.Getenv("CONNECT_PROXY_ID"), "Agent mode: the proxy's service `ID` in the local agent; wins over -sidecar-for.")
	fs.StringVar(&o.sidecarFor, "sidecar-for", os.Getenv("CONNECT_SIDECAR_FOR"), "Agent mode: the `ID` of the service whose sidecar proxy registration to run.")
	fs.StringVar(&o.service, "service", "", "Flags mode: `name` of the service this proxy represents (leaf certificate, intention target).")
	fs.StringVar(&o.serviceAddr, "service-addr", "", "Flags mode: the local application's `host:port`; required with -listen.")
	fs.StringVar(&o.listen, "listen", "", "Flags mode: `host:port` of the public mTLS listener; none means no inbound traffic.")
	fs.Var(&o.upstreams, "upstream", "Flags mode, repeatable: `upstream` as <name>[@<peer>][.service|.query]:[<bind-host>:]<port>, or <name>:unix:/path (<peer>: a cluster peer the service is imported from).")
	fs.BoolVar(&o.register, "register", false, "Flags mode: register the proxy with the agent as <service>-proxy (TTL check, deregistered on exit).")
	fs.StringVar(&o.registerID, "register-id", "", "`Suffix` of the registered proxy's ID (<service>-proxy-<suffix>).")
	fs.StringVar(&o.logLevel, "log-level", "INFO", "Log `level`: trace, debug, info, warn or error.")
	fs.BoolVar(&o.logJSON, "log-json", false, "Log JSON lines.")
	fs.StringVar(&o.pprofAddr, "pprof-addr", "", "Serve net/http/pprof on this `host:port` (see also -admin-pprof).")
	fs.DurationVar(&o.shutdownGrace, "shutdown-grace", 15*time.Second, "On SIGINT/SIGTERM, how long live connections may finish.")
	fs.DurationVar(&o.halfCloseTimeout, "half-close-timeout", proxy.DefaultHalfCloseTimeout, "Idle limit of a connection one side of which has finished sending.")
	fs.StringVar(&o.tunnels, "tunnels", "on", "Multiplex connections to other strait proxies as streams in pooled mTLS tunnels (ALPN strait-mux/2), `on|off`. Other peers always get one TLS connection per connection.")
	fs.StringVar(&o.tlsKex, "tls-kex", "hybrid", "TLS key exchange, `hybrid|x25519`: hybrid puts post-quantum X25519MLKEM768 first (Go's default), x25519 makes handshakes cheaper.")
	fs.StringVar(&o.ktls, "ktls", "auto", "Kernel TLS offload, `auto|off`: auto probes and reports it at start.")
	fs.IntVar(&o.maxInbound, "max-inbound-connections", 0, "`Limit` of concurrent inbound connections (tunnel streams included) plus handshakes in progress; overrides the registration's max_inbound_connections (service-defaults MaxInboundConnections). 0: take the registration's, else no limit.")
	fs.IntVar(&o.maxOutbound, "max-outbound-connections", proxy.DefaultMaxOutboundConnections, "`Limit` of open connections on a transparent proxy's outbound listener; beyond it new ones are reset at once.")
	fs.IntVar(&o.maxHandshakes, "max-handshakes", proxy.DefaultMaxHandshakes, "`Limit` of inbound TLS handshakes in progress on the public listener; beyond it new connections are closed at once.")
	addAPIFlags(fs, &o.api)
	fs.StringVar(&o.adminBind, "admin-bind", admin.DefaultAddr, "Admin HTTP listener (/ready, /live, /metrics, /stats, ...): `host:port` or off.")
	fs.BoolVar(&o.adminPprof, "admin-pprof", false, "Also serve net/http/pprof under /debug/pprof/ on the admin listener.")
	fs.StringVar(&o.accessLog, "access-log", string(proxy.AccessLogDeniedOnly), "Access log lines (logger \"access\"), one per connection at close: `mode` off, on (every connection) or denied-only.")
	fs.StringVar(&o.statsdAddr, "statsd-addr", "", "Send metrics to this statsd `host:port` (telemetry statsd_address).")
	fs.StringVar(&o.statsiteAddr, "statsite-addr", "", "Send metrics to this statsite `host:port` (telemetry statsite_address).")
	fs.StringVar(&o.dogstatsdAddr, "dogstatsd-addr", "", "Send metrics to this DogStatsD `address`: host:port or unix:///path (telemetry dogstatsd_addr).")
	fs.StringVar(&o.dogstatsdTags, "dogstatsd-tags", "", "Comma-separated `tags` added to every DogStatsD metric (telemetry dogstatsd_tags).")
	fs.StringVar(&o.metricsPrefix, "metrics-prefix", "", "`Prefix` of every metric name (telemetry metrics_prefix; none by default, as the built-in proxy).")
	fs.BoolVar(&o.disableHostname, "disable-hostname", false, "Keep the hostname out of statsd gauge names (telemetry disable_hostname).")
	defineGatewayFlags(fs, &o.gw)
	return fs
}

// addAPIFlags defines the agent API flags (Consul's own names) on fs.
func addAPIFlags(fs *flag.FlagSet, a *config.API) {
	fs.StringVar(&a.Addr, "http-addr", "", "Consul agent HTTP API `address` (https:// for TLS); 127.0.0.1:8500 when neither flag nor env is set.")
	fs.StringVar(&a.Token, "token", "", "ACL `token`; needs service:write on the proxied service.")
	fs.StringVar(&a.TokenFile, "token-file", "", "`File` holding the ACL token, re-read on SIGHUP; wins over -token.")
	fs.StringVar(&a.CAFile, "ca-file", "", "CA `file` for the agent's HTTPS.")
	fs.StringVar(&a.CAPath, "ca-path", "", "CA `directory` for the agent's HTTPS.")
	fs.StringVar(&a.ClientCert, "client-cert", "", "Client certificate `file` for the agent's HTTPS.")
	fs.StringVar(&a.ClientKey, "client-key", "", "Client key `file` for the agent's HTTPS.")
	fs.StringVar(&a.TLSServerName, "tls-server-name", "", "Server `name` expected in the agent's HTTPS certificate.")
	fs.StringVar(&a.Datacenter, "datacenter", "", "`Datacenter` for agent queries; the agent's when empty.")
}

func parseFlags(args []string) (*options, error) {
	o := &options{set: map[string]bool{}}
	fs := newFlagSet(o)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil, err
		}
		return nil, usagef("%v (strait -h lists the flags)", err)
	}
	if fs.NArg() > 0 {
		return nil, usagef("unexpected argument %q (strait takes only flags, or the 'version' command)", fs.Arg(0))
	}
	fs.Visit(func(f *flag.Flag) {
		o.set[f.Name] = true
		switch f.Name {
		case "service", "service-addr", "listen", "upstream":
			o.flagsModeSet = true
		case "register", "register-id":
			o.registerSet = true
		case "admin-bind":
			o.adminBindSet = true
		case "disable-hostname":
			o.disableHostSet = true
		}
	})
	return o, o.validate()
}

func (o *options) validate() error {
	if err := o.validateCommon(); err != nil {
		return err
	}
	return o.validateMode()
}

// validateCommon checks the flags every mode shares.
func (o *options) validateCommon() error {
	if _, err := tlsutil.KeyExchange(o.tlsKex); err != nil {
		return usagef("-tls-kex: %v", err)
	}
	if o.tunnels != "on" && o.tunnels != "off" {
		return usagef("-tunnels %q: want on or off", o.tunnels)
	}
	if o.ktls != "auto" && o.ktls != "off" {
		return usagef("-ktls %q: want auto or off", o.ktls)
	}
	if o.maxInbound < 0 {
		return usagef("-max-inbound-connections %d: want 0 (no limit of its own) or more", o.maxInbound)
	}
	if o.maxOutbound < 1 {
		return usagef("-max-outbound-connections %d: want 1 or more", o.maxOutbound)
	}
	if o.maxHandshakes < 1 {
		return usagef("-max-handshakes %d: want 1 or more", o.maxHandshakes)
	}
	if hclog.LevelFromString(o.logLevel) == hclog.NoLevel {
		return usagef("-log-level %q: want trace, debug, info, warn or error", o.logLevel)
	}
	if _, err := proxy.ParseAccessLog(o.accessLog); err != nil {
		return usagef("-access-log %v", err)
	}
	if o.adminBind != "off" {
		if _, _, err := net.SplitHostPort(o.adminBind); err != nil {
			return usagef("-admin-bind %q: want host:port or off", o.adminBind)
		}
	}
	for _, a := range []struct {
		flag, addr string
		unix       bool
	}{{"-statsd-addr", o.statsdAddr, false}, {"-statsite-addr", o.statsiteAddr, false}, {"-dogstatsd-addr", o.dogstatsdAddr, true}} {
		if err := metrics.ValidateAddr(a.flag, a.addr, a.unix); err != nil {
			return usageError{err.Error()}
		}
	}
	if o.shutdownGrace < 0 {
		return usagef("-shutdown-grace must not be negative")
	}
	return nil
}

// validateMode checks the flags of agent, flags and gateway modes.
func (o *options) validateMode() error {
	if o.gw.kind != "" || o.set["gateway"] {
		return o.validateGateway()
	}
	for _, f := range gatewayOnlyFlags {
		if o.set[f] {
			return usagef("-%s applies only with -gateway", f)
		}
	}
	agentMode := o.proxyID != "" || o.sidecarFor != ""
	switch {
	case agentMode && (o.flagsModeSet || o.registerSet):
		return usagef("both modes given: -proxy-id/-sidecar-for (agent mode) cannot be combined with -service, -listen, -service-addr, -upstream or -register (flags mode)")
	case !agentMode && o.service == "":
		return usagef("no mode given: use -proxy-id or -sidecar-for (agent mode) or -service (flags mode)")
	case agentMode:
		return nil
	}
	if o.listen != "" {
		if o.serviceAddr == "" {
			return usagef("-listen requires -service-addr (the local application's host:port)")
		}
		if _, _, err := config.ParseListen(o.listen); err != nil {
			return usagef("-listen: %v", err)
		}
	}
	if o.serviceAddr != "" {
		if _, _, err := net.SplitHostPort(o.serviceAddr); err != nil {
			return usagef("-service-addr %q: want host:port", o.serviceAddr)
		}
	}
	if o.register && o.listen == "" {
		return usagef("-register requires -listen")
	}
	seen := map[string]bool{}
	for _, u := range o.upstreams {
		k := u.Network() + " " + u.Addr()
		if seen[k] {
			return usagef("-upstream: two upstreams bind %s", u.Addr())
		}
		seen[k] = true
	}
	return nil
}

// flagsConfig is the static Config of flags mode.
func (o *options) flagsConfig() *config.Config {
	c := &config.Config{Service: o.service, Upstreams: o.upstreams}
	if o.listen != "" {
		host, port, _ := config.ParseListen(o.listen)
		c.Public = &config.Public{BindAddress: host, BindPort: port, LocalServiceAddress: o.serviceAddr}
	}
	return c
}

// telemetry is the flags' part of the telemetry configuration; the agent
// registration's telemetry block applies under it.
func (o *options) telemetry() metrics.Telemetry {
	t := metrics.Telemetry{
		StatsdAddr: o.statsdAddr, StatsiteAddr: o.statsiteAddr, DogstatsdAddr: o.dogstatsdAddr,
		MetricsPrefix: o.metricsPrefix,
	}
	for _, tag := range strings.Split(o.dogstatsdTags, ",") {
		if tag = strings.TrimSpace(tag); tag != "" {
			t.DogstatsdTags = append(t.DogstatsdTags, tag)
		}
	}
	if o.disableHostSet {
		t.DisableHostname = &o.disableHostname
	}
	return t
}

// settings is what the admin listener's /config shows of the flags.
func (o *options) settings(httpAddr string) admin.Settings {
	mode := "flags"
	switch {
	case o.dp != nil:
		mode = "dataplane"
	case o.proxyID != "" || o.sidecarFor != "":
		mode = "agent"
	}
	return admin.Settings{
		Mode: mode, ProxyID: o.proxyID, SidecarFor: o.sidecarFor, Register: o.register, RegisterID: o.registerID,
		API: o.api, HTTPAddr: httpAddr, LogLevel: o.logLevel, LogJSON: o.logJSON, AccessLog: o.accessLog,
		AdminBind: o.adminBind, AdminPprof: o.adminPprof, PprofAddr: o.pprofAddr,
		ShutdownGrace: o.shutdownGrace, HalfCloseTimeout: o.halfCloseTimeout, TLSKex: o.tlsKex, KTLS: o.ktls,
		MaxInboundConnections: o.maxInbound, MaxHandshakes: o.maxHandshakes,
	}
}
