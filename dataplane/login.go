package dataplane

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"

	"github.com/straitproxy/strait/internal/watch"
	"github.com/straitproxy/strait/metrics"
)

// Credential types (-credential-type).
const (
	CredentialLogin  = "login"
	CredentialStatic = "static"
)

// Credentials says where the ACL token comes from: a static token, or a
// login through an auth method with a bearer token (on Kubernetes, the
// pod's projected service-account token). The zero value means no token.
type Credentials struct {
	// Type is CredentialLogin, CredentialStatic or "" (no token: servers
	// without ACLs).
	Type string
	// StaticToken is the token of CredentialStatic.
	StaticToken string
	// AuthMethod, BearerTokenPath, Meta, Datacenter, Namespace and
	// Partition are the login's (consul-dataplane's -login-* flags). The
	// bearer token file is read again for every login, so a rotated
	// projected token is picked up.
	AuthMethod      string
	BearerTokenPath string
	// BearerToken is used when BearerTokenPath is empty.
	BearerToken string
	Meta        map[string]string
	Datacenter  string
	Namespace   string
	Partition   string
	// CheckInterval is how often a login token is checked on the servers
	// (/v1/acl/token/self), so that a deleted token is replaced; zero means
	// 10s. A 403 "ACL not found" on any request also triggers a check.
	CheckInterval time.Duration
}

// tokenHolder holds the token in use; reads are lock-free.
type tokenHolder struct {
	secret   atomic.Pointer[string]
	accessor atomic.Pointer[string]
	expires  atomic.Pointer[time.Time]
	// margin is how long before expiry the token is replaced: a minute,
	// or a third of its life if that is shorter.
	margin atomic.Int64
}

func (h *tokenHolder) get() string {
	if p := h.secret.Load(); p != nil {
		return *p
	}
	return ""
}

func (h *tokenHolder) set(t *api.ACLToken) {
	h.secret.Store(&t.SecretID)
	h.accessor.Store(&t.AccessorID)
	var exp time.Time
	margin := time.Minute
	if t.ExpirationTime != nil {
		exp = *t.ExpirationTime
		margin = min(margin, time.Until(exp)/3)
	}
	h.expires.Store(&exp)
	h.margin.Store(int64(margin))
}

// login holds a login token current: it logs in, replaces the token before
// it expires or when the servers no longer know it, and logs out at the end.
type login struct {
	cred    Credentials
	client  *api.Client // its transport adds the held token
	tok     *tokenHolder
	log     hclog.Logger
	check   chan struct{} // a request saw "ACL not found"
	logins  atomic.Uint64
	metrics Counter
}

func (l *login) count(result string) {
	if l.metrics != nil {
		l.metrics.IncrCounter(metrics.DataplaneLogins, 1, []metrics.Label{{Name: "result", Value: result}})
	}
}

// notifyRevoked asks for a token check soon (never blocks).
func (l *login) notifyRevoked() {
	select {
	case l.check <- struct{}{}:
	default:
	}
}

// Login logs in once.
func (l *login) Login(ctx context.Context) error {
	err := l.login(ctx)
	if err != nil && ctx.Err() == nil {
		l.count("failed")
	}
	return err
}

func (l *login) login(ctx context.Context) error {
	bearer := l.cred.BearerToken
	if l.cred.BearerTokenPath != "" {
		b, err := os.ReadFile(l.cred.BearerTokenPath)
		if err != nil {
			return fmt.Errorf("login: reading the bearer token: %w", err)
		}
		bearer = strings.TrimSpace(string(b))
		if bearer == "" {
			return fmt.Errorf("login: bearer token file %s is empty", l.cred.BearerTokenPath)
		}
	}
	// The transport sends no token with a login (it needs none).
	q := &api.WriteOptions{Datacenter: l.cred.Datacenter, Namespace: l.cred.Namespace, Partition: l.cred.Partition}
	tok, _, err := l.client.ACL().Login(&api.ACLLoginParams{AuthMethod: l.cred.AuthMethod, BearerToken: bearer, Meta: l.cred.Meta}, q.WithContext(ctx))
	if err != nil {
		return fmt.Errorf("login to auth method %q: %w", l.cred.AuthMethod, err)
	}
	l.tok.set(tok)
	l.logins.Add(1)
	l.count("ok")
	l.log.Info("logged in", "auth_method", l.cred.AuthMethod, "accessor_id", tok.AccessorID, "expires", tok.ExpirationTime)
	return nil
}

// LoginUntilDone logs in, retrying with backoff until it works or ctx ends.
func (l *login) LoginUntilDone(ctx context.Context) error {
	b := watch.Backoff{}
	for attempt := 0; ; attempt++ {
		err := l.Login(ctx)
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		l.log.Error("login failed; retrying", "error", err)
		if !watch.Sleep(ctx, b.Delay(attempt+1)) {
			return ctx.Err()
		}
	}
}

// Run keeps the token valid until ctx ends: it checks it every
// CheckInterval (and at once when a request reports it unknown), and logs
// in again when the servers no longer know it or it is near its expiry.
func (l *login) Run(ctx context.Context) {
	every := l.cred.CheckInterval
	if every <= 0 {
		every = 10 * time.Second
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-l.check:
		}
		if l.valid(ctx) {
			continue
		}
		if err := l.LoginUntilDone(ctx); err != nil {
			return
		}
	}
}

// valid reports whether the token is still known and not about to expire
// (see tokenHolder.margin). Errors other
// than "ACL not found" (a server away) count as valid: the next check
// tells.
func (l *login) valid(ctx context.Context) bool {
	if exp := l.tok.expires.Load(); exp != nil && !exp.IsZero() && time.Until(*exp) < time.Duration(l.tok.margin.Load()) {
		l.log.Info("login token expires soon; logging in again", "expires", *exp)
		return false
	}
	q := &api.QueryOptions{}
	_, _, err := l.client.ACL().TokenReadSelf(q.WithContext(ctx))
	if err == nil {
		return true
	}
	if isACLNotFound(err) {
		l.log.Warn("login token no longer known to the servers; logging in again", "accessor_id", ptrString(l.tok.accessor.Load()))
		return false
	}
	if ctx.Err() == nil {
		l.log.Debug("checking the login token", "error", err)
	}
	return true
}

func isACLNotFound(err error) bool {
	var se api.StatusError
	if errors.As(err, &se) {
		return se.Code == 403 && strings.Contains(se.Body, "ACL not found")
	}
	return err != nil && strings.Contains(err.Error(), "ACL not found")
}

func ptrString(p *string) string {
	if p == nil {
		return ""
	}
	return *p
}

// Logout destroys the login token on the servers.
func (l *login) Logout(ctx context.Context) error {
	if l.tok.get() == "" {
		return nil
	}
	q := &api.WriteOptions{Datacenter: l.cred.Datacenter, Namespace: l.cred.Namespace, Partition: l.cred.Partition}
	if _, err := l.client.ACL().Logout(q.WithContext(ctx)); err != nil {
		return fmt.Errorf("logout: %w", err)
	}
	l.log.Info("logged out", "accessor_id", ptrString(l.tok.accessor.Load()))
	return nil
}
