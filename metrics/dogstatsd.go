package metrics

import (
	"strconv"
	"strings"

	gometrics "github.com/armon/go-metrics"
	"github.com/hashicorp/go-hclog"
)

// dogStatsd is a DogStatsD sink: the statsd line protocol with labels as
// "#name:value" tags, the way go-metrics' datadog sink (which Consul uses)
// writes them, including splicing the hostname go-metrics puts into gauge
// names back out of the name. It is ours rather than go-metrics/datadog so
// that no DataDog client module is linked and so that an emitting goroutine
// never makes a system call: lines go through a sender (push.go).
type dogStatsd struct {
	*sender
	hostname string
	tags     string // ",a:b,c:d" (global tags, pre-rendered) or ""
}

const (
	dogMaxPacketUDP  = 1432 // DataDog's default: fits a 1500 MTU
	dogMaxPacketUnix = 8192
)

func newDogStatsd(addr, hostname string, tags []string, log hclog.Logger) *dogStatsd {
	network, max := "udp", dogMaxPacketUDP
	if p, ok := strings.CutPrefix(addr, "unix://"); ok {
		network, addr, max = "unixgram", p, dogMaxPacketUnix
	}
	d := &dogStatsd{sender: newSender("dogstatsd", network, addr, max, log), hostname: hostname}
	if len(tags) > 0 {
		d.tags = "," + strings.Join(tags, ",")
	}
	return d
}

func (d *dogStatsd) SetGauge(key []string, val float32) { d.SetGaugeWithLabels(key, val, nil) }
func (d *dogStatsd) SetGaugeWithLabels(key []string, val float32, labels []gometrics.Label) {
	d.emit(key, val, "g", labels)
}

// EmitKey has no DogStatsD type; dropped, as go-metrics' datadog sink does.
func (d *dogStatsd) EmitKey(key []string, val float32) {}

func (d *dogStatsd) IncrCounter(key []string, val float32) { d.IncrCounterWithLabels(key, val, nil) }
func (d *dogStatsd) IncrCounterWithLabels(key []string, val float32, labels []gometrics.Label) {
	d.emit(key, val, "c", labels)
}

func (d *dogStatsd) AddSample(key []string, val float32) { d.AddSampleWithLabels(key, val, nil) }
func (d *dogStatsd) AddSampleWithLabels(key []string, val float32, labels []gometrics.Label) {
	d.emit(key, val, "ms", labels)
}

func (d *dogStatsd) emit(key []string, val float32, typ string, labels []gometrics.Label) {
	d.push(d.format(key, val, typ, labels))
}

// format renders one line: name:value|type|#tags. The key is not modified.
func (d *dogStatsd) format(key []string, val float32, typ string, labels []gometrics.Label) string {
	var b strings.Builder
	first := true
	spliced := false
	for _, k := range key {
		if !spliced && d.hostname != "" && k == d.hostname {
			spliced = true // go-metrics put it there; DogStatsD tags the host itself
			continue
		}
		if !first {
			b.WriteByte('.')
		}
		first = false
		b.WriteString(dogSanitize(k))
	}
	b.WriteByte(':')
	b.WriteString(strconv.FormatFloat(float64(val), 'f', -1, 32))
	b.WriteByte('|')
	b.WriteString(typ)
	if len(labels) > 0 || d.tags != "" {
		b.WriteString("|#")
		for i, l := range labels {
			if i > 0 {
				b.WriteByte(',')
			}
			b.WriteString(dogSanitize(l.Name))
			if l.Value != "" {
				b.WriteByte(':')
				b.WriteString(dogSanitize(l.Value))
			}
		}
		if len(labels) == 0 {
			b.WriteString(d.tags[1:])
		} else {
			b.WriteString(d.tags)
		}
	}
	b.WriteByte('\n')
	return b.String()
}

func dogSanitize(s string) string {
	return strings.Map(func(r rune) rune {
		switch r {
		case ':', ' ', '|', ',', '#', '\n':
			return '_'
		}
		return r
	}, s)
}
