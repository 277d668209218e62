package tlsutil

import (
	"crypto/tls"
	"crypto/x509"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

func TestNewBundleOK(t *testing.T) {
	t.Parallel()
	ca := newTestCA(t, testTD)
	l := ca.leaf(t, "web", leafOpts{})
	b, err := NewBundle(&l.cert, rootList(testTD, ca))
	if err != nil {
		t.Fatalf("NewBundle: %v", err)
	}
	if want := ServiceID(testTD, "", "", "dc1", "web"); b.Identity != want {
		t.Errorf("Identity = %+v, want %+v", b.Identity, want)
	}
	if b.TrustDomain != testTD {
		t.Errorf("TrustDomain = %q, want %q", b.TrustDomain, testTD)
	}
	if b.LeafSerial != l.serial {
		t.Errorf("LeafSerial = %q, want %q", b.LeafSerial, l.serial)
	}
	if !b.NotAfter.Equal(l.x.NotAfter) || !b.NotBefore.Equal(l.x.NotBefore) {
		t.Errorf("validity = %v..%v, want %v..%v", b.NotBefore, b.NotAfter, l.x.NotBefore, l.x.NotAfter)
	}
	if !slices.Equal(b.RootIDs, []string{ca.id}) {
		t.Errorf("RootIDs = %v, want [%s]", b.RootIDs, ca.id)
	}
	if b.Leaf == nil || b.Leaf.Leaf == nil {
		t.Fatal("bundle leaf is not parsed")
	}
	if b.Leaf.Leaf.SerialNumber.Cmp(l.x.SerialNumber) != 0 {
		t.Error("bundle leaf is not the given leaf")
	}
	if _, err := b.Leaf.Leaf.Verify(x509.VerifyOptions{Roots: b.Roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		t.Errorf("bundle roots do not verify its own leaf: %v", err)
	}
}

func TestNewBundleIntermediate(t *testing.T) {
	t.Parallel()
	root := newTestCA(t, testTD)
	inter := root.intermediate(t)
	l := inter.leaf(t, "web", leafOpts{})
	if len(l.cert.Certificate) != 2 {
		t.Fatalf("chain has %d certificates, want leaf + intermediate", len(l.cert.Certificate))
	}
	b, err := NewBundle(&l.cert, rootList(testTD, root))
	if err != nil {
		t.Fatalf("NewBundle with an intermediate in the chain: %v", err)
	}
	if b.LeafSerial != l.serial {
		t.Errorf("LeafSerial = %q, want %q", b.LeafSerial, l.serial)
	}

	// Without the intermediate the leaf does not chain.
	bare := tls.Certificate{Certificate: l.cert.Certificate[:1], PrivateKey: l.cert.PrivateKey}
	if _, err := NewBundle(&bare, rootList(testTD, root)); err == nil {
		t.Fatal("NewBundle accepted a leaf whose intermediate is missing")
	}
}

func TestNewBundleRejects(t *testing.T) {
	t.Parallel()
	ca := newTestCA(t, testTD)
	other := newTestCA(t, testTD)
	good := ca.leaf(t, "web", leafOpts{})

	tests := []struct {
		name    string
		leaf    *tls.Certificate
		roots   *api.CARootList
		wantErr string
	}{
		{
			name:    "leaf from another CA",
			leaf:    &other.leaf(t, "web", leafOpts{}).cert,
			roots:   rootList(testTD, ca),
			wantErr: "chain",
		},
		{
			name:    "leaf trust domain differs from the roots'",
			leaf:    &ca.leaf(t, "web", leafOpts{td: "99999999-0000-0000-0000-000000000000.consul"}).cert,
			roots:   rootList(testTD, ca),
			wantErr: "trust domain",
		},
		{
			name:    "roots name another trust domain",
			leaf:    &good.cert,
			roots:   rootList("99999999-0000-0000-0000-000000000000.consul", ca),
			wantErr: "trust domain",
		},
		{
			name:    "empty certificate",
			leaf:    &tls.Certificate{},
			roots:   rootList(testTD, ca),
			wantErr: "empty",
		},
		{
			name:    "garbage DER",
			leaf:    &tls.Certificate{Certificate: [][]byte{[]byte("nope")}},
			roots:   rootList(testTD, ca),
			wantErr: "parsing leaf",
		},
		{
			name:    "no URI SAN",
			leaf:    &ca.leaf(t, "web", leafOpts{noURI: true}).cert,
			roots:   rootList(testTD, ca),
			wantErr: "URI",
		},
		{
			name:    "URI SAN not a Consul form",
			leaf:    &ca.leaf(t, "web", leafOpts{uri: "spiffe://" + testTD + "/workload/web"}).cert,
			roots:   rootList(testTD, ca),
			wantErr: "identity",
		},
		{
			name:    "expired leaf",
			leaf:    &ca.leaf(t, "web", expiredOpts()).cert,
			roots:   rootList(testTD, ca),
			wantErr: "chain",
		},
		{
			name: "root without a certificate",
			leaf: &good.cert,
			roots: &api.CARootList{TrustDomain: testTD, ActiveRootID: "x", Roots: []*api.CARoot{
				{ID: "x", RootCertPEM: "not pem", Active: true},
			}},
			wantErr: "no certificate",
		},
		{
			name:    "no roots",
			leaf:    &good.cert,
			roots:   &api.CARootList{TrustDomain: testTD},
			wantErr: "chain",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			b, err := NewBundle(tc.leaf, tc.roots)
			if err == nil {
				t.Fatalf("NewBundle accepted it: %+v", b)
			}
			if b != nil {
				t.Errorf("NewBundle returned a bundle with error %v", err)
			}
			if !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("error %q does not mention %q", err, tc.wantErr)
			}
		})
	}
}

