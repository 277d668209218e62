package metrics

// The mesh gateway's metrics (strait -gateway mesh, package gateway). They
// are kept apart from the proxy's names; init adds their Prometheus
// exposition to promDescs.
var (
	// GatewayConnections counts accepted connections by what became of
	// them {result}: routed, unknown_sni, hello_timeout, bad_hello,
	// peer_closed, not_ready, watch_limit, no_endpoints, dial_failed,
	// max_connections, max_pending, shutdown.
	GatewayConnections = []string{"gateway", "connections"}
	// GatewayUnknownSNI counts connections whose server name routes
	// nowhere {reason}.
	GatewayUnknownSNI = []string{"gateway", "unknown_sni"}
	// GatewayActive is a gauge of connections being proxied.
	GatewayActive = []string{"gateway", "active"}
	// GatewayPending is a gauge of connections waiting for their
	// ClientHello.
	GatewayPending = []string{"gateway", "pending"}
	// GatewayRxBytes counts bytes received from clients, the replayed
	// ClientHello included {kind, target}; GatewayTxBytes bytes sent back
	// to them. Counted when a connection ends.
	GatewayRxBytes = []string{"gateway", "rx_bytes"}
	GatewayTxBytes = []string{"gateway", "tx_bytes"}
	// GatewayDuration samples the duration of proxied connections in
	// milliseconds {kind}.
	GatewayDuration = []string{"gateway", "conn_duration"}
	// GatewayWatches is a gauge of the Consul watches the gateway runs
	// {kind}: local (a service or subset), remote (a datacenter's
	// gateway services).
	GatewayWatches = []string{"gateway", "watches"}
)

var gatewayDescs = map[string]promDesc{
	"gateway.connections":   {"gateway_connections_total", kindCounter, 1, "Connections accepted by the mesh gateway, by result."},
	"gateway.unknown_sni":   {"gateway_unknown_sni_total", kindCounter, 1, "Mesh gateway connections closed because their server name routes nowhere, by reason."},
	"gateway.active":        {"gateway_active_connections", kindGauge, 1, "Connections the mesh gateway is proxying."},
	"gateway.pending":       {"gateway_pending_hellos", kindGauge, 1, "Connections waiting for their TLS ClientHello at the mesh gateway."},
	"gateway.rx_bytes":      {"gateway_rx_bytes_total", kindCounter, 1, "Bytes the mesh gateway received from clients, by route kind and target."},
	"gateway.tx_bytes":      {"gateway_tx_bytes_total", kindCounter, 1, "Bytes the mesh gateway sent back to clients, by route kind and target."},
	"gateway.conn_duration": {"gateway_conn_duration_seconds", kindSummary, 1e-3, "Duration of connections proxied by the mesh gateway in seconds."},
	"gateway.watches":       {"gateway_watches", kindGauge, 1, "Consul watches the mesh gateway runs for its routes, by kind."},
}

func init() {
	for k, d := range gatewayDescs {
		promDescs[k] = d
	}
}
