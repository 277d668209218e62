package authz

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"

	"github.com/hashicorp/consul/api"
)

const authorizePath = "/v1/agent/connect/authorize"

// connectAuthorize is the fallback used without Options.AgentConfig.
// api.Agent.ConnectAuthorize builds its request without a context, and the
// endpoint is POST-only, so client.Raw() (GET and PUT only) cannot stand in;
// ask therefore waits on ctx but the request itself runs to completion.
func (a *Authorizer) connectAuthorize(_ context.Context, req *api.AgentAuthorizeParams) (*api.AgentAuthorize, error) {
	return a.client.Agent().ConnectAuthorize(req)
}

// directAgent makes the authorize call itself, the way api.Client would but
// with a context and our namespace and partition. Like api.Client it sends
// them as ns and partition query parameters, only when set: Consul CE
// answers 400 to either (and to body fields it does not know).
type directAgent struct {
	client *api.Client // for its custom headers, which may change
	http   *http.Client
	url    string
	token  string
	auth   *api.HttpBasicAuth
}

func newDirectAgent(client *api.Client, cfg *api.Config, namespace, partition string) (*directAgent, error) {
	// api.NewClient fills in defaults and resolves unix:// and https://
	// addresses; run it on a copy so the caller's config is untouched.
	c := *cfg
	if _, err := api.NewClient(&c); err != nil {
		return nil, fmt.Errorf("authz: agent config: %w", err)
	}
	host := c.Address
	if strings.HasPrefix(host, "/") {
		host = "localhost" // unix socket path; the transport dials it
	}
	q := url.Values{}
	if ns := cmp.Or(namespace, c.Namespace); ns != "" {
		q.Set("ns", ns)
	}
	if ap := cmp.Or(partition, c.Partition); ap != "" {
		q.Set("partition", ap)
	}
	u := url.URL{Scheme: c.Scheme, Host: host, Path: c.PathPrefix + authorizePath, RawQuery: q.Encode()}
	return &directAgent{client: client, http: c.HttpClient, url: u.String(), token: c.Token, auth: c.HttpAuth}, nil
}

func (d *directAgent) authorize(ctx context.Context, req *api.AgentAuthorizeParams) (*api.AgentAuthorize, error) {
	body, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, d.url, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	if h := d.client.Headers(); h != nil {
		hreq.Header = h
	}
	hreq.Header.Set("Content-Type", "application/json")
	if d.token != "" {
		hreq.Header.Set("X-Consul-Token", d.token)
	}
	if d.auth != nil {
		hreq.SetBasicAuth(d.auth.Username, d.auth.Password)
	}
	resp, err := d.http.Do(hreq)
	if err != nil {
		return nil, err
	}
	defer func() {
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
		_ = resp.Body.Close()
	}()
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
		return nil, api.StatusError{Code: resp.StatusCode, Body: strings.TrimSpace(string(msg))}
	}
	var out api.AgentAuthorize
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		return nil, fmt.Errorf("decode response: %w", err)
	}
	return &out, nil
}
