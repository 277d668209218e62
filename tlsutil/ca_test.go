package tlsutil

import (
	"crypto/tls"
	"testing"

	"github.com/hashicorp/consul/api"

	"github.com/straitproxy/strait/internal/testutil"
)

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
func newTestSource(t testing.TB, service string, l *testutil.Leaf, roots *api.CARootList) *Source {
	t.Helper()
	s := NewSource(nil, service, SourceOptions{})
	cert := l.Cert
	setMaterial(s, &cert, roots)
	select {
	case <-s.Ready():
	default:
		t.Fatalf("source for %s not ready after publishing material", service)
	}
	if got := s.Bundle().LeafSerial; got != l.Serial {
		t.Fatalf("bundle serial %s, want %s", got, l.Serial)
	}
	return s
}
