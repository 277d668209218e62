package metrics

import (
	"net"
	"strconv"
	"strings"
	"sync"
	"time"

	gometrics "github.com/armon/go-metrics"
	"github.com/hashicorp/go-hclog"
)

// dogStatsd is a DogStatsD sink: the statsd line protocol with labels as
// "#name:value" tags, the way go-metrics' datadog sink (which Consul uses)
// writes them, including splicing the hostname go-metrics puts into gauge
// names back out of the name. It is ours rather than go-metrics/datadog so
// that no DataDog client module is linked and so that an emitting goroutine
// never makes a system call: lines go through a bounded queue (dropped when
// full, as go-metrics' statsd sink does) to one goroutine that packs them
// into datagrams every flushInterval.
type dogStatsd struct {
	network, addr string
	hostname      string
	tags          string // ",a:b,c:d" (global tags, pre-rendered) or ""
	log           hclog.Logger

	queue chan string
	done  chan struct{}
	once  sync.Once
}

const (
	dogQueueLen      = 4096
	dogFlushInterval = 100 * time.Millisecond
	dogMaxPacketUDP  = 1432 // DataDog's default: fits a 1500 MTU
	dogMaxPacketUnix = 8192
)

func newDogStatsd(addr, hostname string, tags []string, log hclog.Logger) *dogStatsd {
	d := &dogStatsd{network: "udp", addr: addr, hostname: hostname, log: log,
		queue: make(chan string, dogQueueLen), done: make(chan struct{})}
	if p, ok := strings.CutPrefix(addr, "unix://"); ok {
		d.network, d.addr = "unixgram", p
	}
	if len(tags) > 0 {
		d.tags = "," + strings.Join(tags, ",")
	}
	go d.run()
	return d
}

// Close stops the sender; later metrics are dropped.
func (d *dogStatsd) Close() { d.once.Do(func() { close(d.done) }) }

func (d *dogStatsd) SetGauge(key []string, val float32) { d.SetGaugeWithLabels(key, val, nil) }
func (d *dogStatsd) SetGaugeWithLabels(key []string, val float32, labels []gometrics.Label) {
	d.push(key, val, "g", labels)
}

// EmitKey has no DogStatsD type; dropped, as go-metrics' datadog sink does.
func (d *dogStatsd) EmitKey(key []string, val float32) {}

func (d *dogStatsd) IncrCounter(key []string, val float32) { d.IncrCounterWithLabels(key, val, nil) }
func (d *dogStatsd) IncrCounterWithLabels(key []string, val float32, labels []gometrics.Label) {
	d.push(key, val, "c", labels)
}

func (d *dogStatsd) AddSample(key []string, val float32) { d.AddSampleWithLabels(key, val, nil) }
func (d *dogStatsd) AddSampleWithLabels(key []string, val float32, labels []gometrics.Label) {
	d.push(key, val, "ms", labels)
}

func (d *dogStatsd) push(key []string, val float32, typ string, labels []gometrics.Label) {
	line := d.format(key, val, typ, labels)
	select {
	case d.queue <- line:
	default: // full: drop rather than block a connection
	}
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

func (d *dogStatsd) run() {
	max := dogMaxPacketUDP
	if d.network == "unixgram" {
		max = dogMaxPacketUnix
	}
	t := time.NewTicker(dogFlushInterval)
	defer t.Stop()
	var (
		conn    net.Conn
		buf     []byte
		failing bool
	)
	send := func() {
		if len(buf) == 0 {
			return
		}
		if conn == nil {
			c, err := net.Dial(d.network, d.addr)
			if err != nil {
				if !failing {
					d.log.Warn("dogstatsd unreachable; dropping metrics until it is back", "addr", d.addr, "error", err)
				}
				failing = true
				buf = buf[:0]
				return
			}
			conn = c
		}
		if _, err := conn.Write(buf); err != nil {
			if !failing {
				d.log.Warn("sending to dogstatsd failed; dropping metrics until it is back", "addr", d.addr, "error", err)
			}
			failing = true
			conn.Close()
			conn = nil
		} else if failing {
			d.log.Info("dogstatsd reachable again", "addr", d.addr)
			failing = false
		}
		buf = buf[:0]
	}
	defer func() {
		if conn != nil {
			conn.Close()
		}
	}()
	for {
		select {
		case <-d.done:
			send()
			return
		case line := <-d.queue:
			if len(buf)+len(line) > max {
				send()
			}
			buf = append(buf, line...)
		case <-t.C:
			send()
		}
	}
}
