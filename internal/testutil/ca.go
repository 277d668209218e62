package testutil

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// CA is a Consul-like Connect CA for tests: ECDSA P-256, a root whose URI
// SAN is the trust domain's signing ID (spiffe://<td>), optionally an
// intermediate that issues the leaves.
type CA struct {
	TrustDomain string            // of the root's URI SAN and of default leaves
	ID          string            // CA root ID as the agent lists it
	Cert        *x509.Certificate // this CA's certificate (the root, or the intermediate)
	Key         *ecdsa.PrivateKey
	PEM         string // root certificate PEM (for an intermediate: its root's)

	// chainPEM is the issuing chain appended to leaves (intermediates only).
	chainPEM string
}

var caSeq atomic.Int64

// NewCA makes a self-signed root whose URI SAN is spiffe://<td>.
func NewCA(t testing.TB, td string) *CA {
	t.Helper()
	key := newKey(t)
	tmpl := &x509.Certificate{
		SerialNumber:          randSerial(t),
		Subject:               pkix.Name{CommonName: "Consul CA " + td},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		URIs:                  []*url.URL{mustURL(t, "spiffe://"+td)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	id := fmt.Sprintf("root-%d", caSeq.Add(1))
	return &CA{TrustDomain: td, ID: id, Cert: cert, Key: key, PEM: pemCert(der)}
}

// Intermediate makes a CA signed by ca. Leaves it issues carry it in their
// chain PEM; only ca's root belongs in the agent's root list.
func (ca *CA) Intermediate(t testing.TB) *CA {
	t.Helper()
	key := newKey(t)
	tmpl := &x509.Certificate{
		SerialNumber:          randSerial(t),
		Subject:               pkix.Name{CommonName: "Consul Intermediate " + ca.TrustDomain},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		URIs:                  []*url.URL{mustURL(t, "spiffe://"+ca.TrustDomain)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.Key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &CA{TrustDomain: ca.TrustDomain, ID: ca.ID, Cert: cert, Key: key, PEM: ca.PEM, chainPEM: pemCert(der) + ca.chainPEM}
}

// Pool is a pool holding the root only.
func (ca *CA) Pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AppendCertsFromPEM([]byte(ca.PEM))
	return p
}

// Extended key usages for LeafOptions.EKU.
var (
	EKUBoth   = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
	EKUServer = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
	EKUClient = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
)

// LeafOptions shape a leaf. Zero values mean what Consul issues: the CA's
// trust domain, namespace default, datacenter dc1, both EKUs, valid from an
// hour ago for 72h.
type LeafOptions struct {
	URI         string // full URI SAN; overrides TrustDomain and Datacenter
	TrustDomain string // of the URI SAN
	Datacenter  string // of the URI SAN
	EKU         []x509.ExtKeyUsage
	NotBefore   time.Time
	NotAfter    time.Time
	NoURI       bool // no URI SAN at all
}

// Leaf is an issued leaf certificate in the forms tests need.
type Leaf struct {
	Cert    tls.Certificate   // chain: leaf then intermediates; Leaf set
	X509    *x509.Certificate // the leaf
	CertPEM string            // chain PEM as the agent returns it
	KeyPEM  string
	Serial  string // as Consul formats it: lower-case hex bytes joined by ':'
	URI     string // the URI SAN ("" with NoURI)
}

// Leaf issues a leaf for service, by default with URI SAN
// spiffe://<td>/ns/default/dc/dc1/svc/<service>.
func (ca *CA) Leaf(t testing.TB, service string, o LeafOptions) *Leaf {
	t.Helper()
	key := newKey(t)
	td, dc := o.TrustDomain, o.Datacenter
	if td == "" {
		td = ca.TrustDomain
	}
	if dc == "" {
		dc = "dc1"
	}
	uri := o.URI
	if uri == "" {
		uri = "spiffe://" + td + "/ns/default/dc/" + dc + "/svc/" + service
	}
	eku := o.EKU
	if eku == nil {
		eku = EKUBoth
	}
	nb, na := o.NotBefore, o.NotAfter
	if nb.IsZero() {
		nb = time.Now().Add(-time.Hour)
	}
	if na.IsZero() {
		na = time.Now().Add(72 * time.Hour)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          randSerial(t),
		Subject:               pkix.Name{CommonName: service},
		NotBefore:             nb,
		NotAfter:              na,
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment | x509.KeyUsageKeyAgreement,
		ExtKeyUsage:           eku,
		BasicConstraintsValid: true,
	}
	if o.NoURI {
		uri = ""
	} else {
		tmpl.URIs = []*url.URL{mustURL(t, uri)}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.Key)
	if err != nil {
		t.Fatal(err)
	}
	x, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certPEM := pemCert(der) + ca.chainPEM
	keyPEM := string(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}))
	cert, err := tls.X509KeyPair([]byte(certPEM), []byte(keyPEM))
	if err != nil {
		t.Fatal(err)
	}
	return &Leaf{Cert: cert, X509: x, CertPEM: certPEM, KeyPEM: keyPEM, Serial: consulSerial(x.SerialNumber.Bytes()), URI: uri}
}

// RootList is the agent's /v1/agent/connect/ca/roots answer for cas; the
// first is active.
func RootList(td string, cas ...*CA) *api.CARootList {
	l := &api.CARootList{TrustDomain: td}
	for i, ca := range cas {
		l.Roots = append(l.Roots, &api.CARoot{ID: ca.ID, Name: "root " + ca.ID, RootCertPEM: ca.PEM, Active: i == 0})
		if i == 0 {
			l.ActiveRootID = ca.ID
		}
	}
	return l
}

// consulSerial formats a serial number as Consul's leaf endpoint does. It
// is written independently of tlsutil.FormatSerial, whose tests use it.
func consulSerial(b []byte) string {
	parts := make([]string, len(b))
	for i, c := range b {
		parts[i] = fmt.Sprintf("%02x", c)
	}
	return strings.Join(parts, ":")
}

// randSerial is a random positive 128-bit serial, as Consul's CA issues.
func randSerial(t testing.TB) *big.Int {
	t.Helper()
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		t.Fatal(err)
	}
	return n.Add(n, big.NewInt(1))
}

func newKey(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func pemCert(der []byte) string {
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
}

func mustURL(t testing.TB, s string) *url.URL {
	t.Helper()
	u, err := url.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return u
}
