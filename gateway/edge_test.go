package gateway

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"

	"github.com/straitproxy/strait/config"
)

func TestIngressConfig(t *testing.T) {
	t.Parallel()
	w := &IngressWatch{Name: "ing", BindAddress: "127.0.0.1"}
	gs := []*api.GatewayService{
		{GatewayKind: api.ServiceKindIngressGateway, Port: 9001, Protocol: "tcp", Service: api.CompoundServiceName{Name: "b", Namespace: "default"}},
		{GatewayKind: api.ServiceKindIngressGateway, Port: 9000, Protocol: "tcp", Service: api.CompoundServiceName{Name: "a"}},
		{GatewayKind: api.ServiceKindIngressGateway, Port: 9000, Protocol: "tcp", Service: api.CompoundServiceName{Name: "dup"}},
		{GatewayKind: api.ServiceKindIngressGateway, Port: 8080, Protocol: "http", Service: api.CompoundServiceName{Name: "web"}},
		{GatewayKind: api.ServiceKindTerminatingGateway, Service: api.CompoundServiceName{Name: "ext"}},
	}
	c := w.Config(gs, hclog.NewNullLogger())
	want := []config.Upstream{
		{DestinationName: "a", LocalBindAddress: "127.0.0.1", LocalBindPort: 9000},
		{DestinationName: "b", LocalBindAddress: "127.0.0.1", LocalBindPort: 9001},
	}
	if c.Service != "ing" || len(c.Upstreams) != len(want) {
		t.Fatalf("config %+v, want upstreams %+v", c, want)
	}
	for i := range want {
		if c.Upstreams[i] != want[i] {
			t.Errorf("upstream %d: %+v, want %+v", i, c.Upstreams[i], want[i])
		}
	}
	if c := (&IngressWatch{Name: "ing"}).Config(gs[:1], hclog.NewNullLogger()); c.Upstreams[0].LocalBindAddress != "0.0.0.0" {
		t.Errorf("no bind address: got %q, want 0.0.0.0", c.Upstreams[0].LocalBindAddress)
	}
}

func TestRegisterKinds(t *testing.T) {
	t.Parallel()
	r := &Register{ID: "tgw", Name: "tgw", LANHost: "127.0.0.1", LANPort: 8443, Kind: api.ServiceKindTerminatingGateway}
	reg := r.Registration()
	if reg.Kind != api.ServiceKindTerminatingGateway || reg.Check == nil || reg.Check.Name != "terminating-gateway listening" {
		t.Errorf("terminating registration %+v", reg)
	}
	r = &Register{ID: "ing", Name: "ing", LANPort: 8443, Kind: api.ServiceKindIngressGateway, NoCheck: true}
	if reg := r.Registration(); reg.Kind != api.ServiceKindIngressGateway || reg.Check != nil {
		t.Errorf("ingress registration %+v", reg)
	}
	if reg := (&Register{ID: "m", Name: "m", LANPort: 1}).Registration(); reg.Kind != api.ServiceKindMeshGateway {
		t.Errorf("default kind %q", reg.Kind)
	}
}

// TestOriginConfig: TLS origination trusts CAFile and checks the SNI
// against the server's certificate; without SNI it checks the chain only;
// an unreadable file is an error, never plaintext.
func TestOriginConfig(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caT := &x509.Certificate{SerialNumber: big.NewInt(1), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	caDER, _ := x509.CreateCertificate(rand.Reader, caT, caT, caKey.Public(), caKey)
	ca, _ := x509.ParseCertificate(caDER)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	leafT := &x509.Certificate{SerialNumber: big.NewInt(2), DNSNames: []string{"db.example"},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	leafDER, _ := x509.CreateCertificate(rand.Reader, leafT, ca, key.Public(), caKey)
	caFile := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), 0o600); err != nil {
		t.Fatal(err)
	}
	server := tls.Certificate{Certificate: [][]byte{leafDER}, PrivateKey: key}
	handshake := func(s linkSettings) error {
		cfg, err := originConfig(s)
		if err != nil {
			return err
		}
		a, b := net.Pipe()
		defer a.Close()
		defer b.Close()
		go tls.Server(b, &tls.Config{Certificates: []tls.Certificate{server}}).Handshake()
		return tls.Client(a, cfg).Handshake()
	}
	if err := handshake(linkSettings{CAFile: caFile, SNI: "db.example"}); err != nil {
		t.Errorf("right SNI: %v", err)
	}
	if err := handshake(linkSettings{CAFile: caFile, SNI: "other.example"}); err == nil {
		t.Error("wrong SNI: handshake succeeded")
	}
	if err := handshake(linkSettings{CAFile: caFile}); err != nil {
		t.Errorf("no SNI (chain only): %v", err)
	}
	if _, err := originConfig(linkSettings{CAFile: filepath.Join(dir, "missing.pem")}); err == nil {
		t.Error("missing CAFile: no error")
	}
	if _, err := originConfig(linkSettings{CAFile: caFile, CertFile: filepath.Join(dir, "c.pem"), KeyFile: filepath.Join(dir, "k.pem")}); err == nil {
		t.Error("missing CertFile: no error")
	}
}
