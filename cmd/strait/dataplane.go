package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/straitproxy/strait/dataplane"
	"github.com/straitproxy/strait/internal/usage"
)

// dataplaneOptions are the flags of `strait dataplane`: consul-dataplane's
// where they apply (same names, same DP_* environment variables), plus
// -http-port.
type dataplaneOptions struct {
	addresses          string
	httpPort, grpcPort int
	tlsDisabled        bool
	caCerts            string
	tlsServerName      string
	tlsCert, tlsKey    string
	tlsInsecure        bool
	configFile         string
	checkHealth        bool
	proxyID            string
	proxyIDPath        string
	nodeName           string
	namespace          string
	partition          string
	credType           string
	staticToken        string
	authMethod         string
	bearerTokenPath    string
	bearerToken        string
	loginMeta          metaFlag
	loginDC            string
	loginNamespace     string
	loginPartition     string
	graceSeconds       int
	tokenCheck         time.Duration

	// lifecycle endpoints (consul-dataplane's graceful shutdown/startup)
	gracefulAddr         string
	gracefulPort         int
	gracefulShutdownPath string
	gracefulStartupPath  string
	startupGraceSeconds  int
	drainListeners       bool

	// ignored names the Envoy-only flags given, for the one warning.
	ignored []string
	// extra are the Envoy arguments after "--" (ignored too).
	extra []string
}

// metaFlag is -login-meta key=value, repeatable.
type metaFlag map[string]string

func (m *metaFlag) String() string {
	if m == nil || len(*m) == 0 {
		return ""
	}
	var kv []string
	for k, v := range *m {
		kv = append(kv, k+"="+v)
	}
	sort.Strings(kv)
	return strings.Join(kv, ",")
}

func (m *metaFlag) Set(s string) error {
	k, v, ok := strings.Cut(s, "=")
	if !ok || k == "" {
		return fmt.Errorf("%q: want key=value", s)
	}
	if *m == nil {
		*m = metaFlag{}
	}
	(*m)[k] = v
	return nil
}

// envoyOnlyFlags are consul-dataplane flags that configure Envoy or
// features strait does not have: accepted, warned about once, ignored.
// Booleans are listed in envoyOnlyBools so that they take no value.
var envoyOnlyFlags = []string{
	"envoy-admin-bind-address", "envoy-admin-bind-port", "envoy-ready-bind-address", "envoy-ready-bind-port",
	"envoy-concurrency", "envoy-draining-time-seconds", "envoy-drain-strategy", "envoy-executable-path",
	"xds-bind-addr", "xds-bind-port", "consul-dns-bind-addr", "consul-dns-bind-port",
	"telemetry-prom-scrape-path", "telemetry-prom-merge-port", "telemetry-prom-service-metrics-url",
	"telemetry-prom-retention-time", "telemetry-prom-ca-certs-file", "telemetry-prom-ca-certs-path",
	"telemetry-prom-cert-file", "telemetry-prom-key-file", "telemetry-use-central-config",
	"dump-envoy-config-on-exit", "server-watch-disabled", "service-node-id",
}

var envoyOnlyBools = []string{"telemetry-use-central-config", "dump-envoy-config-on-exit", "server-watch-disabled"}

// ignoredFlag accepts any value and remembers that the flag was given.
type ignoredFlag struct {
	name    string
	isBool  bool
	ignored *[]string
}

func (f *ignoredFlag) String() string { return "" }
func (f *ignoredFlag) Set(string) error {
	if !slices.Contains(*f.ignored, f.name) {
		*f.ignored = append(*f.ignored, f.name)
	}
	return nil
}
func (f *ignoredFlag) IsBoolFlag() bool { return f.isBool }

// straitDataplaneFlags are strait's own flags that work in dataplane mode.
var straitDataplaneFlags = []string{
	"log-level", "log-json", "access-log", "admin-bind", "admin-pprof", "pprof-addr",
	"statsd-addr", "statsite-addr", "dogstatsd-addr", "dogstatsd-tags", "metrics-prefix", "disable-hostname",
	"shutdown-grace", "half-close-timeout", "tunnels", "tls-kex", "ktls", "max-inbound-connections", "max-handshakes",
}

