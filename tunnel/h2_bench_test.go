package tunnel

import (
	"io"
	"net/http"
	"testing"

	"golang.org/x/net/http2"
)

// BenchmarkBulkH2Connect is BenchmarkBulkStream over HTTP/2 CONNECT
// (x/net/http2, the HBONE way) on the same TLS connection, for the framing
// choice in docs/performance.md.
func BenchmarkBulkH2Connect(b *testing.B) {
	c, s := tlsPair(b)
	got := make(chan int64, 1)
	go (&http2.Server{MaxUploadBufferPerStream: StreamWindow}).ServeConn(s, &http2.ServeConnOpts{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		n, _ := io.CopyBuffer(io.Discard, r.Body, make([]byte, 32<<10))
		got <- n
	})})
	cc, err := (&http2.Transport{}).NewClientConn(c)
	if err != nil {
		b.Fatal(err)
	}
	pr, pw := io.Pipe()
	req, err := http.NewRequest(http.MethodConnect, "https://backend:443", pr)
	if err != nil {
		b.Fatal(err)
	}
	resp, err := cc.RoundTrip(req)
	if err != nil {
		b.Fatal(err)
	}
	defer resp.Body.Close()
	chunk := benchChunk
	b.SetBytes(int64(chunk))
	buf := make([]byte, chunk)
	cpu0 := cpuTime()
	b.ResetTimer()
	for range b.N {
		if _, err := pw.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	pw.Close()
	if n := <-got; n != int64(b.N)*int64(chunk) {
		b.Fatalf("read %d of %d", n, int64(b.N)*int64(chunk))
	}
	b.ReportMetric(float64(cpuTime()-cpu0)/float64(int64(b.N)*int64(chunk)), "cpu-ns/B")
}
