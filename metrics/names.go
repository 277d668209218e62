package metrics

import "strings"

// The metric names strait emits, as go-metrics keys (joined with '.' for
// statsd, after the metrics prefix; Prometheus names are in promDescs).
// The first six are the built-in proxy's, with its labels and semantics.
var (
	// InboundConns is a gauge of open proxied connections on the public
	// listener {dst}: counted once the application has been dialed, as
	// the built-in counts after its dial.
	InboundConns = []string{"inbound", "conns"}
	// InboundRxBytes counts bytes received from inbound peers {dst};
	// InboundTxBytes bytes sent back to them.
	InboundRxBytes = []string{"inbound", "rx_bytes"}
	InboundTxBytes = []string{"inbound", "tx_bytes"}
	// UpstreamConns is a gauge of open proxied connections per upstream
	// {src, dst_type, dst}.
	UpstreamConns = []string{"upstream", "conns"}
	// UpstreamRxBytes counts bytes received from the local application on
	// an upstream listener (sent to the upstream); UpstreamTxBytes bytes
	// sent back to the application. rx/tx are from the listener's point
	// of view in both directions, as in the built-in proxy.
	UpstreamRxBytes = []string{"upstream", "rx_bytes"}
	UpstreamTxBytes = []string{"upstream", "tx_bytes"}

	// InboundDenied counts connections refused by intentions {src, dst}.
	InboundDenied = []string{"inbound", "denied"}
	// InboundRevoked counts open inbound connections and tunnel streams
	// closed because the intentions changed to deny their source {src, dst}.
	InboundRevoked = []string{"inbound", "revoked"}
	// InboundPlaintext counts plaintext connections to the application's
	// port that a permissive transparent proxy passed through {dst};
	// InboundPlaintextRefused those a strict one closed.
	InboundPlaintext        = []string{"inbound", "plaintext"}
	InboundPlaintextRefused = []string{"inbound", "plaintext_refused"}
	// InboundPlaintextBytes counts the bytes (both directions) of those
	// passed through, added when each closes {dst}.
	InboundPlaintextBytes = []string{"inbound", "plaintext_bytes"}
	// InboundHandshakeFailed counts inbound TLS handshakes that failed
	// for another reason {dst, reason}.
	InboundHandshakeFailed = []string{"inbound", "handshake_failed"}
	// InboundAppDialFailed counts authorized connections whose local
	// application could not be dialed {dst, reason}.
	InboundAppDialFailed = []string{"inbound", "app_dial_failed"}

	// InboundTunnelRefused counts inbound tunnels and tunnel streams
	// refused by a limit or a bad stream header; labels dst, reason
	// (max_tunnels, max_streams, stream_rate, bad_header; framing: a
	// tunnel closed because the peer broke the yamux framing).
	InboundTunnelRefused = []string{"inbound", "tunnel_refused"}
	// InboundConnsRefused counts inbound connections (and tunnel streams)
	// closed at once by a limit {dst, reason}: max_inbound_connections or
	// max_handshakes.
	InboundConnsRefused = []string{"inbound", "conns_refused"}
	// InboundDuration samples the duration of proxied inbound connections
	// in milliseconds {dst}.
	InboundDuration = []string{"inbound", "conn_duration"}
	// UpstreamDialFailed counts upstream connections for which no endpoint
	// could be dialed {src, dst_type, dst}.
	UpstreamDialFailed = []string{"upstream", "dial_failed"}
	// UpstreamDialRetries counts dial attempts beyond the first of one
	// connection {src, dst_type, dst}.
	UpstreamDialRetries = []string{"upstream", "dial_retries"}
	// UpstreamHealthyEndpoints is a gauge of the passing endpoints Consul
	// lists for an upstream {src, dst_type, dst}.
	UpstreamHealthyEndpoints = []string{"upstream", "healthy_endpoints"}
	// UpstreamEjectedEndpoints is a gauge of those skipped for now after
	// dial failures {src, dst_type, dst}.
	UpstreamEjectedEndpoints = []string{"upstream", "ejected_endpoints"}
	// UpstreamDuration samples the duration of proxied upstream
	// connections in milliseconds {src, dst_type, dst}.
	UpstreamDuration = []string{"upstream", "conn_duration"}
	// LeafExpiry is a gauge of the seconds until our leaf certificate
	// expires {service}.
	LeafExpiry = []string{"leaf", "seconds_to_expiry"}
	// WatchErrors counts failed blocking queries against the agent
	// {watch}.
	WatchErrors = []string{"watch", "errors"}
)

