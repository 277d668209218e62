package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/straitproxy/strait/metrics"
	"github.com/straitproxy/strait/tlsutil"
	"github.com/straitproxy/strait/tunnel"
)

// AccessLog selects which connections get an access log line.
type AccessLog string

// Access log modes (-access-log).
const (
	AccessLogOff        AccessLog = "off"
	AccessLogOn         AccessLog = "on"
	AccessLogDeniedOnly AccessLog = "denied-only"
)

// ParseAccessLog validates an -access-log value; "" means
// AccessLogDeniedOnly.
func ParseAccessLog(s string) (AccessLog, error) {
	switch a := AccessLog(s); a {
	case "":
		return AccessLogDeniedOnly, nil
	case AccessLogOff, AccessLogOn, AccessLogDeniedOnly:
		return a, nil
	}
	return "", fmt.Errorf("%q: want off, on or denied-only", s)
}

// Close reasons of the access log ("reason" field). The handshake-failure
// label of the inbound.handshake_failed metric is finer (handshakeLabel).
const (
	ReasonDenied             = "denied"               // intentions refused the peer
	ReasonPlaintextRefused   = "plaintext_refused"    // plaintext to the application's port of a strict transparent proxy
	ReasonRevoked            = "revoked"              // intentions changed to deny the peer of an open connection, which strait closed
	ReasonAuthzError         = "authz_error"          // no decision could be made (agent unreachable with nothing cached)
	ReasonHandshakeTimeout   = "handshake_timeout"    // the peer did not finish its handshake within handshake_timeout_ms
	ReasonHandshakeFailed    = "handshake_failed"     // any other TLS failure; detail says which
	ReasonAppRefused         = "app_refused"          // the local application refused the connection
	ReasonAppUnreachable     = "app_unreachable"      // the local application could not be dialed otherwise (timeout, no route, no socket)
	ReasonUpstreamDialFailed = "upstream_dial_failed" // no endpoint of the upstream could be dialed
	ReasonClosed             = "closed"               // both sides finished normally (or one vanished without a reset)
	ReasonReset              = "reset"                // a side reset the connection
	ReasonReapedIdle         = "reaped_idle"          // half-closed and idle for -half-close-timeout
	ReasonShutdown           = "shutdown"             // closed by strait at the end of a drain
	ReasonError              = "error"                // another I/O error; detail says which
)

// accessRecord is one connection's access log line.
type accessRecord struct {
	dir      string // "inbound", "upstream" or "outbound"
	source   string // SPIFFE ID of the connecting service
	dest     string // destination service (inbound: ours; upstream: its name)
	endpoint string // inbound: the application's address; upstream: the endpoint dialed
	target   string // upstream: the discovery chain target dialed (its ID)
	remote   string // the accepted connection's peer address
	start    time.Time
	rx, tx   int64 // bytes from the accepted side, and back to it
	reason   string
	detail   string
	attempts int32 // upstream dials
	// limitKey groups refusal lines for the line limiter: the tunnel
	// (its remote address) for a stream, the source IP otherwise; ""
	// means unlimited.
	limitKey string
}

// isRefusal reports whether reason ends a connection before it was
// proxied (lines for those are rate-limited per tunnel or source).
func isRefusal(reason string) bool {
	switch reason {
	case ReasonDenied, ReasonAuthzError, ReasonPlaintextRefused, ReasonHandshakeTimeout, ReasonHandshakeFailed,
		ReasonAppRefused, ReasonAppUnreachable, ReasonMeshDestinationsOnly, ReasonOutboundLoop:
		return true
	}
	return false
}

// lineAllowed reports whether a refusal line of kind what for rec may be
// written; a suppressed one is counted. n is the number suppressed for
// the same key since the last line written.
func (p *Proxy) lineAllowed(rec *accessRecord, what string) (ok bool, n int64) {
	if rec.limitKey == "" {
		return true, 0
	}
	ok, n = p.lines.allow(rec.limitKey + "|" + what)
	if !ok {
		p.metrics.IncrCounter(metrics.LogSuppressed, 1, []metrics.Label{{Name: "reason", Value: what}})
	}
	return ok, n
}

