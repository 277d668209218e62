package metrics

import (
	"errors"
	"io"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	gometrics "github.com/armon/go-metrics"
	"github.com/hashicorp/go-hclog"
)

// Label is go-metrics' label type.
type Label = gometrics.Label

// Options configure New. The zero value is valid.
type Options struct {
	// Logger for the push sinks' connection trouble; nil discards.
	Logger hclog.Logger
	// GaugeTTL is PromSink.GaugeTTL.
	GaugeTTL time.Duration
}

// Metrics is what strait's packages emit to. It is safe for concurrent use;
// an emission costs one atomic load plus the sinks' own work (no global
// lock).
type Metrics struct {
	log  hclog.Logger
	prom *PromSink

	mu     sync.Mutex // Configure, EmitRuntimeStats and Close
	cur    atomic.Pointer[state]
	closed bool
}

type state struct {
	tel  Telemetry
	prom *gometrics.Metrics // PromSink, no hostname in names
	decl *gometrics.Metrics // declSink over PromSink, same config
	push *gometrics.Metrics // statsd family with Consul's rules; nil if none
	// senders are the push sinks' goroutines, stopped when the state is
	// replaced or Metrics closed.
	senders []*sender
}

func (st *state) close() {
	for _, s := range st.senders {
		s.Close()
	}
}

// New returns a Metrics feeding only its Prometheus sink, with no prefix,
// until Configure adds the telemetry block's sinks.
func New(opts Options) *Metrics {
	m := &Metrics{log: opts.Logger, prom: newPromSink()}
	if m.log == nil {
		m.log = hclog.NewNullLogger()
	}
	m.prom.GaugeTTL = opts.GaugeTTL
	st, _ := m.build(Telemetry{})
	m.cur.Store(st)
	return m
}

// Discard returns a Metrics for tests and callers that do not care: it
// keeps series in its Prometheus sink and sends nothing anywhere.
func Discard() *Metrics { return New(Options{}) }

func goConfig(prefix string, t Telemetry) *gometrics.Config {
	c := &gometrics.Config{
		ServiceName:      prefix,
		TimerGranularity: time.Millisecond,
		FilterDefault:    t.FilterDefault == nil || *t.FilterDefault,
		AllowedPrefixes:  t.AllowedPrefixes,
		BlockedPrefixes:  t.BlockedPrefixes,
		// Runtime metrics are emitted by EmitRuntimeStats on strait's
		// shared flush, not by a goroutine per instance that never stops.
		EnableRuntimeMetrics: false,
	}
	return c
}

func (m *Metrics) build(t Telemetry) (*state, error) {
	st := &state{tel: t}
	var err error
	if st.prom, err = gometrics.New(goConfig(t.MetricsPrefix, t), m.prom); err != nil {
		return nil, err
	}
	if st.decl, err = gometrics.New(goConfig(t.MetricsPrefix, t), declSink{m.prom}); err != nil {
		return nil, err
	}
	var sinks gometrics.FanoutSink
	hostname, _ := os.Hostname()
	log := m.log
	if t.StatsdAddr != "" {
		s := newStatsdSink(t.StatsdAddr, log.Named("statsd"))
		st.senders = append(st.senders, s.sender)
		sinks = append(sinks, s)
	}
	if t.StatsiteAddr != "" {
		s := newStatsiteSink(t.StatsiteAddr, log.Named("statsite"))
		st.senders = append(st.senders, s.sender)
		sinks = append(sinks, s)
	}
	if t.DogstatsdAddr != "" {
		d := newDogStatsd(t.DogstatsdAddr, hostname, t.DogstatsdTags, log.Named("dogstatsd"))
		st.senders = append(st.senders, d.sender)
		sinks = append(sinks, d)
	}
	if len(sinks) > 0 {
		c := goConfig(t.MetricsPrefix, t)
		c.HostName = hostname
		c.EnableHostname = t.DisableHostname == nil || !*t.DisableHostname
		if st.push, err = gometrics.New(c, sinks); err != nil {
			st.close()
			return nil, err
		}
	}
	return st, nil
}