// Label values known before anything happens: the fixed reasons of
// InboundHandshakeFailed, InboundAppDialFailed and InboundTunnelRefused.
// The proxy declares each at zero (Metrics.Declare) so that these series
// exist from the start; a value not listed here would still be counted,
// only from its first occurrence.
var (
	HandshakeFailedReasons = []string{"timeout", "no_client_cert", "untrusted_chain", "wrong_trust_domain",
		"not_a_service", "not_ready", "leaf_expired", "authz_error", "peer_closed", "shutdown", "tls_error"}
	AppDialFailedReasons = []string{"app_refused", "app_unreachable"}
	TunnelRefusedReasons = []string{"max_tunnels", "max_streams", "stream_rate", "bad_header", "framing"}
	ConnsRefusedReasons  = []string{"max_inbound_connections", "max_handshakes"}
)

// promDesc is how a go-metrics key is exposed to Prometheus: under its own
// name (counters end in _total, durations are in seconds), with a type
// and HELP text. The statsd family keeps the go-metrics key.
type promDesc struct {
	name  string  // without the metrics prefix
	kind  kind    // the Prometheus type, whatever the go-metrics call
	scale float64 // multiplies every value (milliseconds to seconds)
	help  string
}

// promDescs maps dotted go-metrics keys (without prefix) to their
// Prometheus exposition. go-metrics' runtime.* keys are here too: their
// own names break Prometheus conventions (gauges named *_count, ns).
var promDescs = map[string]promDesc{
	"inbound.conns":                     {"inbound_conns", kindGauge, 1, "Open proxied connections on the public listener (built-in proxy's inbound.conns)."},
	"inbound.rx_bytes":                  {"inbound_rx_bytes_total", kindCounter, 1, "Bytes received from inbound peers (built-in proxy's inbound.rx_bytes)."},
	"inbound.tx_bytes":                  {"inbound_tx_bytes_total", kindCounter, 1, "Bytes sent to inbound peers (built-in proxy's inbound.tx_bytes)."},
	"upstream.conns":                    {"upstream_conns", kindGauge, 1, "Open proxied connections per upstream (built-in proxy's upstream.conns)."},
	"upstream.rx_bytes":                 {"upstream_rx_bytes_total", kindCounter, 1, "Bytes received from the local application per upstream (built-in proxy's upstream.rx_bytes)."},
	"upstream.tx_bytes":                 {"upstream_tx_bytes_total", kindCounter, 1, "Bytes sent to the local application per upstream (built-in proxy's upstream.tx_bytes)."},
	"inbound.denied":                    {"inbound_denied_total", kindCounter, 1, "Inbound connections refused by intentions, by source service."},
	"inbound.plaintext":                 {"inbound_plaintext_total", kindCounter, 1, "Plaintext connections to the application's port passed through in permissive mutual TLS mode."},
	"inbound.plaintext_bytes":           {"inbound_plaintext_bytes_total", kindCounter, 1, "Bytes (both directions) of plaintext connections passed through in permissive mode, added as each closes."},
	"inbound.plaintext_refused":         {"inbound_plaintext_refused_total", kindCounter, 1, "Plaintext connections to the application's port closed because the service is strict."},
	"inbound.revoked":                   {"inbound_revoked_total", kindCounter, 1, "Open inbound connections closed because the intentions changed to deny their source."},
	"inbound.handshake_failed":          {"inbound_handshake_failed_total", kindCounter, 1, "Inbound TLS handshakes that failed for a reason other than intentions, by reason."},
	"inbound.app_dial_failed":           {"inbound_app_dial_failed_total", kindCounter, 1, "Authorized inbound connections whose application could not be dialed, by reason."},
	"inbound.tunnel_refused":            {"inbound_tunnel_refused_total", kindCounter, 1, "Inbound tunnels and tunnel streams refused, by reason."},
	"inbound.conns_refused":             {"inbound_conns_refused_total", kindCounter, 1, "Inbound connections and tunnel streams closed at once by a limit, by reason."},
	"log.suppressed":                    {"log_suppressed_total", kindCounter, 1, "Log and access-log lines about refusals not written because one tunnel or source produced too many, by reason."},
	"upstream.tunnel_violation":         {"upstream_tunnel_violation_total", kindCounter, 1, "Client tunnels closed because the server broke the tunnel protocol, by reason."},
	"inbound.conn_duration":             {"inbound_conn_duration_seconds", kindSummary, 1e-3, "Duration of proxied inbound connections in seconds."},
	"upstream.dial_failed":              {"upstream_dial_failed_total", kindCounter, 1, "Upstream connections for which no endpoint could be dialed."},
	"upstream.dial_retries":             {"upstream_dial_retries_total", kindCounter, 1, "Upstream dial attempts beyond the first of a connection."},
	"upstream.healthy_endpoints":        {"upstream_healthy_endpoints", kindGauge, 1, "Passing endpoints listed by Consul per upstream."},
	"upstream.ejected_endpoints":        {"upstream_ejected_endpoints", kindGauge, 1, "Endpoints skipped after dial failures per upstream."},
	"upstream.conn_duration":            {"upstream_conn_duration_seconds", kindSummary, 1e-3, "Duration of proxied upstream connections in seconds."},
	"upstream.target_connections":       {"upstream_target_connections_total", kindCounter, 1, "Upstream connections established per discovery chain target."},
	"upstream.target_healthy_endpoints": {"upstream_target_healthy_endpoints", kindGauge, 1, "Endpoints (healthy instances, or the mesh gateways leading to them) per discovery chain target."},
	"upstream.target_active":            {"upstream_target_active", kindGauge, 1, "1 while new connections start with this discovery chain target, else 0."},
	"outbound.conns":                    {"outbound_conns", kindGauge, 1, "Open connections on a transparent proxy's outbound listener."},
	"outbound.rx_bytes":                 {"outbound_rx_bytes_total", kindCounter, 1, "Bytes received from the local application on the outbound listener."},
	"outbound.tx_bytes":                 {"outbound_tx_bytes_total", kindCounter, 1, "Bytes sent back to the local application on the outbound listener."},
	"outbound.conn_duration":            {"outbound_conn_duration_seconds", kindSummary, 1e-3, "Duration of outbound listener connections in seconds."},
	"outbound.connections":              {"outbound_connections_total", kindCounter, 1, "Outbound listener connections established, by destination and route (virtual, direct, passthrough)."},
	"outbound.refused":                  {"outbound_refused_total", kindCounter, 1, "Outbound listener connections closed at once, by reason."},
	"outbound.dial_failed":              {"outbound_dial_failed_total", kindCounter, 1, "Outbound listener connections whose destination could not be dialed, by destination and route."},
	"outbound.implicit_upstreams":       {"outbound_implicit_upstreams", kindGauge, 1, "Implicit upstreams (services the intentions allow) a transparent proxy follows."},
	"outbound.routes":                   {"outbound_routes", kindGauge, 1, "Destination addresses the outbound listener routes into the mesh."},
	"leaf.seconds_to_expiry":            {"leaf_time_to_expiry_seconds", kindGauge, 1, "Seconds until the leaf certificate expires."},
	"watch.errors":                      {"watch_errors_total", kindCounter, 1, "Failed blocking queries against the local agent, by watch."},

	"runtime.num_goroutines":    {"runtime_num_goroutines", kindGauge, 1, "Goroutines that currently exist."},
	"runtime.alloc_bytes":       {"runtime_alloc_bytes", kindGauge, 1, "Bytes of allocated heap objects."},
	"runtime.sys_bytes":         {"runtime_sys_bytes", kindGauge, 1, "Bytes of memory obtained from the OS."},
	"runtime.heap_objects":      {"runtime_heap_objects", kindGauge, 1, "Allocated heap objects."},
	"runtime.malloc_count":      {"runtime_mallocs_total", kindCounter, 1, "Heap objects allocated since start."},
	"runtime.free_count":        {"runtime_frees_total", kindCounter, 1, "Heap objects freed since start."},
	"runtime.total_gc_runs":     {"runtime_gc_runs_total", kindCounter, 1, "Completed garbage collection cycles since start."},
	"runtime.total_gc_pause_ns": {"runtime_gc_paused_seconds_total", kindCounter, 1e-9, "Seconds spent in garbage collection stop-the-world pauses since start."},
	"runtime.gc_pause_ns":       {"runtime_gc_pause_seconds", kindSummary, 1e-9, "Garbage collection stop-the-world pauses in seconds."},
}