func TestNewBundleTrustDomainCase(t *testing.T) {
	t.Parallel()
	ca := newTestCA(t, testTD)
	l := ca.leaf(t, "web", leafOpts{})
	// The agent's trust domain is compared case-insensitively.
	if _, err := NewBundle(&l.cert, rootList(strings.ToUpper(testTD), ca)); err != nil {
		t.Fatalf("NewBundle with an upper-case roots trust domain: %v", err)
	}
	// No trust domain in the root list: the leaf's is used.
	roots := rootList("", ca)
	b, err := NewBundle(&l.cert, roots)
	if err != nil {
		t.Fatalf("NewBundle without a roots trust domain: %v", err)
	}
	if b.TrustDomain != testTD {
		t.Fatalf("TrustDomain = %q, want the leaf's %q", b.TrustDomain, testTD)
	}
}

func TestNewBundleRotation(t *testing.T) {
	t.Parallel()
	oldCA := newTestCA(t, testTD)
	newCA := newTestCA(t, testTD)
	roots := rootList(testTD, newCA, oldCA) // new active, old still trusted
	for name, ca := range map[string]*testCA{"old": oldCA, "new": newCA} {
		l := ca.leaf(t, "web", leafOpts{})
		b, err := NewBundle(&l.cert, roots)
		if err != nil {
			t.Fatalf("leaf from the %s root during rotation: %v", name, err)
		}
		if !slices.Equal(b.RootIDs, []string{newCA.id, oldCA.id}) {
			t.Fatalf("RootIDs = %v, want both roots", b.RootIDs)
		}
		// Peers from either root verify.
		for peerName, peerCA := range map[string]*testCA{"old": oldCA, "new": newCA} {
			p := peerCA.leaf(t, "api", leafOpts{})
			if _, _, err := verifyPeer(b, []*x509.Certificate{p.x}, x509.ExtKeyUsageClientAuth); err != nil {
				t.Errorf("bundle from %s leaf: peer from %s root refused: %v", name, peerName, err)
			}
		}
	}
	// After rotation completes the old root is gone and its leaves fail.
	l := oldCA.leaf(t, "web", leafOpts{})
	if _, err := NewBundle(&l.cert, rootList(testTD, newCA)); err == nil {
		t.Fatal("leaf from a removed root accepted")
	}
}

func TestFormatSerial(t *testing.T) {
	t.Parallel()
	tests := []struct {
		in   []byte
		want string
	}{
		{nil, ""},
		{[]byte{0x00}, "00"},
		{[]byte{0x0f}, "0f"},
		{[]byte{0x01, 0xab, 0xff}, "01:ab:ff"},
		{[]byte{0xde, 0xad, 0xbe, 0xef}, "de:ad:be:ef"},
	}
	for _, tc := range tests {
		if got := FormatSerial(tc.in); got != tc.want {
			t.Errorf("FormatSerial(% x) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

func expiredOpts() leafOpts {
	return leafOpts{notBefore: time.Now().Add(-3 * time.Hour), notAfter: time.Now().Add(-time.Hour)}
}
