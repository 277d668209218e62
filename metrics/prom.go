package metrics

import (
	"bufio"
	"io"
	"math"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	gometrics "github.com/armon/go-metrics"
)

// DefaultGaugeTTL is how long PromSink keeps a gauge that is not set again.
const DefaultGaugeTTL = time.Minute

// PromSink is a go-metrics sink for Prometheus: counters are cumulative,
// gauges keep their last value (for up to GaugeTTL without an update),
// samples become summaries with _sum and _count. Keys strait knows are
// exposed under their Prometheus names (counters end in _total, durations
// are in seconds; see names.go), every series with HELP and TYPE. Updates
// of an existing series are lock-free (sync.Map lookups and an atomic);
// only the first update of a series stores it. See the package
// documentation for why this exists rather than go-metrics' prometheus
// subpackage.
type PromSink struct {
	// GaugeTTL drops gauges not set for this long; zero means
	// DefaultGaugeTTL, negative never.
	GaugeTTL time.Duration

	prefix atomic.Pointer[string] // the metrics prefix, key[0] when set
	names  sync.Map               // nameKey -> resolved
	series sync.Map               // seriesKey -> *series
	now    func() time.Time
}

type kind uint8

const (
	kindCounter kind = iota
	kindGauge
	kindSummary
)

func (k kind) String() string {
	switch k {
	case kindCounter:
		return "counter"
	case kindGauge:
		return "gauge"
	}
	return "summary"
}

type seriesKey struct {
	kind   kind
	name   string
	labels string // rendered: `{a="b",c="d"}` or ""
}

type series struct {
	seriesKey
	help  string
	scale float64
	bits  atomic.Uint64 // counter or gauge value, float64 bits
	set   atomic.Int64  // gauge: unix nanoseconds of the last set

	mu    sync.Mutex // summary
	count uint64
	sum   float64
}

type nameKey struct {
	kind kind
	key  string // the go-metrics key joined with NUL
}

// newPromSink returns an empty sink.
func newPromSink() *PromSink { return &PromSink{now: time.Now} }

// SetPrefix tells the sink the metrics prefix go-metrics puts in front of
// every key ("" for none), so that it finds strait's names behind it.
func (p *PromSink) SetPrefix(prefix string) {
	p.prefix.Store(&prefix)
	p.names.Clear()
}

// resolve is resolve (names.go) with a cache; k is the type of the call.
func (p *PromSink) resolve(k kind, key []string) resolved {
	nk := nameKey{kind: k, key: strings.Join(key, "\x00")}
	if r, ok := p.names.Load(nk); ok {
		return r.(resolved)
	}
	prefix := ""
	if pp := p.prefix.Load(); pp != nil {
		prefix = *pp
	}
	r := resolve(prefix, key, k)
	// The table's type wins where it is compatible with the call: a
	// cumulative go-metrics gauge (runtime.malloc_count) may be a
	// Prometheus counter. Otherwise the call's type and a name of its own.
	if r.kind != k && !(r.kind == kindCounter && k == kindGauge) {
		r = generic(key, k)
	}
	p.names.Store(nk, r)
	return r
}

func (p *PromSink) get(k kind, key []string, labels []gometrics.Label) *series {
	r := p.resolve(k, key)
	sk := seriesKey{kind: r.kind, name: r.name, labels: promLabels(labels)}
	if s, ok := p.series.Load(sk); ok {
		return s.(*series)
	}
	s, _ := p.series.LoadOrStore(sk, &series{seriesKey: sk, help: r.help, scale: r.scale})
	return s.(*series)
}

// Reset forgets every series (used when the metrics prefix changes).
func (p *PromSink) Reset() {
	p.series.Clear()
	p.names.Clear()
}

func (p *PromSink) SetGauge(key []string, val float32) { p.SetGaugeWithLabels(key, val, nil) }

func (p *PromSink) SetGaugeWithLabels(key []string, val float32, labels []gometrics.Label) {
	s := p.get(kindGauge, key, labels)
	s.bits.Store(math.Float64bits(float64(val) * s.scale))
	s.set.Store(p.clock().UnixNano())
}

// EmitKey has no Prometheus equivalent; like go-metrics' own Prometheus
// sink, it is dropped.
func (p *PromSink) EmitKey(key []string, val float32) {}

func (p *PromSink) IncrCounter(key []string, val float32) { p.IncrCounterWithLabels(key, val, nil) }

func (p *PromSink) IncrCounterWithLabels(key []string, val float32, labels []gometrics.Label) {
	s := p.get(kindCounter, key, labels)
	d := float64(val) * s.scale
	for {
		old := s.bits.Load()
		if s.bits.CompareAndSwap(old, math.Float64bits(math.Float64frombits(old)+d)) {
			return
		}
	}
}

func (p *PromSink) AddSample(key []string, val float32) { p.AddSampleWithLabels(key, val, nil) }

func (p *PromSink) AddSampleWithLabels(key []string, val float32, labels []gometrics.Label) {
	s := p.get(kindSummary, key, labels)
	s.mu.Lock()
	s.count++
	s.sum += float64(val) * s.scale
	s.mu.Unlock()
}

// declSink is the go-metrics sink behind Metrics.Declare: a counter or
// summary call creates the series in the PromSink at zero, and nothing
// else. Going through a go-metrics instance applies the same prefix and
// filters as real emissions.
type declSink struct{ p *PromSink }

