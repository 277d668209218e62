package dataplane

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/straitproxy/strait/metrics"
)

// Servers is the set of Consul servers that -addresses names, and the one
// in use. Every request (HTTP and gRPC) goes to the current server; a
// connection failure moves to the next one, and a full round of failures
// resolves -addresses again (a DNS name's answers change as servers come
// and go).
type Servers struct {
	spec    string
	resolve func(ctx context.Context, host string) ([]string, error)
	log     hclog.Logger
	metrics Counter // set by New; nil counts nothing

	mu      sync.Mutex
	addrs   []string // resolved IPs (or host names that did not resolve to IPs)
	cur     int
	failed  int // consecutive failures since the last success
	lastRes time.Time

	switches atomic.Uint64
}

// NewServers parses spec: host names or IPs separated by spaces or commas,
// a DNS name that resolves to the servers, or exec=<command> whose output
// lists them (as consul-dataplane's -addresses). resolve nil means the
// system resolver.
func NewServers(spec string, resolve func(ctx context.Context, host string) ([]string, error), log hclog.Logger) (*Servers, error) {
	if strings.TrimSpace(spec) == "" {
		return nil, errors.New("no server addresses")
	}
	if !strings.HasPrefix(spec, "exec=") {
		for _, h := range splitAddrs(spec) {
			if strings.ContainsAny(h, "/:") && net.ParseIP(h) == nil {
				return nil, fmt.Errorf("address %q: want a host name or an IP, without a port (-http-port and -grpc-port give the ports)", h)
			}
		}
	}
	if resolve == nil {
		resolve = net.DefaultResolver.LookupHost
	}
	if log == nil {
		log = hclog.NewNullLogger()
	}
	return &Servers{spec: spec, resolve: resolve, log: log}, nil
}

func splitAddrs(s string) []string {
	return strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == ' ' || r == '\t' || r == '\n' })
}

// Resolve (re)builds the server list from the spec. Names that do not
// resolve are kept as they are, so that a dial names them in its error.
func (s *Servers) Resolve(ctx context.Context) error {
	var hosts []string
	if cmd, ok := strings.CutPrefix(s.spec, "exec="); ok {
		ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		out, err := exec.CommandContext(ctx, "/bin/sh", "-c", cmd).Output()
		if err != nil {
			return fmt.Errorf("running -addresses %q: %w", s.spec, err)
		}
		hosts = splitAddrs(string(out))
	} else {
		hosts = splitAddrs(s.spec)
	}
	var addrs []string
	seen := map[string]bool{}
	for _, h := range hosts {
		ips := []string{h}
		if net.ParseIP(h) == nil {
			rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			got, err := s.resolve(rctx, h)
			cancel()
			if err != nil || len(got) == 0 {
				s.log.Warn("server address does not resolve", "address", h, "error", err)
			} else {
				ips = got
			}
		}
		for _, ip := range ips {
			if !seen[ip] {
				seen[ip] = true
				addrs = append(addrs, ip)
			}
		}
	}
	if len(addrs) == 0 {
		return fmt.Errorf("-addresses %q names no server", s.spec)
	}
	s.mu.Lock()
	prev := ""
	if len(s.addrs) > 0 {
		prev = s.addrs[s.cur]
	}
	s.addrs, s.cur, s.lastRes = addrs, 0, time.Now()
	for i, a := range addrs { // stay on the server in use if it is still listed
		if a == prev {
			s.cur = i
		}
	}
	s.mu.Unlock()
	s.log.Debug("servers", "addresses", strings.Join(addrs, ","))
	return nil
}

// Current returns the server in use.
func (s *Servers) Current() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.addrs) == 0 {
		return ""
	}
	return s.addrs[s.cur]
}

// All returns the resolved servers.
func (s *Servers) All() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.addrs...)
}

// Switches counts the moves from one server to another.
func (s *Servers) Switches() uint64 { return s.switches.Load() }

