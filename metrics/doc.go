// Package metrics is strait's metrics plumbing: one injected Metrics value
// (never go-metrics' global instance) that fans every measurement out to
//
//   - an always-on Prometheus sink (PromSink), served as text by the admin
//     listener's /metrics, and
//   - the push sinks of Consul's telemetry block (statsd, statsite,
//     dogstatsd), configured from Proxy.Config["telemetry"] or flags,
//     each one goroutine that Metrics.Close stops and joins (push.go says
//     why they are not go-metrics' own).
//
// # Why a Prometheus writer of our own
//
// go-metrics' prometheus subpackage would pull in prometheus/client_golang
// and with it client_model, common, procfs, protobuf and their transitive
// dependencies (roughly twenty modules and a few MB of binary) for what is a
// text format of a few lines per series. It also registers into
// client_golang's global registry by default, expires every series that is
// not updated within its Expiration (a quiet upstream's byte counters reset
// to nothing), and sees the go-metrics key with the hostname spliced in for
// gauges. go-metrics' InmemSink is no substitute: it aggregates per
// interval, so its counters restart at zero every interval and its gauges
// vanish when not set in the current one, while Prometheus needs
// cumulative counters. PromSink is a go-metrics MetricSink that keeps
// cumulative counters, last-value gauges (dropped after GaugeTTL without an
// update; strait re-emits its gauges on every flush) and count/sum
// summaries in a sync.Map, so the update path takes no global lock, and
// writes the text exposition format 0.0.4. It has no dependencies beyond
// go-metrics and the standard library.
//
// Prometheus names follow Prometheus's conventions rather than go-metrics'
// keys (counters end in _total, durations are summaries in seconds, every
// series has HELP), and Metrics.Declare exposes a series at zero before
// its first event; the push sinks keep the built-in proxy's names.
//
// Two go-metrics instances sit behind Metrics: the Prometheus one never
// puts the hostname into names (Prometheus labels the instance itself),
// the push one follows Consul's rules (hostname in gauge names unless
// disable_hostname), so statsd dashboards built for the built-in proxy keep
// working.
package metrics