func (p *Proxy) logAccess(r *accessRecord) {
	switch p.opts.AccessLog {
	case AccessLogOff:
		return
	case AccessLogDeniedOnly, "":
		// An authorization that could not be made refuses the peer too.
		if r.reason != ReasonDenied && r.reason != ReasonAuthzError && r.reason != ReasonRevoked && r.reason != ReasonPlaintextRefused &&
			r.reason != ReasonMeshDestinationsOnly {
			return
		}
	}
	var suppressed int64
	if isRefusal(r.reason) {
		ok, n := p.lineAllowed(r, "access_"+r.reason)
		if !ok {
			return
		}
		suppressed = n
	}
	args := []any{
		"direction", r.dir,
		"source", r.source,
		"destination", r.dest,
		"endpoint", r.endpoint,
		"remote", r.remote,
		"rx_bytes", r.rx,
		"tx_bytes", r.tx,
		"duration_ms", float64(time.Since(r.start).Microseconds()) / 1000,
		"reason", r.reason,
	}
	if r.dir == "upstream" || (r.dir == "outbound" && r.target != "") {
		args = append(args, "attempts", r.attempts, "target", r.target)
	}
	if r.detail != "" {
		args = append(args, "detail", r.detail)
	}
	if suppressed > 0 {
		args = append(args, "suppressed_before", suppressed)
	}
	p.access.Info("connection", args...)
}

// accessLogged reports whether the access log records reason.
func (p *Proxy) accessLogged(reason string) bool {
	switch p.opts.AccessLog {
	case AccessLogOff:
		return false
	case AccessLogOn:
		return true
	}
	return reason == ReasonDenied
}

// AuthzError is returned into the TLS handshake when no authorization
// decision could be made.
type AuthzError struct {
	Source tlsutil.Identity
	Err    error
}

func (e *AuthzError) Error() string {
	return fmt.Sprintf("authorization of %s failed: %v", e.Source, e.Err)
}

func (e *AuthzError) Unwrap() error { return e.Err }

// handshakeFailure classifies a failed inbound handshake (denials are
// handled before): the access log reason and the metric's reason label.
func handshakeFailure(err error) (reason, label string) {
	var az *AuthzError
	switch {
	case errors.As(err, &az):
		return ReasonAuthzError, "authz_error"
	case errors.Is(err, context.DeadlineExceeded):
		return ReasonHandshakeTimeout, "timeout"
	case errors.Is(err, context.Canceled):
		return ReasonShutdown, "shutdown"
	case errors.Is(err, tlsutil.ErrNoPeerCert),
		// crypto/tls refuses a client without a certificate itself
		// (RequireAnyClientCert), with an unexported error.
		strings.Contains(err.Error(), "didn't provide a certificate"):
		return ReasonHandshakeFailed, "no_client_cert"
	case errors.Is(err, tlsutil.ErrUntrustedChain):
		return ReasonHandshakeFailed, "untrusted_chain"
	case errors.Is(err, tlsutil.ErrWrongTrustDom):
		return ReasonHandshakeFailed, "wrong_trust_domain"
	case errors.Is(err, tlsutil.ErrNotServiceIdent), errors.Is(err, tlsutil.ErrUnknownForm), errors.Is(err, tlsutil.ErrNotSPIFFE):
		return ReasonHandshakeFailed, "not_a_service"
	case errors.Is(err, tlsutil.ErrNotReady):
		return ReasonHandshakeFailed, "not_ready"
	case errors.Is(err, tlsutil.ErrLeafExpired):
		return ReasonHandshakeFailed, "leaf_expired"
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, syscall.ECONNRESET):
		return ReasonHandshakeFailed, "peer_closed"
	}
	return ReasonHandshakeFailed, "tls_error"
}

// appDialFailure classifies a failed dial of the local application.
func appDialFailure(err error) string {
	if errors.Is(err, syscall.ECONNREFUSED) {
		return ReasonAppRefused
	}
	return ReasonAppUnreachable
}

// closeReason classifies how a proxied connection ended.
func closeReason(err error, l *listener) (reason, detail string) {
	switch {
	case err == nil:
		return ReasonClosed, ""
	case l.forced.Load():
		return ReasonShutdown, ""
	case errors.Is(err, os.ErrDeadlineExceeded):
		return ReasonReapedIdle, ""
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE), tunnel.IsReset(err):
		return ReasonReset, err.Error()
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, net.ErrClosed):
		return ReasonClosed, err.Error()
	}
	return ReasonError, err.Error()
}

// peerID is the verified SPIFFE ID of an inbound connection's peer.
func peerID(tc *tls.Conn) string {
	cs := tc.ConnectionState()
	if len(cs.PeerCertificates) == 0 || len(cs.PeerCertificates[0].URIs) == 0 {
		return ""
	}
	return cs.PeerCertificates[0].URIs[0].String()
}

func addrString(a net.Addr) string {
	if a == nil {
		return ""
	}
	return a.String()
}
