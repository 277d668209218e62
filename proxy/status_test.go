package proxy

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"

	"github.com/straitproxy/strait/internal/watch"
	"github.com/straitproxy/strait/metrics"
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
	if !strings.Contains(b.String(), `watch_errors{watch="ca-roots"} 2`+"\n") || !strings.Contains(b.String(), `watch_errors{watch="intentions for web"} 1`+"\n") {
		t.Fatalf("metrics:\n%s", b.String())
	}
}

func TestHandshakeFailureLabels(t *testing.T) {
	for _, tc := range []struct {
		err           error
		reason, label string
	}{
		{&AuthzError{Err: errors.New("agent down")}, ReasonAuthzError, "authz_error"},
		{fmt.Errorf("x: %w", errDeadline()), ReasonHandshakeTimeout, "timeout"},
		{errors.New("tls: client didn't provide a certificate"), ReasonHandshakeFailed, "no_client_cert"},
		{errors.New("tls: first record does not look like a TLS handshake"), ReasonHandshakeFailed, "tls_error"},
	} {
		if r, l := handshakeFailure(tc.err); r != tc.reason || l != tc.label {
			t.Errorf("handshakeFailure(%v) = %s, %s; want %s, %s", tc.err, r, l, tc.reason, tc.label)
		}
	}
}