func (d declSink) SetGauge([]string, float32)                              {}
func (d declSink) SetGaugeWithLabels([]string, float32, []gometrics.Label) {}
func (d declSink) EmitKey([]string, float32)                               {}
func (d declSink) IncrCounter(key []string, _ float32)                     { d.p.get(kindCounter, key, nil) }
func (d declSink) AddSample(key []string, _ float32)                       { d.p.get(kindSummary, key, nil) }
func (d declSink) IncrCounterWithLabels(key []string, _ float32, l []gometrics.Label) {
	d.p.get(kindCounter, key, l)
}
func (d declSink) AddSampleWithLabels(key []string, _ float32, l []gometrics.Label) {
	d.p.get(kindSummary, key, l)
}

func (p *PromSink) clock() time.Time {
	if p.now == nil {
		return time.Now()
	}
	return p.now()
}

// WriteTo writes every series in the Prometheus text exposition format
// (version 0.0.4), sorted by name and labels.
func (p *PromSink) WriteTo(w io.Writer) (int64, error) {
	ttl := p.GaugeTTL
	if ttl == 0 {
		ttl = DefaultGaugeTTL
	}
	cutoff := p.clock().Add(-ttl).UnixNano()
	var all []*series
	p.series.Range(func(k, v any) bool {
		s := v.(*series)
		if s.kind == kindGauge && ttl > 0 && s.set.Load() < cutoff {
			p.series.CompareAndDelete(k, v)
			return true
		}
		all = append(all, s)
		return true
	})
	slices.SortFunc(all, func(a, b *series) int {
		if c := strings.Compare(a.name, b.name); c != 0 {
			return c
		}
		if a.kind != b.kind {
			return int(a.kind) - int(b.kind)
		}
		return strings.Compare(a.labels, b.labels)
	})
	cw := &countWriter{w: bufio.NewWriter(w)}
	bw := cw.w.(*bufio.Writer)
	var last seriesKey
	for i, s := range all {
		name := s.name
		if i > 0 && name == last.name && s.kind != last.kind {
			// One name used as two types would make the exposition
			// invalid; keep both, the later one renamed.
			name += "_" + s.kind.String()
		}
		if i == 0 || s.name != last.name || s.kind != last.kind {
			bw.WriteString("# HELP " + name + " " + escapeHelp(s.help) + "\n")
			bw.WriteString("# TYPE " + name + " " + s.kind.String() + "\n")
		}
		last = s.seriesKey
		switch s.kind {
		case kindSummary:
			s.mu.Lock()
			count, sum := s.count, s.sum
			s.mu.Unlock()
			bw.WriteString(name + "_sum" + s.labels + " " + formatFloat(sum) + "\n")
			bw.WriteString(name + "_count" + s.labels + " " + strconv.FormatUint(count, 10) + "\n")
		default:
			bw.WriteString(name + s.labels + " " + formatFloat(math.Float64frombits(s.bits.Load())) + "\n")
		}
	}
	err := bw.Flush()
	return cw.n, err
}

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(b []byte) (int, error) {
	n, err := c.w.Write(b)
	c.n += int64(n)
	return n, err
}

func formatFloat(f float64) string {
	switch {
	case math.IsInf(f, 1):
		return "+Inf"
	case math.IsInf(f, -1):
		return "-Inf"
	case math.IsNaN(f):
		return "NaN"
	}
	return strconv.FormatFloat(f, 'g', -1, 64)
}

// promName joins a go-metrics key with '_' and replaces every character
// Prometheus does not allow, as go-metrics' prometheus sink does:
// ["upstream","rx_bytes"] is upstream_rx_bytes.
func promName(key []string) string {
	n := 0
	for _, k := range key {
		n += len(k) + 1
	}
	b := make([]byte, 0, n)
	for i, k := range key {
		if i > 0 {
			b = append(b, '_')
		}
		for j := 0; j < len(k); j++ {
			b = append(b, sanitizeByte(k[j], len(b) == 0, true))
		}
	}
	return string(b)
}

func sanitizeByte(c byte, first, colon bool) byte {
	switch {
	case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c == '_':
		return c
	case c >= '0' && c <= '9' && !first:
		return c
	case c == ':' && colon:
		return c
	}
	return '_'
}

func promLabels(labels []gometrics.Label) string {
	if len(labels) == 0 {
		return ""
	}
	var b strings.Builder
	b.WriteByte('{')
	for i, l := range labels {
		if i > 0 {
			b.WriteByte(',')
		}
		for j := 0; j < len(l.Name); j++ {
			b.WriteByte(sanitizeByte(l.Name[j], j == 0, false))
		}
		if l.Name == "" {
			b.WriteByte('_')
		}
		b.WriteString(`="`)
		for _, r := range l.Value {
			switch r {
			case '\\':
				b.WriteString(`\\`)
			case '"':
				b.WriteString(`\"`)
			case '\n':
				b.WriteString(`\n`)
			default:
				b.WriteRune(r)
			}
		}
		b.WriteByte('"')
	}
	b.WriteByte('}')
	return b.String()
}

func escapeHelp(s string) string {
	return strings.NewReplacer(`\`, `\\`, "\n", `\n`).Replace(s)
}
