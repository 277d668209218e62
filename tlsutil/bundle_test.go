package tlsutil

import (
	"crypto/tls"
	"crypto/x509"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/straitproxy/strait/internal/testutil"
)

func TestNewBundleOK(t *testing.T) {
	t.Parallel()
	ca := testutil.NewCA(t, testTD)
	l := ca.Leaf(t, "web", testutil.LeafOptions{})
	b, err := NewBundle(&l.Cert, testutil.RootList(testTD, ca))
	if err != nil {
		t.Fatalf("NewBundle: %v", err)
	}
	if want := ServiceID(testTD, "", "", "dc1", "web"); b.Identity != want {
		t.Errorf("Identity = %+v, want %+v", b.Identity, want)
	}
	if b.TrustDomain != testTD {
		t.Errorf("TrustDomain = %q, want %q", b.TrustDomain, testTD)
	}
	if b.LeafSerial != l.Serial {
		t.Errorf("LeafSerial = %q, want %q", b.LeafSerial, l.Serial)
	}
	if !b.NotAfter.Equal(l.X509.NotAfter) || !b.NotBefore.Equal(l.X509.NotBefore) {
		t.Errorf("validity = %v..%v, want %v..%v", b.NotBefore, b.NotAfter, l.X509.NotBefore, l.X509.NotAfter)
	}
	if !slices.Equal(b.RootIDs, []string{ca.ID}) {
		t.Errorf("RootIDs = %v, want [%s]", b.RootIDs, ca.ID)
	}
	if b.Leaf == nil || b.Leaf.Leaf == nil {
		t.Fatal("bundle leaf is not parsed")
	}
	if b.Leaf.Leaf.SerialNumber.Cmp(l.X509.SerialNumber) != 0 {
		t.Error("bundle leaf is not the given leaf")
	}
	if _, err := b.Leaf.Leaf.Verify(x509.VerifyOptions{Roots: b.Roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		t.Errorf("bundle roots do not verify its own leaf: %v", err)
	}
}

func TestNewBundleIntermediate(t *testing.T) {
	t.Parallel()
	root := testutil.NewCA(t, testTD)
	inter := root.Intermediate(t)
	l := inter.Leaf(t, "web", testutil.LeafOptions{})
	if len(l.Cert.Certificate) != 2 {
		t.Fatalf("chain has %d certificates, want leaf + intermediate", len(l.Cert.Certificate))
	}
	b, err := NewBundle(&l.Cert, testutil.RootList(testTD, root))
	if err != nil {
		t.Fatalf("NewBundle with an intermediate in the chain: %v", err)
	}
	if b.LeafSerial != l.Serial {
		t.Errorf("LeafSerial = %q, want %q", b.LeafSerial, l.Serial)
	}

	// Without the intermediate the leaf does not chain.
	bare := tls.Certificate{Certificate: l.Cert.Certificate[:1], PrivateKey: l.Cert.PrivateKey}
	if _, err := NewBundle(&bare, testutil.RootList(testTD, root)); err == nil {
		t.Fatal("NewBundle accepted a leaf whose intermediate is missing")
	}
}

func TestNewBundleRejects(t *testing.T) {
	t.Parallel()
	ca := testutil.NewCA(t, testTD)
	other := testutil.NewCA(t, testTD)
	good := ca.Leaf(t, "web", testutil.LeafOptions{})

	tests := []struct {
		name    string
		leaf    *tls.Certificate
		roots   *api.CARootList
		wantErr string
	}{
		{
			name:    "leaf from another CA",
			leaf:    &other.Leaf(t, "web", testutil.LeafOptions{}).Cert,
			roots:   testutil.RootList(testTD, ca),
			wantErr: "chain",
		},
		{
			name:    "leaf trust domain differs from the roots'",
			leaf:    &ca.Leaf(t, "web", testutil.LeafOptions{TrustDomain: "99999999-0000-0000-0000-000000000000.consul"}).Cert,
			roots:   testutil.RootList(testTD, ca),
			wantErr: "trust domain",
		},
		{
			name:    "roots name another trust domain",
			leaf:    &good.Cert,
			roots:   testutil.RootList("99999999-0000-0000-0000-000000000000.consul", ca),
			wantErr: "trust domain",
		},
		{
			name:    "empty certificate",
			leaf:    &tls.Certificate{},
			roots:   testutil.RootList(testTD, ca),
			wantErr: "empty",
		},
		{
			name:    "garbage DER",
			leaf:    &tls.Certificate{Certificate: [][]byte{[]byte("nope")}},
			roots:   testutil.RootList(testTD, ca),
			wantErr: "parsing leaf",
		},
		{
			name:    "no URI SAN",
			leaf:    &ca.Leaf(t, "web", testutil.LeafOptions{NoURI: true}).Cert,
			roots:   testutil.RootList(testTD, ca),
			wantErr: "URI",
		},
		{
			name:    "URI SAN not a Consul form",
			leaf:    &ca.Leaf(t, "web", testutil.LeafOptions{URI: "spiffe://" + testTD + "/workload/web"}).Cert,
			roots:   testutil.RootList(testTD, ca),
			wantErr: "identity",
		},
		{
			name:    "expired leaf",
			leaf:    &ca.Leaf(t, "web", expiredOpts()).Cert,
			roots:   testutil.RootList(testTD, ca),
			wantErr: "chain",
		},
		{
			name: "root without a certificate",
			leaf: &good.Cert,
			roots: &api.CARootList{TrustDomain: testTD, ActiveRootID: "x", Roots: []*api.CARoot{
				{ID: "x", RootCertPEM: "not pem", Active: true},
			}},
			wantErr: "no certificate",
		},
		{
			name:    "no roots",
			leaf:    &good.Cert,
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
	ca := testutil.NewCA(t, testTD)
	l := ca.Leaf(t, "web", testutil.LeafOptions{})
	// The agent's trust domain is compared case-insensitively.
	if _, err := NewBundle(&l.Cert, testutil.RootList(strings.ToUpper(testTD), ca)); err != nil {
		t.Fatalf("NewBundle with an upper-case roots trust domain: %v", err)
	}
	// No trust domain in the root list: the leaf's is used.
	roots := testutil.RootList("", ca)
	b, err := NewBundle(&l.Cert, roots)
	if err != nil {
		t.Fatalf("NewBundle without a roots trust domain: %v", err)
	}
	if b.TrustDomain != testTD {
		t.Fatalf("TrustDomain = %q, want the leaf's %q", b.TrustDomain, testTD)
	}
}

func TestNewBundleRotation(t *testing.T) {
	t.Parallel()
	oldCA := testutil.NewCA(t, testTD)
	newCA := testutil.NewCA(t, testTD)
	roots := testutil.RootList(testTD, newCA, oldCA) // new active, old still trusted
	for name, ca := range map[string]*testutil.CA{"old": oldCA, "new": newCA} {
		l := ca.Leaf(t, "web", testutil.LeafOptions{})
		b, err := NewBundle(&l.Cert, roots)
		if err != nil {
			t.Fatalf("leaf from the %s root during rotation: %v", name, err)
		}
		if !slices.Equal(b.RootIDs, []string{newCA.ID, oldCA.ID}) {
			t.Fatalf("RootIDs = %v, want both roots", b.RootIDs)
		}
		// Peers from either root verify.
		for peerName, peerCA := range map[string]*testutil.CA{"old": oldCA, "new": newCA} {
			p := peerCA.Leaf(t, "api", testutil.LeafOptions{})
			if _, _, err := verifyPeer(b, []*x509.Certificate{p.X509}, x509.ExtKeyUsageClientAuth); err != nil {
				t.Errorf("bundle from %s leaf: peer from %s root refused: %v", name, peerName, err)
			}
		}
	}
	// After rotation completes the old root is gone and its leaves fail.
	l := oldCA.Leaf(t, "web", testutil.LeafOptions{})
	if _, err := NewBundle(&l.Cert, testutil.RootList(testTD, newCA)); err == nil {
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

func expiredOpts() testutil.LeafOptions {
	return testutil.LeafOptions{NotBefore: time.Now().Add(-3 * time.Hour), NotAfter: time.Now().Add(-time.Hour)}
}