// Fail reports that addr could not be reached: if it is still the current
// server, the next one becomes current. After a whole round of failures
// the addresses are resolved again (at most every 5 seconds).
func (s *Servers) Fail(ctx context.Context, addr string, err error) {
	s.mu.Lock()
	if len(s.addrs) == 0 || s.addrs[s.cur] != addr {
		s.mu.Unlock()
		return
	}
	s.cur = (s.cur + 1) % len(s.addrs)
	s.failed++
	next := s.addrs[s.cur]
	again := s.failed >= len(s.addrs) && time.Since(s.lastRes) > 5*time.Second
	if again {
		s.failed = 0
	}
	s.mu.Unlock()
	s.switches.Add(1)
	if s.metrics != nil {
		s.metrics.IncrCounter(metrics.DataplaneServerSwitches, 1, nil)
	}
	s.log.Warn("server unreachable; moving to the next", "server", addr, "next", next, "error", err)
	if again {
		if err := s.Resolve(ctx); err != nil {
			s.log.Error("resolving the server addresses again", "error", err)
		}
	}
}

// Succeed reports a request answered by addr.
func (s *Servers) Succeed(addr string) {
	s.mu.Lock()
	if len(s.addrs) > 0 && s.addrs[s.cur] == addr {
		s.failed = 0
	}
	s.mu.Unlock()
}

// Dial connects to port on the current server, moving on to the next
// servers (one round) while connections fail.
func (s *Servers) Dial(ctx context.Context, port int) (net.Conn, string, error) {
	var d net.Dialer
	n := len(s.All())
	var lastErr error
	for range max(n, 1) {
		addr := s.Current()
		c, err := d.DialContext(ctx, "tcp", net.JoinHostPort(addr, strconv.Itoa(port)))
		if err == nil {
			return c, addr, nil
		}
		lastErr = err
		if ctx.Err() != nil {
			return nil, addr, err
		}
		s.Fail(ctx, addr, err)
	}
	return nil, "", fmt.Errorf("dialing the servers: %w", lastErr)
}

// serverTransport sends each request to the current server (its URL's host
// is replaced) with the current ACL token, moving on to the next server
// when one cannot be reached: requests without a body, or with a
// replayable one, are retried there at once.
type serverTransport struct {
	servers *Servers
	port    int
	next    http.RoundTripper
	token   func() string
	// revoked is told about responses that say the token is gone.
	revoked func()
}

func (t *serverTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	n := max(len(t.servers.All()), 1)
	var lastErr error
	for attempt := range n {
		if attempt > 0 && r.Body != nil && r.Body != http.NoBody {
			if r.GetBody == nil {
				break
			}
		}
		addr := t.servers.Current()
		rr := r.Clone(r.Context())
		rr.URL.Host = net.JoinHostPort(addr, strconv.Itoa(t.port))
		rr.Host = ""
		if attempt > 0 && r.GetBody != nil {
			b, err := r.GetBody()
			if err != nil {
				return nil, err
			}
			rr.Body = b
		}
		switch tok := t.token(); {
		case r.URL.Path == "/v1/acl/login": // needs no token, and must not send a stale one
			rr.Header.Del("X-Consul-Token")
		case tok != "": // ours wins over one the api package took from its environment
			rr.Header.Set("X-Consul-Token", tok)
		}
		resp, err := t.next.RoundTrip(rr)
		if err == nil {
			t.servers.Succeed(addr)
			if resp.StatusCode == http.StatusForbidden && t.revoked != nil {
				t.checkRevoked(resp)
			}
			return resp, nil
		}
		lastErr = err
		if r.Context().Err() != nil || !isConnError(err) {
			return nil, err
		}
		t.servers.Fail(r.Context(), addr, err)
	}
	return nil, lastErr
}

// checkRevoked reads a 403's (short) body and puts it back; "ACL not found"
// means our token was deleted or expired.
func (t *serverTransport) checkRevoked(resp *http.Response) {
	b, err := io.ReadAll(io.LimitReader(resp.Body, 4096))
	resp.Body.Close()
	resp.Body = io.NopCloser(bytes.NewReader(b))
	if err == nil && strings.Contains(string(b), "ACL not found") {
		t.revoked()
	}
}

// isConnError reports whether err means the server could not be reached
// (as opposed to an answer, or our own cancellation).
func isConnError(err error) bool {
	var op *net.OpError
	if errors.As(err, &op) {
		return op.Op == "dial" || op.Op == "read" || op.Op == "write"
	}
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)
}