// Help returns the description of a metric by its dotted name without
// prefix ("upstream.rx_bytes"), or "".
func Help(name string) string { return promDescs[name].help }

// PromName returns the Prometheus name of a metric by its dotted name
// without prefix ("upstream.rx_bytes" is "upstream_rx_bytes_total"), or
// "" for a name strait does not emit.
func PromName(name string) string { return promDescs[name].name }

// resolved is the Prometheus side of one go-metrics key.
type resolved struct {
	name  string
	kind  kind
	scale float64
	help  string
}

// resolve maps a go-metrics key (prefix first, as go-metrics passes it to
// a sink) and the type of the call that emitted it to its Prometheus
// name, type, scale and HELP. A key strait does not know keeps its
// sanitized name, counters get _total, and HELP names the key.
func resolve(prefix string, key []string, k kind) resolved {
	rest := key
	pp := ""
	if prefix != "" && len(key) > 0 && key[0] == prefix {
		rest = key[1:]
		pp = promName(key[:1]) + "_"
	}
	dotted := strings.Join(rest, ".")
	if d, ok := promDescs[dotted]; ok {
		return resolved{name: pp + d.name, kind: d.kind, scale: d.scale, help: d.help}
	}
	return generic(key, k)
}

// generic is the exposition of a key strait does not know.
func generic(key []string, k kind) resolved {
	name := promName(key)
	if k == kindCounter && !strings.HasSuffix(name, "_total") {
		name += "_total"
	}
	return resolved{name: name, kind: k, scale: 1, help: "go-metrics key " + strings.Join(key, ".") + " (not documented by strait)."}
}