func envOr(name, def string) string {
	if v, ok := os.LookupEnv(name); ok {
		return v
	}
	return def
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil {
		return v
	}
	return def
}

func envBool(name string) bool {
	b, _ := strconv.ParseBool(os.Getenv(name))
	return b
}

// newDataplaneFlagSet defines `strait dataplane`'s flags on o and o.dp.
func newDataplaneFlagSet(o *options) *flag.FlagSet {
	d := o.dp
	fs := flag.NewFlagSet("strait dataplane", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.StringVar(&d.addresses, "addresses", os.Getenv("DP_CONSUL_ADDRESSES"), "Consul servers: IPs or host names (space or comma separated), a DNS `name` resolving to them, or exec=<command> printing them.")
	fs.IntVar(&d.httpPort, "http-port", envInt("DP_CONSUL_HTTP_PORT", 0), "Servers' HTTP API `port` (strait's addition: registration, login, intentions, chains); 0 means 8500, or 8501 with TLS.")
	fs.IntVar(&d.grpcPort, "grpc-port", envInt("DP_CONSUL_GRPC_PORT", dataplane.DefaultGRPCPort), "Servers' public gRPC `port` (leaf certificate signing).")
	fs.BoolVar(&d.tlsDisabled, "tls-disabled", envBool("DP_TLS_DISABLED"), "Talk to the servers without TLS.")
	fs.StringVar(&d.caCerts, "ca-certs", os.Getenv("DP_CA_CERTS"), "CA certificate `file or directory` for the servers' TLS; the system roots when empty.")
	fs.StringVar(&d.tlsServerName, "tls-server-name", os.Getenv("DP_TLS_SERVER_NAME"), "Server `name` expected in the servers' certificates (needed when -addresses are IPs).")
	fs.StringVar(&d.tlsCert, "tls-cert", os.Getenv("DP_TLS_CERT"), "Client certificate `file` for the servers' TLS (with -tls-key).")
	fs.StringVar(&d.tlsKey, "tls-key", os.Getenv("DP_TLS_KEY"), "Client key `file` for the servers' TLS.")
	fs.BoolVar(&d.tlsInsecure, "tls-insecure-skip-verify", envBool("DP_TLS_INSECURE_SKIP_VERIFY"), "Do not verify the servers' certificates (tests only).")
	fs.StringVar(&d.configFile, "config-file", os.Getenv("DP_CONFIG_FILE"), "consul-dataplane's JSON configuration `file`: not supported (refused); pass flags.")
	fs.BoolVar(&d.checkHealth, "check-proxy-health", false, "Only check the running strait's health (GET /ready on -admin-bind) and exit 0 if ready, 1 if not: consul-k8s's startup probe of a native sidecar.")
	fs.StringVar(&d.proxyID, "proxy-service-id", os.Getenv("DP_PROXY_SERVICE_ID"), "The proxy's service `ID` in the catalog.")
	fs.StringVar(&d.proxyIDPath, "proxy-service-id-path", os.Getenv("DP_PROXY_SERVICE_ID_PATH"), "`File` holding the proxy's service ID (consul-k8s's connect-init writes /consul/connect-inject/proxyid).")
	fs.StringVar(&d.nodeName, "service-node-name", os.Getenv("DP_SERVICE_NODE_NAME"), "Catalog `node` of the proxy's registration (consul-k8s: <k8s node>-virtual).")
	fs.StringVar(&d.namespace, "service-namespace", os.Getenv("DP_SERVICE_NAMESPACE"), "Consul `namespace` of the proxy's service (Enterprise).")
	fs.StringVar(&d.partition, "service-partition", os.Getenv("DP_SERVICE_PARTITION"), "Admin `partition` of the proxy's service (Enterprise).")
	fs.StringVar(&d.credType, "credential-type", os.Getenv("DP_CREDENTIAL_TYPE"), "Where the ACL token comes from, `login|static`; none when empty (servers without ACLs).")
	fs.StringVar(&d.staticToken, "static-token", os.Getenv("DP_CREDENTIAL_STATIC_TOKEN"), "ACL `token` of -credential-type static.")
	fs.StringVar(&d.authMethod, "login-auth-method", os.Getenv("DP_CREDENTIAL_LOGIN_AUTH_METHOD"), "Auth `method` to log in with (-credential-type login).")
	fs.StringVar(&d.bearerTokenPath, "login-bearer-token-path", os.Getenv("DP_CREDENTIAL_LOGIN_BEARER_TOKEN_PATH"), "`File` holding the login's bearer token (the pod's service-account token), read at every login.")
	fs.StringVar(&d.bearerToken, "login-bearer-token", os.Getenv("DP_CREDENTIAL_LOGIN_BEARER_TOKEN"), "The login's bearer `token` itself (-login-bearer-token-path is better: a file is re-read at every login).")
	fs.Var(&d.loginMeta, "login-meta", "Repeatable `key=value` metadata of the login token.")
	fs.StringVar(&d.loginDC, "login-datacenter", os.Getenv("DP_CREDENTIAL_LOGIN_DATACENTER"), "`Datacenter` of the auth method; the servers' when empty.")
	fs.StringVar(&d.loginNamespace, "login-namespace", os.Getenv("DP_CREDENTIAL_LOGIN_NAMESPACE"), "`Namespace` of the auth method (Enterprise).")
	fs.StringVar(&d.loginPartition, "login-partition", os.Getenv("DP_CREDENTIAL_LOGIN_PARTITION"), "Admin `partition` of the auth method (Enterprise).")
	fs.DurationVar(&d.tokenCheck, "login-check-interval", dataplane.DefaultCheckPeriod, "How often the login token is checked on the servers (strait's addition); a deleted or expiring token is replaced by a new login.")
	fs.IntVar(&d.graceSeconds, "shutdown-grace-period-seconds", envInt("DP_SHUTDOWN_GRACE_PERIOD_SECONDS", -1), "On SIGTERM or "+
		"a graceful shutdown request, how many `seconds` live connections may finish (-shutdown-grace when not given).")
	fs.StringVar(&d.gracefulAddr, "graceful-addr", envOr("DP_GRACEFUL_ADDR", "127.0.0.1"), "`Address` of the lifecycle listener (graceful startup and shutdown endpoints).")
	fs.IntVar(&d.gracefulPort, "graceful-port", envInt("DP_GRACEFUL_PORT", 20600), "`Port` of the lifecycle listener; 0 serves the endpoints on the admin listener only.")
	fs.StringVar(&d.gracefulShutdownPath, "graceful-shutdown-path", envOr("DP_GRACEFUL_SHUTDOWN_PATH", "/graceful_shutdown"), "HTTP `path` that starts a graceful shutdown (consul-k8s's preStop hook).")
	fs.StringVar(&d.gracefulStartupPath, "graceful-startup-path", envOr("DP_GRACEFUL_STARTUP_PATH", "/graceful_startup"), "HTTP `path` that answers 200 once the proxy is ready (consul-k8s's postStart hook).")
	fs.IntVar(&d.startupGraceSeconds, "startup-grace-period-seconds", envInt("DP_STARTUP_GRACE_PERIOD_SECONDS", 0), "How many `seconds` the startup endpoint waits for readiness; 0 answers at once.")
	fs.BoolVar(&d.drainListeners, "shutdown-drain-listeners", envBool("DP_SHUTDOWN_DRAIN_LISTENERS"), "On a graceful shutdown, stop accepting inbound connections at once (upstreams keep working for the grace period).")
	for _, name := range envoyOnlyFlags {
		fs.Var(&ignoredFlag{name: name, isBool: slices.Contains(envoyOnlyBools, name), ignored: &d.ignored}, name,
			"Envoy or consul-dataplane only: accepted and ignored (warned about once).")
	}
	// strait's own flags, sharing their values with o.
	own := newFlagSet(o)
	for _, name := range straitDataplaneFlags {
		f := own.Lookup(name)
		fs.Var(f.Value, f.Name, f.Usage)
		fs.Lookup(name).DefValue = f.DefValue
	}
	if v, ok := os.LookupEnv("DP_LOG_LEVEL"); ok {
		o.logLevel = v
	}
	if v, ok := os.LookupEnv("DP_LOG_JSON"); ok {
		o.logJSON, _ = strconv.ParseBool(v)
	}
	return fs
}

// dataplaneHelp is `strait dataplane -h`.
var dataplaneHelp = usage.Help{
	Usage: []string{"strait dataplane [flags] [-- ignored Envoy arguments]"},
	Summary: "Runs strait as the sidecar of a pod without a Consul client agent, in place of consul-dataplane " +
		"(and Envoy), with its flags and DP_* environment variables: it logs in with the pod's service-account " +
		"token, finds and follows the proxy's registration in the servers' catalog (merged with proxy-defaults " +
		"and service-defaults), has its leaf certificate signed by the servers (the private key stays in the pod), " +
		"and otherwise proxies exactly as in agent mode.",
	Groups: []usage.Group{
		{Title: "Servers", Flags: []string{"addresses", "http-port", "grpc-port", "tls-disabled", "ca-certs", "tls-server-name", "tls-cert", "tls-key", "tls-insecure-skip-verify"}},
		{Title: "Proxy registration", Flags: []string{"proxy-service-id", "proxy-service-id-path", "service-node-name", "service-namespace", "service-partition"}},
		{Title: "Credentials", Flags: []string{"credential-type", "static-token", "login-auth-method", "login-bearer-token-path", "login-bearer-token", "login-meta", "login-datacenter", "login-namespace", "login-partition", "login-check-interval"}},
		{Title: "Lifecycle", Flags: []string{"check-proxy-health", "config-file", "shutdown-grace-period-seconds", "graceful-addr", "graceful-port", "graceful-shutdown-path", "graceful-startup-path", "startup-grace-period-seconds", "shutdown-drain-listeners"}},
		{Title: "Observability (strait's)", Flags: []string{"log-level", "log-json", "access-log", "admin-bind", "admin-pprof", "pprof-addr",
			"statsd-addr", "statsite-addr", "dogstatsd-addr", "dogstatsd-tags", "metrics-prefix", "disable-hostname"}},
		{Title: "Tuning (strait's)", Flags: []string{"shutdown-grace", "half-close-timeout", "tunnels", "tls-kex", "ktls", "max-inbound-connections", "max-handshakes"}},
		{Title: "Accepted and ignored (Envoy or consul-dataplane only)", Flags: envoyOnlyFlags},
	},
	Env: map[string]string{
		"addresses": "DP_CONSUL_ADDRESSES", "http-port": "DP_CONSUL_HTTP_PORT", "grpc-port": "DP_CONSUL_GRPC_PORT",
		"tls-disabled": "DP_TLS_DISABLED", "ca-certs": "DP_CA_CERTS", "tls-server-name": "DP_TLS_SERVER_NAME",
		"tls-cert": "DP_TLS_CERT", "tls-key": "DP_TLS_KEY", "tls-insecure-skip-verify": "DP_TLS_INSECURE_SKIP_VERIFY",
		"config-file": "DP_CONFIG_FILE", "login-bearer-token": "DP_CREDENTIAL_LOGIN_BEARER_TOKEN",
		"proxy-service-id": "DP_PROXY_SERVICE_ID", "proxy-service-id-path": "DP_PROXY_SERVICE_ID_PATH",
		"service-node-name": "DP_SERVICE_NODE_NAME", "service-namespace": "DP_SERVICE_NAMESPACE", "service-partition": "DP_SERVICE_PARTITION",
		"credential-type": "DP_CREDENTIAL_TYPE", "static-token": "DP_CREDENTIAL_STATIC_TOKEN",
		"login-auth-method": "DP_CREDENTIAL_LOGIN_AUTH_METHOD", "login-bearer-token-path": "DP_CREDENTIAL_LOGIN_BEARER_TOKEN_PATH",
		"login-meta": "DP_CREDENTIAL_LOGIN_META, DP_CREDENTIAL_LOGIN_META1, ...", "login-datacenter": "DP_CREDENTIAL_LOGIN_DATACENTER",
		"login-namespace": "DP_CREDENTIAL_LOGIN_NAMESPACE", "login-partition": "DP_CREDENTIAL_LOGIN_PARTITION",
		"shutdown-grace-period-seconds": "DP_SHUTDOWN_GRACE_PERIOD_SECONDS", "graceful-addr": "DP_GRACEFUL_ADDR", "graceful-port": "DP_GRACEFUL_PORT",
		"graceful-shutdown-path": "DP_GRACEFUL_SHUTDOWN_PATH", "graceful-startup-path": "DP_GRACEFUL_STARTUP_PATH",
		"startup-grace-period-seconds": "DP_STARTUP_GRACE_PERIOD_SECONDS", "shutdown-drain-listeners": "DP_SHUTDOWN_DRAIN_LISTENERS",
		"log-level": "DP_LOG_LEVEL", "log-json": "DP_LOG_JSON",
	},
	Examples: []usage.Example{
		{Comment: "As consul-k8s runs consul-dataplane, with strait in its place:",
			Command: "strait dataplane -addresses consul-server.consul.svc -grpc-port 8502 -tls-disabled -proxy-service-id-path /consul/connect-inject/proxyid " +
				"-credential-type login -login-auth-method consul-k8s-auth-method -login-bearer-token-path /var/run/secrets/kubernetes.io/serviceaccount/token"},
	},
	Notes: []string{
		"The node name usually comes from DP_SERVICE_NODE_NAME, as consul-k8s sets it. Invalid input prints one line " +
			"and exits with status 2. SIGINT/SIGTERM drain for the grace period, then log out (the login token is " +
			"destroyed). docs/kubernetes.md has the pod spec.",
	},
}

// parseDataplaneFlags parses `strait dataplane`'s arguments.
func parseDataplaneFlags(args []string) (*options, error) {
	o := &options{set: map[string]bool{}, dp: &dataplaneOptions{}}
	fs := newDataplaneFlagSet(o)
	// DP_CREDENTIAL_LOGIN_META and its numbered forms, as consul-k8s sets them.
	for _, kv := range os.Environ() {
		name, val, _ := strings.Cut(kv, "=")
		if rest, ok := strings.CutPrefix(name, "DP_CREDENTIAL_LOGIN_META"); ok && (rest == "" || strings.Trim(rest, "0123456789") == "") {
			if err := o.dp.loginMeta.Set(val); err != nil {
				return nil, usagef("%s: %v", name, err)
			}
		}
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil, err
		}
		return nil, usagef("dataplane: %v (strait dataplane -h lists the flags)", err)
	}
	o.dp.extra = fs.Args()
	if len(o.dp.extra) > 0 && !slices.Contains(args, "--") {
		return nil, usagef("dataplane: unexpected argument %q (Envoy arguments go after --)", fs.Arg(0))
	}
	fs.Visit(func(f *flag.Flag) {
		o.set[f.Name] = true
		switch f.Name {
		case "admin-bind":
			o.adminBindSet = true
		case "disable-hostname":
			o.disableHostSet = true
		}
	})
	return o, o.validateDataplane()
}

