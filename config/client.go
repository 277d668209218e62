package config

import (
	"fmt"
	"os"
	"strings"

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

// Client builds an API client and returns the config it was built from
// (for callers that need context-aware raw requests). A token file is read here and sent as a
// header rather than through api.Config, so that ReloadToken can swap it at
// runtime (SIGHUP) without rebuilding the client.
func (a API) Client() (*api.Client, *api.Config, error) {
	cfg := api.DefaultConfig() // reads CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, CONSUL_CACERT, ...
	if a.Addr != "" {
		cfg.Address = a.Addr
	}
	if a.Token != "" {
		cfg.Token = a.Token
	}
	tokenFile := cfg.TokenFile
	if a.TokenFile != "" {
		tokenFile = a.TokenFile
	}
	cfg.TokenFile = ""
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
	c, err := api.NewClient(cfg)
	if err != nil {
		return nil, nil, fmt.Errorf("consul API client: %w", err)
	}
	if tokenFile != "" {
		if err := ReloadToken(c, tokenFile); err != nil {
			return nil, nil, err
		}
	}
	return c, cfg, nil
}

// ReloadToken reads path and makes its content the client's ACL token.
func ReloadToken(c *api.Client, path string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("reading token file: %w", err)
	}
	tok := strings.TrimSpace(string(b))
	if tok == "" {
		return fmt.Errorf("token file %s is empty", path)
	}
	h := c.Headers()
	h.Set("X-Consul-Token", tok)
	c.SetHeaders(h)
	return nil
}

// TokenFileInEffect returns the token file in effect for a: the flag, else
// CONSUL_HTTP_TOKEN_FILE.
func (a API) TokenFileInEffect() string {
	if a.TokenFile != "" {
		return a.TokenFile
	}
	return os.Getenv(api.HTTPTokenFileEnvName)
}
