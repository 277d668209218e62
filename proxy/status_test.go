package proxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/straitproxy/strait/internal/watch"
	"github.com/straitproxy/strait/metrics"
	"github.com/straitproxy/strait/tlsutil"
)

// TestWatchTracker: failing watches are listed (network failures as
// "agent unreachable"), a success clears the entry, a stopped watch is
// forgotten, and every failure counts in watch.errors.
func TestWatchTracker(t *testing.T) {
	m := metrics.Discard()
	w := newWatchTracker(m)
	refused := fmt.Errorf("fetching CA roots: %w", &net.OpError{Op: "dial", Net: "tcp", Err: errors.New("connect: connection refused")})
	w.WatchResult("ca-roots", refused)
	w.WatchResult("ca-roots", refused)
	w.WatchResult("intentions for web", errors.New("Unexpected response code: 500 (rpc error: No cluster leader)"))
	w.WatchResult("leaf web", nil)
	got := w.failing()
	if len(got) != 2 || !strings.HasPrefix(got[0], "agent error: intentions for web: Unexpected response code: 500") ||
		!strings.HasPrefix(got[1], "agent unreachable: ca-roots: fetching CA roots") || !strings.Contains(got[1], "2 failures") {
		t.Fatalf("failing() = %q", got)
	}
	w.WatchResult("ca-roots", nil)
	w.WatchResult("intentions for web", watch.ErrStopped)
	if got := w.failing(); len(got) != 0 {
		t.Fatalf("after recovery and stop: %q", got)
	}
	var b bytes.Buffer
	m.WritePrometheus(&b)
	if !strings.Contains(b.String(), `watch_errors_total{watch="ca-roots"} 2`+"\n") || !strings.Contains(b.String(), `watch_errors_total{watch="intentions for web"} 1`+"\n") {
		t.Fatalf("metrics:\n%s", b.String())
	}
}

func TestHandshakeFailureLabels(t *testing.T) {
	seen := map[string]bool{}
	for _, tc := range []struct {
		err           error
		reason, label string
	}{
		{&AuthzError{Err: errors.New("agent down")}, ReasonAuthzError, "authz_error"},
		{fmt.Errorf("x: %w", errDeadline()), ReasonHandshakeTimeout, "timeout"},
		{errors.New("tls: client didn't provide a certificate"), ReasonHandshakeFailed, "no_client_cert"},
		{errors.New("tls: first record does not look like a TLS handshake"), ReasonHandshakeFailed, "tls_error"},
		{fmt.Errorf("x: %w", tlsutil.ErrNoPeerCert), ReasonHandshakeFailed, "no_client_cert"},
		{fmt.Errorf("x: %w", tlsutil.ErrUntrustedChain), ReasonHandshakeFailed, "untrusted_chain"},
		{fmt.Errorf("x: %w", tlsutil.ErrWrongTrustDom), ReasonHandshakeFailed, "wrong_trust_domain"},
		{fmt.Errorf("x: %w", tlsutil.ErrNotServiceIdent), ReasonHandshakeFailed, "not_a_service"},
		{fmt.Errorf("x: %w", tlsutil.ErrNotReady), ReasonHandshakeFailed, "not_ready"},
		{fmt.Errorf("x: %w", tlsutil.ErrLeafExpired), ReasonHandshakeFailed, "leaf_expired"},
		{fmt.Errorf("x: %w", io.EOF), ReasonHandshakeFailed, "peer_closed"},
		{fmt.Errorf("x: %w", context.Canceled), ReasonShutdown, "shutdown"},
	} {
		r, l := handshakeFailure(tc.err)
		if r != tc.reason || l != tc.label {
			t.Errorf("handshakeFailure(%v) = %s, %s; want %s, %s", tc.err, r, l, tc.reason, tc.label)
		}
		seen[l] = true
	}
	// Every label is declared at zero at start, and every declared one
	// can occur.
	for _, r := range metrics.HandshakeFailedReasons {
		if !seen[r] {
			t.Errorf("metrics.HandshakeFailedReasons has %q, which handshakeFailure never returns here", r)
		}
		delete(seen, r)
	}
	if len(seen) > 0 {
		t.Errorf("handshakeFailure labels missing from metrics.HandshakeFailedReasons: %v", seen)
	}
	for _, err := range []error{syscall.ECONNREFUSED, errors.New("no route")} {
		if r := appDialFailure(err); !slices.Contains(metrics.AppDialFailedReasons, r) {
			t.Errorf("appDialFailure(%v) = %q, not in metrics.AppDialFailedReasons", err, r)
		}
	}
}
