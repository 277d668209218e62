package integration

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// TestStraitToStrait: strait upstream -> strait public listener -> app.
// Default-allow (no intentions, ACLs off) carries data both ways byte-exact;
// a deny intention refuses new connections before the app is dialed and
// strait logs why; allow, deny again and deleting the intention are all
// picked up without restarting anything.
func TestStraitToStrait(t *testing.T) {
	t.Parallel()
	a := startAgent(t)
	const key = 0x3c
	p := startStraitPair(t, a, modeEcho, key)
	serverPid, clientPid := p.server.Pid(), p.client.Pid()

	// Default allow: several multi-KB payloads, byte exact, on one
	// connection and on fresh ones.
	c, err := net.Dial("tcp", p.upstreamAddr)
	if err != nil {
		t.Fatal(err)
	}
	for _, size := range []int{1, 4 * 1024, 64*1024 + 7, 1 << 20} {
		if err := roundTrip(c, randomBytes(t, size), key, 30*time.Second); err != nil {
			t.Fatalf("default allow, %d bytes: %v", size, err)
		}
	}
	c.Close()
	for i := 0; i < 5; i++ {
		if err := echoVia("tcp", p.upstreamAddr, 16*1024, key); err != nil {
			t.Fatalf("default allow, fresh connection %d: %v", i, err)
		}
	}

	// Two strait peers use tunnels by default: the connections above were
	// streams, and so are the denied ones below (refused per stream).
	if st := getTunnelStats(t, p.client); st.Tunnels.OutboundTunnels < 1 {
		t.Fatalf("strait pair without tunnels: %+v", *st.Tunnels)
	}

	// Deny: wait until strait has observed it, then every new connection
	// is refused and the app is never dialed.
	a.setIntention(t, p.src, p.dst, api.IntentionActionDeny)
	eventually(t, 30*time.Second, func() error { return refusedVia("tcp", p.upstreamAddr) })
	before := p.app.Accepts()
	for i := 0; i < 5; i++ {
		if err := refusedVia("tcp", p.upstreamAddr); err != nil {
			t.Fatalf("denied, connection %d: %v", i, err)
		}
	}
	consistently(t, time.Second, func() error {
		if n := p.app.Accepts(); n != before {
			return fmt.Errorf("app accepted %d connections while the intention denied them", n-before)
		}
		return nil
	})
	if line := deniedLogLine(p.server.Output(), p.src); line == "" {
		t.Errorf("strait public listener did not log the denial of %s (want a line mentioning the source and why it was denied)", p.src)
	} else {
		t.Logf("denial logged: %s", line)
	}

	// Allow explicitly.
	a.setIntention(t, p.src, p.dst, api.IntentionActionAllow)
	eventually(t, 30*time.Second, func() error { return echoVia("tcp", p.upstreamAddr, 32*1024, key) })

	// Deny again, then delete: back to the default (allow).
	a.setIntention(t, p.src, p.dst, api.IntentionActionDeny)
	eventually(t, 30*time.Second, func() error { return refusedVia("tcp", p.upstreamAddr) })
	a.deleteIntentions(t, p.dst)
	eventually(t, 30*time.Second, func() error { return echoVia("tcp", p.upstreamAddr, 32*1024, key) })

	if p.server.exited() || p.client.exited() || p.server.Pid() != serverPid || p.client.Pid() != clientPid {
		t.Fatalf("a strait process exited during the test")
	}
}

// deniedLogLine returns the first log line that mentions src and a denial.
func deniedLogLine(log, src string) string {
	for _, line := range strings.Split(log, "\n") {
		l := strings.ToLower(line)
		if !strings.Contains(l, strings.ToLower(src)) {
			continue
		}
		for _, w := range []string{"denied", "deny", "not authorized", "unauthorized"} {
			if strings.Contains(l, w) {
				return line
			}
		}
	}
	return ""
}

// TestStraitHalfClose: the client sends N bytes and half-closes; the app
// reads to EOF, then (after a delay) replies with the byte count and
// sha256; the client still receives the whole reply through the strait pair.
func TestStraitHalfClose(t *testing.T) {
	t.Parallel()
	a := startAgent(t)
	p := startStraitPair(t, a, modeDigest, 0)

	for _, size := range []int{0, 1, 3 << 20} {
		payload := randomBytes(t, size)
		want := newDigest()
		want.Write(payload)

		var got string
		// The first connection may race strait's discovery of the
		// destination; a refused attempt is retried, a wrong answer is not.
		err := poll(30*time.Second, func() error {
			c, err := net.DialTimeout("tcp", p.upstreamAddr, 5*time.Second)
			if err != nil {
				return err
			}
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(30 * time.Second))
			if _, err := c.Write(payload); err != nil {
				return fmt.Errorf("write: %w", err)
			}
			if err := c.(*net.TCPConn).CloseWrite(); err != nil {
				return fmt.Errorf("CloseWrite: %w", err)
			}
			reply, err := io.ReadAll(bufio.NewReader(c))
			if err != nil {
				return fmt.Errorf("reading the reply after our half-close: %w (got %q)", err, reply)
			}
			got = string(reply)
			if got == "" {
				return fmt.Errorf("connection closed with no reply after our half-close (app accepts so far: %d)", p.app.Accepts())
			}
			return nil
		})
		if err != nil {
			t.Fatalf("%d bytes: %v", size, err)
		}
		if got != want.String()+"\n" {
			t.Fatalf("%d bytes: reply %q, want %q", size, got, want.String()+"\n")
		}
	}
	// Over tunnels (the default between strait peers).
	if st := getTunnelStats(t, p.server); st.Tunnels.InboundTunnels < 1 {
		t.Fatalf("half-close tested without tunnels: %+v", *st.Tunnels)
	}
}
