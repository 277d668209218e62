// Package dataplane runs strait without a Consul agent, as consul-dataplane
// runs Envoy on Kubernetes: everything an agent would give the proxy comes
// from the Consul servers instead.
//
//   - Servers: -addresses names the servers (IPs, host names, a DNS name
//     that resolves to them, or exec=<command>); every request goes to the
//     current one, and a server that cannot be reached is skipped.
//   - Token: a login through an auth method with the pod's bearer token
//     (or a static token). The token is checked periodically and replaced
//     when the servers no longer know it or it nears its expiry, and the
//     login is undone (logout) at exit.
//   - Registration: the proxy's connect-proxy service (service ID and node
//     name, as consul-k8s's endpoints controller writes it) is followed with
//     blocking queries on /v1/catalog/node-services/<node> with
//     merge-central-config, so that the servers merge proxy-defaults and
//     service-defaults into it with the very function an agent uses.
//   - Certificates: roots from /v1/connect/ca/roots, the leaf signed by the
//     public gRPC ConnectCA Sign call from a CSR whose key never leaves the
//     process (see certAuthority).
//
// The rest (intentions, discovery chains, endpoints, config entries) is the
// agent-mode code unchanged, talking to the servers' HTTP API with the
// login token: the Dataplane's API client stands in for the agent's.
package dataplane

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net/http"
	"os"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"

	"github.com/straitproxy/strait/config"
	"github.com/straitproxy/strait/internal/watch"
	"github.com/straitproxy/strait/metrics"
	"github.com/straitproxy/strait/tlsutil"
)

// Default ports, as consul-dataplane's.
const (
	DefaultHTTPPort    = 8500
	DefaultHTTPSPort   = 8501
	DefaultGRPCPort    = 8502
	DefaultCheckPeriod = 10 * time.Second
)

// Options configure a Dataplane; they are consul-dataplane's flags.
type Options struct {
	// Addresses names the servers (see NewServers).
	Addresses string
	// HTTPPort is the servers' HTTP API port; zero means 8500, or 8501
	// with TLS. GRPCPort is their public gRPC port; zero means 8502.
	HTTPPort int
	GRPCPort int
	// TLSDisabled talks plain HTTP and gRPC to the servers. Otherwise TLS,
	// verified against CACerts (a PEM file or a directory of them; empty:
	// the system roots) with TLSServerName (empty: the address dialed).
	TLSDisabled   bool
	CACerts       string
	TLSServerName string
	// TLSCert and TLSKey are a client certificate for servers that verify
	// incoming connections; TLSInsecureSkipVerify skips verifying theirs.
	TLSCert, TLSKey       string
	TLSInsecureSkipVerify bool
	// ProxyServiceID and NodeName find the proxy's registration.
	ProxyServiceID string
	NodeName       string
	// Namespace and Partition of the proxy's service (Enterprise).
	Namespace string
	Partition string
	// Credentials is where the ACL token comes from.
	Credentials Credentials
	// Logger; nil discards.
	Logger hclog.Logger
	// Metrics receives the dataplane's counters (metrics.Dataplane*);
	// nil counts nothing.
	Metrics Counter
	// Resolve looks a host name up; nil means the system resolver.
	Resolve func(ctx context.Context, host string) ([]string, error)
}

// Counter is the part of *metrics.Metrics the dataplane uses.
type Counter interface {
	IncrCounter(key []string, val float32, labels []metrics.Label)
}

type noCounter struct{}

func (noCounter) IncrCounter([]string, float32, []metrics.Label) {}

// Dataplane is the connection to the servers: an API client that follows
// the live server and carries the current token, the login, and the
// proxy's registration.
type Dataplane struct {
	opts    Options
	log     hclog.Logger
	servers *Servers
	tok     *tokenHolder
	login   *login
	grpc    *grpcClient
	dc      atomic.Pointer[string]

	// Client and Config stand in for the agent's (config.Agent): every
	// request goes to the current server with the current token.
	Client *api.Client
	Config *api.Config
}

