package tlsutil

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net/url"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// testCA is a Consul-like connect CA for tests: ECDSA P-256, a root whose
// URI SAN is the trust domain's signing ID, optionally an intermediate.
type testCA struct {
	td     string // trust domain of the root's URI SAN and of default leaves
	id     string // CA root ID as the agent lists it
	cert   *x509.Certificate
	key    *ecdsa.PrivateKey
	pem    string // root certificate PEM
	parent *testCA
	// interPEM is the issuing chain to append to leaves (intermediates only).
	interPEM string
}

var caSeq atomic.Int64

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

// newTestCA makes a self-signed root whose URI SAN is spiffe://<td>.
func newTestCA(t testing.TB, td string) *testCA {
	t.Helper()
	key := newKey(t)
	n := caSeq.Add(1)
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
	return &testCA{td: td, id: "root-" + big.NewInt(n).String(), cert: cert, key: key, pem: pemCert(der)}
}

// intermediate makes a CA signed by ca. Leaves it issues carry it in their
// chain PEM; only ca's root belongs in the agent's root list.
func (ca *testCA) intermediate(t testing.TB) *testCA {
	t.Helper()
	key := newKey(t)
	tmpl := &x509.Certificate{
		SerialNumber:          randSerial(t),
		Subject:               pkix.Name{CommonName: "Consul Intermediate " + ca.td},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		URIs:                  []*url.URL{mustURL(t, "spiffe://"+ca.td)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &testCA{td: ca.td, id: ca.id, cert: cert, key: key, pem: ca.pem, parent: ca, interPEM: pemCert(der) + ca.interPEM}
}

// leafOpts shapes a leaf. Zero values mean: trust domain of the CA,
// namespace default, dc1, both EKUs, valid from an hour ago for 72h.
type leafOpts struct {
	uri       string // full URI SAN override
	td        string // trust domain of the URI SAN
	eku       []x509.ExtKeyUsage
	notBefore time.Time
	notAfter  time.Time
	noURI     bool
}

var (
	ekuBoth   = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
	ekuServer = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
	ekuClient = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
)

type testLeaf struct {
	cert    tls.Certificate // chain: leaf then intermediates
	x       *x509.Certificate
	certPEM string // chain PEM as the agent returns it
	keyPEM  string
	serial  string // Consul-formatted
	uri     string
}

// leaf issues a leaf for service with URI SAN
// spiffe://<td>/ns/default/dc/dc1/svc/<service>.
func (ca *testCA) leaf(t testing.TB, service string, o leafOpts) *testLeaf {
	t.Helper()
	key := newKey(t)
	td := o.td
	if td == "" {
		td = ca.td
	}
	uri := o.uri
	if uri == "" {
		uri = "spiffe://" + td + "/ns/default/dc/dc1/svc/" + service
	}
	eku := o.eku
	if eku == nil {
		eku = ekuBoth
	}
	nb, na := o.notBefore, o.notAfter
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
	if !o.noURI {
		tmpl.URIs = []*url.URL{mustURL(t, uri)}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
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
	certPEM := pemCert(der) + ca.interPEM
	keyPEM := string(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}))
	cert, err := tls.X509KeyPair([]byte(certPEM), []byte(keyPEM))
	if err != nil {
		t.Fatal(err)
	}
	return &testLeaf{cert: cert, x: x, certPEM: certPEM, keyPEM: keyPEM, serial: FormatSerial(x.SerialNumber.Bytes()), uri: uri}
}

// rootList is the agent's /v1/agent/connect/ca/roots answer for cas; the
// first is active.
func rootList(td string, cas ...*testCA) *api.CARootList {
	l := &api.CARootList{TrustDomain: td}
	for i, ca := range cas {
		l.Roots = append(l.Roots, &api.CARoot{ID: ca.id, Name: "root " + ca.id, RootCertPEM: ca.pem, Active: i == 0})
		if i == 0 {
			l.ActiveRootID = ca.id
		}
	}
	return l
}

// setMaterial hands leaf and roots to s exactly as the watches do, and
// publishes a Bundle if they are consistent.
func setMaterial(s *Source, leaf *tls.Certificate, roots *api.CARootList) {
	s.mu.Lock()
	if leaf != nil {
		s.leaf = leaf
	}
	if roots != nil {
		s.roots = roots
	}
	s.mu.Unlock()
	s.rebuild()
}

// storeBundle publishes b without NewBundle's checks (for material that
// NewBundle refuses, such as an expired leaf), with rebuild's side effects.
func storeBundle(s *Source, b *Bundle) {
	s.cur.Store(b)
	s.clientMu.Lock()
	s.clientCfgs = nil
	s.clientMu.Unlock()
	s.once.Do(func() { close(s.ready) })
}

// newTestSource returns a ready Source (no agent) for l under ca's roots.
func newTestSource(t testing.TB, service string, l *testLeaf, roots *api.CARootList) *Source {
	t.Helper()
	s := NewSource(nil, service, SourceOptions{})
	cert := l.cert
	setMaterial(s, &cert, roots)
	select {
	case <-s.Ready():
	default:
		t.Fatalf("source for %s not ready after publishing material", service)
	}
	if got := s.Bundle().LeafSerial; got != l.serial {
		t.Fatalf("bundle serial %s, want %s", got, l.serial)
	}
	return s
}