// Configure applies a telemetry block: prefix, filters and push sinks. It is
// meant to be called once, with the first configuration (the built-in proxy
// also applies telemetry only at start); a second call replaces the
// configuration and stops the previous push sinks. A changed prefix empties
// the Prometheus sink so that no series is exposed under two names.
// Configure fails after Close.
func (m *Metrics) Configure(t Telemetry) error {
	if err := t.Validate(); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return errors.New("metrics: Configure after Close")
	}
	st, err := m.build(t)
	if err != nil {
		return err
	}
	changed := m.cur.Load().tel.MetricsPrefix != t.MetricsPrefix
	if changed {
		m.prom.SetPrefix(t.MetricsPrefix)
	}
	old := m.cur.Swap(st)
	if changed {
		m.prom.Reset()
	}
	old.close()
	return nil
}

// Close stops the push sinks after they have sent what they hold, and
// returns once their goroutines have exited. The Prometheus sink keeps
// working; later emissions to the push sinks are dropped. Call it after
// everything that emits has stopped (the proxy's Shutdown).
func (m *Metrics) Close() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.closed = true
	m.cur.Load().close()
}

// Telemetry returns the configuration in effect.
func (m *Metrics) Telemetry() Telemetry { return m.cur.Load().tel }

// IncrCounter adds val to a counter.
func (m *Metrics) IncrCounter(key []string, val float32, labels []Label) {
	st := m.cur.Load()
	st.prom.IncrCounterWithLabels(key, val, labels)
	if st.push != nil {
		st.push.IncrCounterWithLabels(key, val, labels)
	}
}

// SetGauge sets a gauge.
func (m *Metrics) SetGauge(key []string, val float32, labels []Label) {
	st := m.cur.Load()
	st.prom.SetGaugeWithLabels(key, val, labels)
	if st.push != nil {
		st.push.SetGaugeWithLabels(key, val, labels)
	}
}

// AddSample records one observation of a summary (timer).
func (m *Metrics) AddSample(key []string, val float32, labels []Label) {
	st := m.cur.Load()
	st.prom.AddSampleWithLabels(key, val, labels)
	if st.push != nil {
		st.push.AddSampleWithLabels(key, val, labels)
	}
}

// Declare makes a counter or summary series exist in the Prometheus
// exposition at zero, before anything is counted, so that alerts and
// dashboards see it from the start. It sends nothing to the push sinks
// (statsd has no notion of a declared series). The metrics prefix and
// filters apply as to emissions. Gauges are not declared: they carry a
// value, emit it with SetGauge. key must be one of this package's names.
func (m *Metrics) Declare(key []string, labels []Label) {
	d, ok := promDescs[strings.Join(key, ".")]
	if !ok {
		return
	}
	st := m.cur.Load()
	switch d.kind {
	case kindCounter:
		st.decl.IncrCounterWithLabels(key, 0, labels)
	case kindSummary:
		st.decl.AddSampleWithLabels(key, 0, labels)
	}
}

// MeasureSince records the milliseconds since start in a summary.
func (m *Metrics) MeasureSince(key []string, start time.Time, labels []Label) {
	m.AddSample(key, float32(time.Since(start).Nanoseconds())/float32(time.Millisecond), labels)
}

// EmitRuntimeStats emits go-metrics' runtime.* gauges (goroutines, memory,
// GC). strait calls it on its shared flush.
func (m *Metrics) EmitRuntimeStats() {
	m.mu.Lock()
	defer m.mu.Unlock()
	st := m.cur.Load()
	st.prom.EmitRuntimeStats()
	if st.push != nil {
		st.push.EmitRuntimeStats()
	}
}

// WritePrometheus writes the Prometheus text exposition of every series.
func (m *Metrics) WritePrometheus(w io.Writer) error {
	_, err := m.prom.WriteTo(w)
	return err
}

// PrometheusContentType is the Content-Type of WritePrometheus's output.
const PrometheusContentType = "text/plain; version=0.0.4; charset=utf-8"
