package proxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/straitproxy/strait/config"
)

// fakeMode is a mutual TLS mode an operator flips.
type fakeMode struct {
	mu         sync.Mutex
	permissive bool
	changed    chan struct{}
}

func newFakeMode(permissive bool) *fakeMode {
	return &fakeMode{permissive: permissive, changed: make(chan struct{})}
}
func (m *fakeMode) Run(ctx context.Context) { <-ctx.Done() }
func (m *fakeMode) Permissive() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.permissive
}
func (m *fakeMode) Changed() <-chan struct{} {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.changed
}
func (m *fakeMode) set(permissive bool) {
	m.mu.Lock()
	m.permissive = permissive
	close(m.changed)
	m.changed = make(chan struct{})
	m.mu.Unlock()
}

// plaintextDst stands in for iptables: connections from the client ports
// it was told about had "dialed" the application's port.
type plaintextDst struct {
	mu    sync.Mutex
	ports map[int]bool
	app   int
}

func (d *plaintextDst) originalDst(c net.Conn) (netip.AddrPort, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	local := c.LocalAddr().(*net.TCPAddr).AddrPort()
	if d.ports[c.RemoteAddr().(*net.TCPAddr).Port] {
		return netip.AddrPortFrom(local.Addr(), uint16(d.app)), nil
	}
	return local, nil
}

// TestPermissivePlaintext: on a transparent proxy, a connection that had
// dialed the application's port reaches the application in plaintext
// while the service is permissive (counted, logged as plaintext), while
// mesh peers still take mTLS; when the service turns strict the open
// plaintext connection is closed and new ones are refused and counted.
func TestPermissivePlaintext(t *testing.T) {
	t.Parallel()
	mode := newFakeMode(true)
	dst := &plaintextDst{ports: map[int]bool{}, app: 9999}
	h := startHarness(t, AccessLogOn, config.Public{Transparent: true, ApplicationPort: 9999}, func(o *Options) {
		o.OriginalDst = dst.originalDst
		o.Parts = func(*config.Config) Parts { return Parts{MTLSMode: mode} }
	})
	addr := h.p.PublicAddr().String()
	// Mark the client port before the proxy reads it: dial a raw socket
	// bound to a known local port.
	dialMarked := func() (net.Conn, *bufio.Reader, error) {
		t.Helper()
		l, err := net.Listen("tcp", "127.0.0.1:0") // reserve a port number
		if err != nil {
			t.Fatal(err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		l.Close()
		dst.mu.Lock()
		dst.ports[port] = true
		dst.mu.Unlock()
		d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port}}
		c, err := d.Dial("tcp", addr)
		if err != nil {
			return nil, nil, err
		}
		return c, bufio.NewReader(c), nil
	}

	plain, pr, err := dialMarked()
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	if err := echoOnce(plain, pr, "plaintext hello", 10*time.Second); err != nil {
		t.Fatalf("plaintext while permissive: %v", err)
	}
	// A mesh peer on the same listener still takes the mTLS path.
	tc, err := h.dialPublic("web")
	if err != nil {
		t.Fatal(err)
	}
	roundTrip(t, tc, "mesh")
	if line := h.access.next(t); line["source"] == SourcePlaintext {
		t.Fatalf("mesh connection logged as plaintext: %v", line)
	}

	mode.set(false)
	if err := closedWithinTest(plain, pr, 10*time.Second); err != nil {
		t.Fatalf("open plaintext connection after the switch to strict: %v", err)
	}
	line := h.access.next(t)
	want(t, line, map[string]any{"source": SourcePlaintext, "reason": ReasonRevoked, "detail": "~strict"})

	// Refused with a reset, which may already be there when the dial
	// returns.
	if again, ar, err := dialMarked(); err == nil {
		defer again.Close()
		if err := closedWithinTest(again, ar, 10*time.Second); err != nil {
			t.Fatalf("new plaintext connection while strict: %v", err)
		}
	} else if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("new plaintext connection while strict: %v", err)
	}
	want(t, h.access.next(t), map[string]any{"source": SourcePlaintext, "reason": ReasonPlaintextRefused})

	p := h.prom()
	for _, w := range []string{`inbound_plaintext_total{dst="web"} 1`, `inbound_plaintext_refused_total{dst="web"} 1`, `inbound_revoked_total{src="plaintext",dst="web"} 1`, `inbound_plaintext_bytes_total{dst="web"} 30`} {
		if !strings.Contains(p, w) {
			t.Errorf("metrics lack %s:\n%s", w, grepLines(p, "plaintext"))
		}
	}
}

func closedWithinTest(c net.Conn, r *bufio.Reader, d time.Duration) error {
	c.SetReadDeadline(time.Now().Add(d))
	b, err := r.ReadByte()
	if err == nil {
		return fmt.Errorf("read %q, want the connection closed", b)
	}
	if isTimeout(err) {
		return err
	}
	return nil
}