// New builds the clients; nothing is sent until Start.
func New(opts Options) (*Dataplane, error) {
	log := opts.Logger
	if log == nil {
		log = hclog.NewNullLogger()
	}
	if opts.ProxyServiceID == "" {
		return nil, errors.New("no proxy service ID")
	}
	if opts.NodeName == "" {
		return nil, errors.New("no node name")
	}
	switch opts.Credentials.Type {
	case CredentialLogin:
		if opts.Credentials.AuthMethod == "" || (opts.Credentials.BearerTokenPath == "" && opts.Credentials.BearerToken == "") {
			return nil, errors.New("credential type login needs an auth method and a bearer token (path)")
		}
	case CredentialStatic:
		if opts.Credentials.StaticToken == "" {
			return nil, errors.New("credential type static needs a token")
		}
	case "":
	default:
		return nil, fmt.Errorf("credential type %q: want login or static", opts.Credentials.Type)
	}
	servers, err := NewServers(opts.Addresses, opts.Resolve, log.Named("servers"))
	if err != nil {
		return nil, err
	}
	if opts.HTTPPort == 0 {
		opts.HTTPPort = DefaultHTTPPort
		if !opts.TLSDisabled {
			opts.HTTPPort = DefaultHTTPSPort
		}
	}
	if opts.GRPCPort == 0 {
		opts.GRPCPort = DefaultGRPCPort
	}
	if opts.Metrics == nil {
		opts.Metrics = noCounter{}
	}
	servers.metrics = opts.Metrics
	d := &Dataplane{opts: opts, log: log, servers: servers, tok: &tokenHolder{}}
	if opts.Credentials.Type == CredentialStatic {
		d.tok.set(&api.ACLToken{SecretID: opts.Credentials.StaticToken})
	}

	scheme := "http"
	var tlsCfg *tls.Config
	if !opts.TLSDisabled {
		scheme = "https"
		tc := api.TLSConfig{Address: opts.TLSServerName, CertFile: opts.TLSCert, KeyFile: opts.TLSKey, InsecureSkipVerify: opts.TLSInsecureSkipVerify}
		if opts.CACerts != "" {
			st, err := os.Stat(opts.CACerts)
			if err != nil {
				return nil, fmt.Errorf("CA certificates: %w", err)
			}
			if st.IsDir() {
				tc.CAPath = opts.CACerts
			} else {
				tc.CAFile = opts.CACerts
			}
		}
		if tlsCfg, err = api.SetupTLSConfig(&tc); err != nil {
			return nil, fmt.Errorf("servers' TLS: %w", err)
		}
	}
	base := http.DefaultTransport.(*http.Transport).Clone()
	base.TLSClientConfig = tlsCfg
	d.login = &login{cred: opts.Credentials, tok: d.tok, log: log.Named("login"), check: make(chan struct{}, 1), metrics: opts.Metrics}
	st := &serverTransport{servers: servers, port: opts.HTTPPort, next: base, token: d.tok.get, revoked: d.login.notifyRevoked}
	if opts.Credentials.Type != CredentialLogin {
		st.revoked = nil
	}
	d.Config = &api.Config{
		Address:    "consul-server", // replaced by the current server's address
		Scheme:     scheme,
		HttpClient: &http.Client{Transport: st},
	}
	if d.Client, err = api.NewClient(d.Config); err != nil {
		return nil, fmt.Errorf("consul API client: %w", err)
	}
	d.login.client = d.Client
	d.grpc = newGRPCClient(servers, opts.GRPCPort, tlsCfg, d.tok.get)
	return d, nil
}

// Servers returns the server set.
func (d *Dataplane) Servers() *Servers { return d.servers }

// Logins counts the logins made.
func (d *Dataplane) Logins() uint64 { return d.login.logins.Load() }

// Token returns the ACL token in use ("" before the login).
func (d *Dataplane) Token() string { return d.tok.get() }