func (o *options) validateDataplane() error {
	if err := o.validateCommon(); err != nil {
		return err
	}
	d := o.dp
	if d.checkHealth {
		return nil // only the admin address matters
	}
	if d.configFile != "" {
		return usagef("dataplane: -config-file is not supported; give its settings as flags or DP_* variables")
	}
	if (d.tlsCert == "") != (d.tlsKey == "") {
		return usagef("dataplane: -tls-cert and -tls-key go together")
	}
	if strings.TrimSpace(d.addresses) == "" {
		return usagef("dataplane: -addresses is required (the Consul servers)")
	}
	if _, err := dataplane.NewServers(d.addresses, nil, nil); err != nil {
		return usagef("dataplane: -addresses: %v", err)
	}
	for _, p := range []struct {
		name string
		v    int
		zero bool
	}{{"-http-port", d.httpPort, true}, {"-grpc-port", d.grpcPort, false}, {"-graceful-port", d.gracefulPort, true}} {
		if p.v < 0 || p.v > 65535 || (p.v == 0 && !p.zero) {
			return usagef("dataplane: %s %d out of range", p.name, p.v)
		}
	}
	if d.proxyID == "" && d.proxyIDPath == "" {
		return usagef("dataplane: -proxy-service-id or -proxy-service-id-path is required")
	}
	if d.nodeName == "" {
		return usagef("dataplane: -service-node-name is required (consul-k8s sets DP_SERVICE_NODE_NAME)")
	}
	switch d.credType {
	case "":
	case dataplane.CredentialStatic:
		if d.staticToken == "" {
			return usagef("dataplane: -credential-type static requires -static-token")
		}
	case dataplane.CredentialLogin:
		if d.authMethod == "" || (d.bearerTokenPath == "" && d.bearerToken == "") {
			return usagef("dataplane: -credential-type login requires -login-auth-method and -login-bearer-token-path (or -login-bearer-token)")
		}
	default:
		return usagef("dataplane: -credential-type %q: want login or static", d.credType)
	}
	if d.caCerts != "" && !d.tlsDisabled {
		if _, err := os.Stat(d.caCerts); err != nil {
			return usagef("dataplane: -ca-certs: %v", err)
		}
	}
	if d.graceSeconds < -1 {
		return usagef("dataplane: -shutdown-grace-period-seconds must not be negative")
	}
	if d.graceSeconds >= 0 {
		o.shutdownGrace = time.Duration(d.graceSeconds) * time.Second
	}
	if d.startupGraceSeconds < 0 {
		return usagef("dataplane: -startup-grace-period-seconds must not be negative")
	}
	if d.tokenCheck <= 0 {
		return usagef("dataplane: -login-check-interval must be positive")
	}
	if !strings.HasPrefix(d.gracefulShutdownPath, "/") || !strings.HasPrefix(d.gracefulStartupPath, "/") {
		return usagef("dataplane: -graceful-shutdown-path and -graceful-startup-path must start with /")
	}
	return nil
}

