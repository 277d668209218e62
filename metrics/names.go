package metrics

import "strings"

// The metric names strait emits, as go-metrics keys (joined with '.' for
// statsd, '_' for Prometheus, after the metrics prefix). The first six are
// the built-in proxy's, with its labels and semantics.
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

var help = map[string]string{
	"inbound.conns":              "Open proxied connections on the public listener (built-in proxy name).",
	"inbound.rx_bytes":           "Bytes received from inbound peers (built-in proxy name).",
	"inbound.tx_bytes":           "Bytes sent to inbound peers (built-in proxy name).",
	"upstream.conns":             "Open proxied connections per upstream (built-in proxy name).",
	"upstream.rx_bytes":          "Bytes received from the local application per upstream (built-in proxy name).",
	"upstream.tx_bytes":          "Bytes sent to the local application per upstream (built-in proxy name).",
	"inbound.denied":             "Inbound connections refused by intentions, by source service.",
	"inbound.handshake_failed":   "Inbound TLS handshakes that failed, by reason.",
	"inbound.app_dial_failed":    "Authorized inbound connections whose application could not be dialed.",
	"inbound.conns_refused":      "Inbound connections and tunnel streams refused by a limit, by reason.",
	"inbound.conn_duration":      "Duration of proxied inbound connections in milliseconds.",
	"upstream.dial_failed":       "Upstream connections for which no endpoint could be dialed.",
	"upstream.dial_retries":      "Upstream dial attempts beyond the first of a connection.",
	"upstream.healthy_endpoints": "Passing endpoints listed by Consul per upstream.",
	"upstream.ejected_endpoints": "Endpoints skipped after dial failures per upstream.",
	"upstream.conn_duration":     "Duration of proxied upstream connections in milliseconds.",
	"leaf.seconds_to_expiry":     "Seconds until the leaf certificate expires.",
	"watch.errors":               "Failed blocking queries against the local agent, by watch.",
}

// Help returns the description of a metric by its dotted name without
// prefix ("upstream.rx_bytes"), or "".
func Help(name string) string { return help[name] }

// helpFor is PromSink.Help for a prefix: it maps a Prometheus name back to
// the dotted name.
func helpFor(prefix string) func(string) string {
	byProm := make(map[string]string, len(help))
	pp := ""
	if prefix != "" {
		pp = promName(strings.Split(prefix, ".")) + "_"
	}
	for k, v := range help {
		byProm[pp+promName(strings.Split(k, "."))] = v
	}
	return func(name string) string { return byProm[name] }
}
