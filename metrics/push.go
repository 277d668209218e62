package metrics

import (
	"context"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"

	gometrics "github.com/armon/go-metrics"
	"github.com/hashicorp/go-hclog"
)

// sender is the one goroutine of a push sink: lines go through a bounded
// queue (dropped when full, so an emitting goroutine never blocks or
// makes a system call) and are packed into datagrams, or stream writes,
// of at most max bytes every flushInterval. Close sends what is queued
// and returns once the goroutine has exited.
//
// strait has its own rather than go-metrics' StatsdSink and StatsiteSink
// because those start a goroutine that cannot be joined, leak their
// socket on Shutdown, panic on an emission after Shutdown (send on a
// closed channel) and log through the global logger.
type sender struct {
	what          string // "statsd", "statsite", "dogstatsd"
	network, addr string
	max           int
	log           hclog.Logger

	queue  chan string
	ctx    context.Context
	cancel context.CancelFunc
	exited chan struct{}
	once   sync.Once
}

const (
	pushQueueLen      = 4096
	pushFlushInterval = 100 * time.Millisecond
	pushRetryAfter    = 5 * time.Second // as go-metrics' sinks wait after a failure
	pushWriteTimeout  = 5 * time.Second
	statsdMaxPacket   = 1400 // go-metrics' statsdMaxLen
	streamChunk       = 8192
)

func newSender(what, network, addr string, max int, log hclog.Logger) *sender {
	s := &sender{what: what, network: network, addr: addr, max: max, log: log,
		queue: make(chan string, pushQueueLen), exited: make(chan struct{})}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	go s.run()
	return s
}

func (s *sender) push(line string) {
	select {
	case s.queue <- line:
	default: // full (or stopped): drop rather than block a connection
	}
}

// Close stops the sender after one last send and waits for it.
func (s *sender) Close() {
	s.once.Do(s.cancel)
	<-s.exited
}

func (s *sender) run() {
	defer close(s.exited)
	t := time.NewTicker(pushFlushInterval)
	defer t.Stop()
	var (
		conn    net.Conn
		buf     []byte
		failing bool
		retry   time.Time // no dial before this after a failure
		dialCtx = s.ctx
	)
	fail := func(msg string, err error) {
		if !failing {
			s.log.Warn(msg+"; dropping metrics until it is back", "sink", s.what, "addr", s.addr, "error", err)
		}
		failing = true
		retry = time.Now().Add(pushRetryAfter)
		if conn != nil {
			conn.Close()
			conn = nil
		}
	}
	send := func() {
		defer func() { buf = buf[:0] }()
		if len(buf) == 0 {
			return
		}
		if conn == nil {
			if time.Now().Before(retry) {
				return
			}
			d := net.Dialer{Timeout: pushWriteTimeout}
			c, err := d.DialContext(dialCtx, s.network, s.addr)
			if err != nil {
				fail(s.what+" unreachable", err)
				return
			}
			conn = c
		}
		conn.SetWriteDeadline(time.Now().Add(pushWriteTimeout))
		if _, err := conn.Write(buf); err != nil {
			fail("sending to "+s.what+" failed", err)
			return
		}
		if failing {
			s.log.Info(s.what+" reachable again", "addr", s.addr)
			failing = false
		}
	}
	add := func(line string) {
		if len(buf)+len(line) > s.max {
			send()
		}
		buf = append(buf, line...)
	}
	defer func() {
		if conn != nil {
			conn.Close()
		}
	}()
	for {
		select {
		case <-s.ctx.Done():
			// Send what was queued before Close (only this goroutine
			// reads the queue), with a dial not cancelled by Close.
			dialCtx = context.Background()
			for n := len(s.queue); n > 0; n-- {
				add(<-s.queue)
			}
			send()
			return
		case line := <-s.queue:
			add(line)
		case <-t.C:
			send()
		}
	}
}

// statsdSink writes go-metrics' statsd line protocol, byte for byte as
// go-metrics' StatsdSink and StatsiteSink do (labels' values appended to
// the key, ':' and ' ' replaced by '_', values with %f), over UDP
// (statsd) or TCP (statsite).
type statsdSink struct{ *sender }

func newStatsdSink(addr string, log hclog.Logger) statsdSink {
	return statsdSink{newSender("statsd", "udp", addr, statsdMaxPacket, log)}
}

func newStatsiteSink(addr string, log hclog.Logger) statsdSink {
	return statsdSink{newSender("statsite", "tcp", addr, streamChunk, log)}
}

func (s statsdSink) line(key []string, val float32, typ string, labels []gometrics.Label) string {
	var b strings.Builder
	for i, k := range key {
		if i > 0 {
			b.WriteByte('.')
		}
		b.WriteString(k)
	}
	for _, l := range labels {
		b.WriteByte('.')
		b.WriteString(l.Value)
	}
	flat := strings.Map(func(r rune) rune {
		if r == ':' || r == ' ' {
			return '_'
		}
		return r
	}, b.String())
	return flat + ":" + strconv.FormatFloat(float64(val), 'f', 6, 32) + "|" + typ + "\n"
}

func (s statsdSink) SetGauge(key []string, val float32) { s.push(s.line(key, val, "g", nil)) }
func (s statsdSink) SetGaugeWithLabels(key []string, val float32, labels []gometrics.Label) {
	s.push(s.line(key, val, "g", labels))
}
func (s statsdSink) EmitKey(key []string, val float32)     { s.push(s.line(key, val, "kv", nil)) }
func (s statsdSink) IncrCounter(key []string, val float32) { s.push(s.line(key, val, "c", nil)) }
func (s statsdSink) IncrCounterWithLabels(key []string, val float32, labels []gometrics.Label) {
	s.push(s.line(key, val, "c", labels))
}
func (s statsdSink) AddSample(key []string, val float32) { s.push(s.line(key, val, "ms", nil)) }
func (s statsdSink) AddSampleWithLabels(key []string, val float32, labels []gometrics.Label) {
	s.push(s.line(key, val, "ms", labels))
}
