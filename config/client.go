package config

import (
	"fmt"
	"net/http"
	"os"
	"strings"
	"sync/atomic"

	"github.com/hashicorp/consul/api"
)

// API holds the Consul HTTP API settings of `consul connect proxy`
// (-http-addr, -token, ...). Empty fields fall back to the CONSUL_*
// environment variables, as Consul's own commands do.
type API struct {
	Addr          string
	Token         string
	TokenFile     string
	CAFile        string
	CAPath        string
	ClientCert    string
	ClientKey     string
	TLSServerName string
	Datacenter    string
}

// Agent is a connected API client plus what is needed to swap its ACL token
// at runtime.
type Agent struct {
	Client *api.Client
	// Config is what Client was built from, for callers that make their
	// own context-aware requests; its HttpClient carries the token.
	Config    *api.Config
	TokenFile string // "" when the token does not come from a file
	token     *atomic.Pointer[string]
}

// Connect builds the API client. The token is resolved with Consul's
// precedence (-token-file, -token, CONSUL_HTTP_TOKEN_FILE,
// CONSUL_HTTP_TOKEN) and injected by the HTTP transport rather than through
// api.Config, so that ReloadToken can replace it (SIGHUP) without
// rebuilding the client.
func (a API) Connect() (*Agent, error) {
	cfg := api.DefaultConfig() // reads CONSUL_HTTP_ADDR, CONSUL_CACERT, ...
	if a.Addr != "" {
		cfg.Address = a.Addr
	}
	set := func(dst *string, v string) {
		if v != "" {
			*dst = v
		}
	}
	set(&cfg.TLSConfig.CAFile, a.CAFile)
	set(&cfg.TLSConfig.CAPath, a.CAPath)
	set(&cfg.TLSConfig.CertFile, a.ClientCert)
	set(&cfg.TLSConfig.KeyFile, a.ClientKey)
	set(&cfg.TLSConfig.Address, a.TLSServerName)
	set(&cfg.Datacenter, a.Datacenter)
	if strings.HasPrefix(cfg.Address, "https://") {
		cfg.Scheme = "https"
	}

	ag := &Agent{Config: cfg, token: new(atomic.Pointer[string])}
	envFile, envToken := os.Getenv(api.HTTPTokenFileEnvName), os.Getenv(api.HTTPTokenEnvName)
	var token string
	switch {
	case a.TokenFile != "":
		ag.TokenFile = a.TokenFile
	case a.Token != "":
		token = a.Token
	case envFile != "":
		ag.TokenFile = envFile
	default:
		token = envToken
	}
	ag.token.Store(&token)
	if ag.TokenFile != "" {
		if err := ag.ReloadToken(); err != nil {
			return nil, err
		}
	}

	hc, err := api.NewHttpClient(cfg.Transport, cfg.TLSConfig)
	if err != nil {
		return nil, fmt.Errorf("consul API client: %w", err)
	}
	hc.Transport = &tokenTransport{next: hc.Transport, token: ag.token}
	cfg.HttpClient = hc
	cfg.Token, cfg.TokenFile = "", ""
	if ag.Client, err = api.NewClient(cfg); err != nil {
		return nil, fmt.Errorf("consul API client: %w", err)
	}
	return ag, nil
}

// ReloadToken re-reads the token file. On error the previous token stays.
func (a *Agent) ReloadToken() error {
	if a.TokenFile == "" {
		return fmt.Errorf("no token file configured")
	}
	b, err := os.ReadFile(a.TokenFile)
	if err != nil {
		return fmt.Errorf("reading token file: %w", err)
	}
	tok := strings.TrimSpace(string(b))
	if tok == "" {
		return fmt.Errorf("token file %s is empty", a.TokenFile)
	}
	a.token.Store(&tok)
	return nil
}

// tokenTransport sets X-Consul-Token on every request, last, so that it
// wins over anything the api package derived from its environment.
type tokenTransport struct {
	next  http.RoundTripper
	token *atomic.Pointer[string]
}

func (t *tokenTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	tok := *t.token.Load()
	if tok == "" || r.Header.Get("X-Consul-Token") == tok {
		return t.next.RoundTrip(r)
	}
	r = r.Clone(r.Context())
	r.Header.Set("X-Consul-Token", tok)
	return t.next.RoundTrip(r)
}
