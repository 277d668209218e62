package testutil_test

import (
	"crypto/x509"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/straitproxy/strait/internal/testutil"
	"github.com/straitproxy/strait/tlsutil"
)

const td = "11111111-2222-3333-4444-555555555555.consul"

// TestLeafIsConsulShaped: a leaf from an intermediate verifies against the
// root alone, carries the URI SAN and serial format strait parses.
func TestLeafIsConsulShaped(t *testing.T) {
	t.Parallel()
	root := testutil.NewCA(t, td)
	for _, ca := range []*testutil.CA{root, root.Intermediate(t)} {
		l := ca.Leaf(t, "web", testutil.LeafOptions{Datacenter: "dc2"})
		inter := x509.NewCertPool()
		for _, der := range l.Cert.Certificate[1:] {
			c, err := x509.ParseCertificate(der)
			if err != nil {
				t.Fatal(err)
			}
			inter.AddCert(c)
		}
		if _, err := l.X509.Verify(x509.VerifyOptions{Roots: root.Pool(), Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
			t.Fatalf("leaf does not verify: %v", err)
		}
		if want := tlsutil.ServiceID(td, "", "", "dc2", "web").String(); l.URI != want || l.X509.URIs[0].String() != want {
			t.Errorf("URI %q (SAN %v), want %q", l.URI, l.X509.URIs, want)
		}
		if want := tlsutil.FormatSerial(l.X509.SerialNumber.Bytes()); l.Serial != want {
			t.Errorf("serial %q, want %q", l.Serial, want)
		}
	}
	if l := root.Leaf(t, "web", testutil.LeafOptions{NoURI: true}); l.URI != "" || len(l.X509.URIs) != 0 {
		t.Errorf("NoURI leaf has URI %q %v", l.URI, l.X509.URIs)
	}
	if rl := testutil.RootList(td, root); rl.ActiveRootID != root.ID || len(rl.Roots) != 1 || !rl.Roots[0].Active {
		t.Errorf("root list %+v", rl)
	}
}

func TestBufferConcurrentWrites(t *testing.T) {
	t.Parallel()
	var b testutil.Buffer
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 100 {
				b.Write([]byte("x"))
				_ = b.String()
			}
		})
	}
	wg.Wait()
	if got := b.String(); got != strings.Repeat("x", 800) {
		t.Fatalf("buffer holds %d bytes, want 800", len(got))
	}
}

func TestEventuallyPolls(t *testing.T) {
	t.Parallel()
	var n atomic.Int64
	testutil.Eventually(t, "three polls", func() bool { return n.Add(1) >= 3 })
	testutil.EventuallyNil(t, func() error { return nil })
}
