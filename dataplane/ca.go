package dataplane

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"net/url"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"

	"github.com/straitproxy/strait/metrics"
)

const signMethod = "/hashicorp.consul.connectca.ConnectCAService/Sign"

// certAuthority is the agentless source of the CA roots and of the leaf
// certificate (tlsutil.SourceOptions.Roots and .Leaf).
//
// Roots come from the servers' /v1/connect/ca/roots (blocking). The leaf is
// signed by the servers' public gRPC ConnectCA Sign call from a CSR made
// here, so the private key is generated in, and never leaves, the pod: the
// alternative, the servers' /v1/agent/connect/ca/leaf/<service>, would have
// a server generate the key, keep it in its leaf cache and send it over the
// network. Without an agent nobody renews the leaf for us, so Leaf does it:
// at a random point between 60% and 90% of its life (as Consul's agents
// do), and at once when the active root changes.
type certAuthority struct {
	client    *api.Client
	grpc      *grpcClient
	service   string
	namespace string
	partition string
	log       hclog.Logger
	now       func() time.Time
	// datacenter is the one the leaf's SPIFFE ID names: the proxy's node's.
	datacenter func() string
	metrics    Counter // nil counts nothing

	mu          sync.Mutex
	trustDomain string
	activeRoot  string
	rootsChange chan struct{} // closed when the active root changes
	leafIndex   uint64
	renewAt     time.Time
	renewDue    bool // a renewal was triggered but has not succeeded yet
	signs       uint64
}

func newCertAuthority(client *api.Client, g *grpcClient, service, namespace, partition string, datacenter func() string, log hclog.Logger) *certAuthority {
	return &certAuthority{
		client: client, grpc: g, service: service, namespace: namespace, partition: partition,
		datacenter: datacenter, log: log, now: time.Now, rootsChange: make(chan struct{}),
	}
}

// Roots is a tlsutil.RootsFunc.
func (c *certAuthority) Roots(ctx context.Context, index uint64) (*api.CARootList, uint64, error) {
	q := &api.QueryOptions{WaitIndex: index, WaitTime: 10 * time.Minute}
	roots, meta, err := c.client.Connect().CARoots(q.WithContext(ctx))
	if err != nil {
		return nil, index, err
	}
	c.mu.Lock()
	c.trustDomain = roots.TrustDomain
	if c.activeRoot != roots.ActiveRootID {
		if c.activeRoot != "" {
			c.log.Info("active CA root changed; renewing the leaf", "root", roots.ActiveRootID)
			close(c.rootsChange)
			c.rootsChange = make(chan struct{})
		}
		c.activeRoot = roots.ActiveRootID
	}
	c.mu.Unlock()
	return roots, meta.LastIndex, nil
}

// Leaf is a tlsutil.LeafFunc: while the leaf of index is current, it waits
// for its renewal time or a root change, then has a new one signed.
func (c *certAuthority) Leaf(ctx context.Context, index uint64) (string, string, uint64, error) {
	c.mu.Lock()
	wait := index != 0 && index == c.leafIndex && !c.renewDue
	renewAt, change := c.renewAt, c.rootsChange
	c.mu.Unlock()
	if wait {
		t := time.NewTimer(max(renewAt.Sub(c.now()), 0))
		defer t.Stop()
		select {
		case <-ctx.Done():
			return "", "", index, ctx.Err()
		case <-t.C:
		case <-change:
		}
		c.mu.Lock()
		c.renewDue = true
		c.mu.Unlock()
	}
	c.mu.Lock()
	td, dc := c.trustDomain, c.datacenter()
	c.mu.Unlock()
	if td == "" {
		roots, _, err := c.client.Connect().CARoots((&api.QueryOptions{}).WithContext(ctx))
		if err != nil {
			return "", "", index, fmt.Errorf("reading the trust domain: %w", err)
		}
		td = roots.TrustDomain
	}
	if td == "" || dc == "" {
		return "", "", index, errors.New("trust domain or datacenter not known yet")
	}
	certPEM, keyPEM, notBefore, notAfter, err := c.sign(ctx, td, dc)
	if c.metrics != nil && ctx.Err() == nil {
		result := "ok"
		if err != nil {
			result = "failed"
		}
		c.metrics.IncrCounter(metrics.DataplaneLeafSigns, 1, []metrics.Label{{Name: "result", Value: result}})
	}
	if err != nil {
		return "", "", index, err
	}
	life := notAfter.Sub(notBefore)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.leafIndex++
	c.signs++
	c.renewDue = false
	c.renewAt = notBefore.Add(time.Duration(float64(life) * (0.6 + 0.3*mrand.Float64())))
	c.log.Debug("leaf signed", "not_after", notAfter, "renew_at", c.renewAt)
	return certPEM, keyPEM, c.leafIndex, nil
}

// spiffeID is the leaf's URI SAN, as Consul writes service identities.
func spiffeID(td, partition, namespace, dc, service string) *url.URL {
	if namespace == "" {
		namespace = "default"
	}
	path := "/ns/" + namespace + "/dc/" + dc + "/svc/" + service
	if partition != "" && partition != "default" {
		path = "/ap/" + partition + path
	}
	return &url.URL{Scheme: "spiffe", Host: td, Path: path}
}

// sign makes a key and a CSR for our SPIFFE ID and has the servers sign it.
func (c *certAuthority) sign(ctx context.Context, td, dc string) (certPEM, keyPEM string, notBefore, notAfter time.Time, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", "", notBefore, notAfter, fmt.Errorf("generating the leaf key: %w", err)
	}
	uri := spiffeID(td, c.partition, c.namespace, dc, c.service)
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		URIs: []*url.URL{uri}, SignatureAlgorithm: x509.ECDSAWithSHA256,
	}, key)
	if err != nil {
		return "", "", notBefore, notAfter, fmt.Errorf("creating the CSR: %w", err)
	}
	csr := string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
	resp, err := c.grpc.call(ctx, signMethod, appendStringField(nil, 1, csr))
	if err != nil {
		return "", "", notBefore, notAfter, fmt.Errorf("signing the leaf for %s: %w", uri, err)
	}
	certPEM, err = stringField(resp, 2)
	if err != nil || certPEM == "" {
		return "", "", notBefore, notAfter, fmt.Errorf("signing the leaf for %s: no certificate in the answer (%v)", uri, err)
	}
	blk, _ := pem.Decode([]byte(certPEM))
	if blk == nil {
		return "", "", notBefore, notAfter, fmt.Errorf("signed leaf for %s: no PEM", uri)
	}
	x, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		return "", "", notBefore, notAfter, fmt.Errorf("signed leaf for %s: %w", uri, err)
	}
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return "", "", notBefore, notAfter, err
	}
	keyPEM = string(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}))
	return certPEM, keyPEM, x.NotBefore, x.NotAfter, nil
}