// Names added for the hardened data path.
var (
	// LogSuppressed counts log and access-log lines not written because
	// one tunnel or one source produced too many of them {reason}.
	LogSuppressed = []string{"log", "suppressed"}
	// UpstreamTunnelViolation counts client tunnels closed because the
	// server broke the tunnel protocol {reason} (server_stream: it opened
	// a stream).
	UpstreamTunnelViolation = []string{"upstream", "tunnel_violation"}
)

// Names added for discovery chains: per target of a service upstream's
// chain, labelled {src, dst_type, dst, target} with the target's ID
// ([subset.]service.namespace.partition.datacenter).
var (
	// UpstreamTargetConnections counts upstream connections established
	// to a target.
	UpstreamTargetConnections = []string{"upstream", "target_connections"}
	// UpstreamTargetHealthyEndpoints is a gauge of a target's endpoints:
	// its healthy instances, or the mesh gateways that lead to it.
	UpstreamTargetHealthyEndpoints = []string{"upstream", "target_healthy_endpoints"}
	// UpstreamTargetActive is 1 while new connections of some splitter
	// leg start with the target (the first of its failover order with
	// healthy endpoints), else 0.
	UpstreamTargetActive = []string{"upstream", "target_active"}
)

// Names of a transparent proxy's outbound listener, labelled {src} (the
// proxied service) plus what each says.
var (
	// OutboundConns is a gauge of open connections on the outbound
	// listener; OutboundRxBytes counts bytes from the local application,
	// OutboundTxBytes bytes back to it; OutboundDuration samples the
	// connections' durations in milliseconds.
	OutboundConns    = []string{"outbound", "conns"}
	OutboundRxBytes  = []string{"outbound", "rx_bytes"}
	OutboundTxBytes  = []string{"outbound", "tx_bytes"}
	OutboundDuration = []string{"outbound", "conn_duration"}
	// OutboundConnections counts connections established {dst, route}:
	// route "virtual" (a virtual IP, through the discovery chain),
	// "direct" (an instance dialed directly) or "passthrough" (no mesh
	// destination: to the original destination, unproxied; dst is
	// "passthrough" too).
	OutboundConnections = []string{"outbound", "connections"}
	// OutboundRefused counts connections closed at once {reason}.
	OutboundRefused = []string{"outbound", "refused"}
	// OutboundDialFailed counts connections whose destination could not
	// be dialed {dst, route}.
	OutboundDialFailed = []string{"outbound", "dial_failed"}
	// OutboundImplicitUpstreams is a gauge of the implicit upstreams
	// followed; OutboundRoutes of the addresses routed to them.
	OutboundImplicitUpstreams = []string{"outbound", "implicit_upstreams"}
	OutboundRoutes            = []string{"outbound", "routes"}
)

// OutboundRefusedReasons is the fixed label set of OutboundRefused:
// mesh_destinations_only (no mesh destination matched and the mesh entry
// forbids passthrough), max_outbound_connections (the limit), loop (the
// connection was addressed to the outbound listener itself, or its
// original destination could not be read).
var OutboundRefusedReasons = []string{"mesh_destinations_only", "max_outbound_connections", "loop"}