// Start resolves the server addresses and logs in, retrying until both
// work or ctx ends.
func (d *Dataplane) Start(ctx context.Context) error {
	b := watch.Backoff{}
	for attempt := 1; ; attempt++ {
		err := d.servers.Resolve(ctx)
		if err == nil {
			break
		}
		d.log.Error("resolving the server addresses; retrying", "error", err)
		if !watch.Sleep(ctx, b.Delay(attempt)) {
			return ctx.Err()
		}
	}
	d.log.Info("servers", "addresses", d.servers.All(), "http_port", d.opts.HTTPPort, "grpc_port", d.opts.GRPCPort)
	if d.opts.Credentials.Type != CredentialLogin {
		return nil
	}
	return d.login.LoginUntilDone(ctx)
}

// Run keeps the login token valid until ctx ends (nothing to do for other
// credentials).
func (d *Dataplane) Run(ctx context.Context) {
	if d.opts.Credentials.Type == CredentialLogin {
		d.login.Run(ctx)
	}
}

// Close logs out (login credentials) and drops pooled connections. ctx
// bounds the logout.
func (d *Dataplane) Close(ctx context.Context) error {
	defer d.grpc.close()
	if d.opts.Credentials.Type != CredentialLogin {
		return nil
	}
	return d.login.Logout(ctx)
}

// Datacenter is the proxy's node's datacenter, "" before the registration
// was read.
func (d *Dataplane) Datacenter() string {
	if p := d.dc.Load(); p != nil {
		return *p
	}
	return ""
}

// CertOptions returns the roots and leaf sources of a tlsutil.Source for
// service (agentless: see certAuthority).
func (d *Dataplane) CertOptions(service, namespace, partition string) (tlsutil.RootsFunc, tlsutil.LeafFunc) {
	ca := newCertAuthority(d.Client, d.grpc, service, namespace, partition, d.Datacenter, d.log.Named("ca"))
	ca.metrics = d.opts.Metrics
	return ca.Roots, ca.Leaf
}

// WatchRegistration delivers the proxy's configuration on out every time
// its registration or the config entries merged into it change, until ctx
// ends. A registration that is missing (not written yet) is waited for; one
// that does not decode is logged and skipped.
func (d *Dataplane) WatchRegistration(ctx context.Context, out chan<- *config.Config) {
	id, node := d.opts.ProxyServiceID, d.opts.NodeName
	log := d.log.Named("config")
	missing := false
	watch.Loop(ctx, log, "registration "+id, watch.Backoff{Max: 5 * time.Second}, func(ctx context.Context, index uint64) (uint64, error) {
		q := &api.QueryOptions{
			WaitIndex: index, WaitTime: 10 * time.Minute, MergeCentralConfig: true,
			Filter:    fmt.Sprintf("ID == %q", id),
			Namespace: d.opts.Namespace, Partition: d.opts.Partition,
		}
		if missing {
			q.WaitTime = 5 * time.Second // a node not yet in the catalog may not wake the query
		}
		list, meta, err := d.Client.Catalog().NodeServiceList(node, q.WithContext(ctx))
		if err != nil {
			return index, fmt.Errorf("reading registration %q on node %q: %w", id, node, err)
		}
		if list == nil || list.Node == nil || len(list.Services) == 0 {
			if !missing {
				log.Info("proxy registration not in the catalog yet; waiting for it", "proxy_service_id", id, "node", node)
			}
			missing = true
			return meta.LastIndex, nil
		}
		missing = false
		if meta.LastIndex == index {
			return index, nil
		}
		dc := list.Node.Datacenter
		d.dc.Store(&dc)
		c, err := config.FromAgentService(list.Services[0])
		if err != nil {
			log.Error("ignoring proxy registration that cannot be used", "proxy_service_id", id, "error", err)
			return meta.LastIndex, nil
		}
		select {
		case out <- c:
		case <-ctx.Done():
		}
		return meta.LastIndex, nil
	})
}
