package integration

import (
	"bufio"
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestHostileTunnelPeer: an allowed peer (a real SPIFFE leaf from the
// agent) opens a strait-mux/2 tunnel to a real strait and opens 2,000
// streams that strait refuses (they name another service), each carrying
// as much data as the protocol lets it send, and never finishes any of
// them. strait's RSS grows by less than 64 MiB, it writes fewer than 50
// log lines about them, and it keeps serving the pair's normal traffic.
// The hostile peer writes yamux frames by hand: it is not strait.
func TestHostileTunnelPeer(t *testing.T) {
	t.Parallel()
	if !straitHasAdmin {
		t.Skip("strait binary has no admin endpoint")
	}
	a := startAgent(t)
	const key = 0x1f
	on := []string{"-tunnels", "on"}
	p := startStraitPairArgs(t, a, modeEcho, key, on, on)
	svc := nativeService(t, a, uniq("intruder"))
	cert, err := svc.ServerTLSConfig().GetCertificate(&tls.ClientHelloInfo{})
	if err != nil {
		t.Fatal(err)
	}
	tc, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", p.publicAddr, &tls.Config{
		Certificates: []tls.Certificate{*cert}, InsecureSkipVerify: true, NextProtos: []string{"strait-mux/2"},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer tc.Close()
	if got := tc.ConnectionState().NegotiatedProtocol; got != "strait-mux/2" {
		t.Fatalf("negotiated %q, want strait-mux/2", got)
	}
	go func() { // read and drop what strait sends (window updates, resets)
		b := make([]byte, 64<<10)
		for {
			if _, err := tc.Read(b); err != nil {
				return
			}
		}
	}()

	rssBefore := rssKiB(t, p.server.Pid())
	linesBefore := strings.Count(p.server.out.String(), "\n")
	// One frame per stream: SYN, the stream header naming another service,
	// and payload up to the 16 KiB window strait-mux/2 starts a stream with.
	const streams, window = 2000, 16 << 10
	other := "not-" + p.dst
	hdr := append([]byte{2, byte(len(other))}, other...)
	w := bufio.NewWriterSize(tc, 256<<10)
	frame := make([]byte, 12+window)
	for i := range streams {
		id := uint32(2*i + 1)
		frame[0], frame[1] = 0, 0                       // version, data
		binary.BigEndian.PutUint16(frame[2:4], 1)       // SYN
		binary.BigEndian.PutUint32(frame[4:8], id)      // stream
		binary.BigEndian.PutUint32(frame[8:12], window) // length
		copy(frame[12:], hdr)
		if _, err := w.Write(frame); err != nil {
			t.Fatalf("stream %d: %v", i, err)
		}
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	// Every stream has been handled once strait has counted its denial.
	eventually(t, 30*time.Second, func() error {
		series, err := promSeries(p.server, "inbound_denied_total")
		if err != nil {
			return err
		}
		var n float64
		for _, v := range series {
			n += v
		}
		if n < streams {
			return fmt.Errorf("%v of %d streams denied so far", n, streams)
		}
		return nil
	})
	grown := rssKiB(t, p.server.Pid()) - rssBefore
	lines := strings.Count(p.server.out.String(), "\n") - linesBefore
	t.Logf("%d refused streams of %d KiB: strait RSS +%d KiB, %d log lines", streams, window>>10, grown, lines)
	// The bound is 64 MiB; a strait built with -race (STRAIT_RACE=1, as
	// make test does) keeps the race detector's shadow memory too, which
	// measured 4x the plain build's growth here (+9 MiB plain, +36-40 MiB
	// race-built), so it gets twice the room.
	limit := 64 << 10
	if os.Getenv("STRAIT_RACE") == "1" {
		limit *= 2
	}
	if grown > limit {
		t.Errorf("strait's RSS grew by %d MiB (limit %d MiB)", grown>>10, limit>>10)
	}
	if lines >= 50 {
		t.Errorf("%d log lines for %d refused streams", lines, streams)
	}
	if err := echoVia("tcp", p.upstreamAddr, 64<<10, key); err != nil {
		t.Fatalf("the pair's own traffic after the hostile peer: %v", err)
	}
}

// rssKiB is a process's resident set size.
func rssKiB(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "VmRSS:" {
			n, err := strconv.Atoi(f[1])
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatalf("no VmRSS in /proc/%d/status", pid)
	return 0
}