// proxyServiceID is -proxy-service-id, or the content of
// -proxy-service-id-path.
func (d *dataplaneOptions) proxyServiceID() (string, error) {
	if d.proxyID != "" {
		return d.proxyID, nil
	}
	b, err := os.ReadFile(d.proxyIDPath)
	if err != nil {
		return "", fmt.Errorf("-proxy-service-id-path: %w", err)
	}
	id := strings.TrimSpace(string(b))
	if id == "" {
		return "", fmt.Errorf("-proxy-service-id-path: %s is empty", d.proxyIDPath)
	}
	return id, nil
}

// options returns the dataplane package's options.
func (d *dataplaneOptions) options(id string) dataplane.Options {
	return dataplane.Options{
		Addresses: d.addresses, HTTPPort: d.httpPort, GRPCPort: d.grpcPort,
		TLSDisabled: d.tlsDisabled, CACerts: d.caCerts, TLSServerName: d.tlsServerName,
		TLSCert: d.tlsCert, TLSKey: d.tlsKey, TLSInsecureSkipVerify: d.tlsInsecure,
		ProxyServiceID: id, NodeName: d.nodeName, Namespace: d.namespace, Partition: d.partition,
		Credentials: dataplane.Credentials{
			Type: d.credType, StaticToken: d.staticToken, AuthMethod: d.authMethod, BearerTokenPath: d.bearerTokenPath, BearerToken: d.bearerToken,
			Meta: d.loginMeta, Datacenter: d.loginDC, Namespace: d.loginNamespace, Partition: d.loginPartition,
			CheckInterval: d.tokenCheck,
		},
	}
}

// writeDataplaneHelp prints `strait dataplane -h`.
func writeDataplaneHelp(w io.Writer) error {
	return usage.Write(w, newDataplaneFlagSet(&options{set: map[string]bool{}, dp: &dataplaneOptions{}}), dataplaneHelp)
}

// checkProxyHealth is -check-proxy-health: GET /ready on the admin
// listener of the strait running in this pod; exit 0 when ready.
func checkProxyHealth(o *options, stdout, stderr io.Writer) int {
	if o.adminBind == "off" {
		fmt.Fprintln(stderr, "strait: dataplane: -check-proxy-health needs the admin listener (-admin-bind)")
		return 2
	}
	host, port, _ := net.SplitHostPort(o.adminBind)
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		host = "127.0.0.1"
	}
	c := &http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get("http://" + net.JoinHostPort(host, port) + "/ready")
	if err != nil {
		fmt.Fprintf(stderr, "strait: not ready: %v\n", err)
		return 1
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		fmt.Fprintf(stderr, "strait: not ready: /ready answered %s\n", resp.Status)
		return 1
	}
	fmt.Fprintln(stdout, "ready")
	return 0
}
