package proxy

import (
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/straitproxy/strait/config"
)

// sinkApp accepts connections and reads them to EOF.
func sinkApp(tb testing.TB) string {
	return serveApp(tb, func(c net.Conn) { io.Copy(io.Discard, c) })
}

// BenchmarkSelfLoopUpload uploads through the proxy's upstream listener,
// its own public listener and into a sink: both halves of the proxy path
// (upstream side and public side) in one process, classic TLS and tunnel.
func BenchmarkSelfLoopUpload(b *testing.B) {
	for _, mode := range []struct {
		name string
		opt  []func(*Options)
	}{{"classic", nil}, {"tunnel", []func(*Options){withTunnels}}} {
		b.Run(mode.name, func(b *testing.B) {
			h := startHarness(b, AccessLogOff, config.Public{LocalServiceAddress: sinkApp(b)}, mode.opt...)
			c, err := net.Dial("unix", h.upSock)
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			buf := make([]byte, 128<<10)
			b.SetBytes(int64(len(buf)))
			cpu0 := cpuTime()
			b.ResetTimer()
			for range b.N {
				if _, err := c.Write(buf); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			b.ReportMetric(float64(cpuTime()-cpu0)/float64(int64(b.N)*int64(len(buf))), "cpu-ns/B")
		})
	}
}

// cpuTime is the process's user+system CPU time.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
