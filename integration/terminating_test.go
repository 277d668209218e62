package integration

// Terminating gateways (strait -gateway terminating) against a real agent:
// a mesh service's strait upstream reaches services that run no sidecar
// through the gateway, in plaintext and with TLS origination.

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// registerExternal registers a plain (non-mesh) service instance at addr.
func (a *agent) registerExternal(t testing.TB, name, addr string) {
	t.Helper()
	host, portStr, _ := net.SplitHostPort(addr)
	port, _ := strconv.Atoi(portStr)
	err := a.client.Agent().ServiceRegister(&api.AgentServiceRegistration{
		ID: name + "-" + portStr, Name: name, Address: host, Port: port,
	})
	if err != nil {
		t.Fatalf("register %s: %v", name, err)
	}
}

// linkServices writes the terminating-gateway config entry of gw.
func (a *agent) linkServices(t testing.TB, gw string, links ...api.LinkedService) {
	t.Helper()
	a.setEntry(t, &api.TerminatingGatewayConfigEntry{Kind: api.TerminatingGateway, Name: gw, Services: links})
}

// webPKI is a plain X.509 CA (no SPIFFE) and files of a server and a
// client certificate it signed, as an external service's operator has.
type webPKI struct {
	caFile, certFile, keyFile string // the client's, for the link
	server                    tls.Certificate
	pool                      *x509.CertPool
}

func newWebPKI(t testing.TB, serverName string) *webPKI {
	t.Helper()
	dir := t.TempDir()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "external test CA"},
		BasicConstraintsValid: true, IsCA: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	issue := func(serial int64, dns []string, usage x509.ExtKeyUsage) (tls.Certificate, []byte, []byte) {
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: "test " + strconv.FormatInt(serial, 10)},
			DNSNames: dns, KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{usage},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, key.Public(), caKey)
		if err != nil {
			t.Fatal(err)
		}
		keyDER, _ := x509.MarshalECPrivateKey(key)
		leaf, _ := x509.ParseCertificate(der)
		return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf},
			pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
			pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})
	}
	server, _, _ := issue(2, []string{serverName}, x509.ExtKeyUsageServerAuth)
	_, clientPEM, clientKey := issue(3, nil, x509.ExtKeyUsageClientAuth)
	p := &webPKI{
		caFile: filepath.Join(dir, "ca.pem"), certFile: filepath.Join(dir, "client.pem"), keyFile: filepath.Join(dir, "client-key.pem"),
		server: server, pool: x509.NewCertPool(),
	}
	p.pool.AddCert(ca)
	for f, b := range map[string][]byte{
		p.caFile: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), p.certFile: clientPEM, p.keyFile: clientKey,
	} {
		if err := os.WriteFile(f, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return p
}

// TestTerminatingGateway: a mesh service (strait sidecar upstream) reaches
// an external TCP server through a strait terminating gateway, which
// presents the external service's leaf; a deny intention on the linked
// service refuses new connections and closes the open one; a second
// service linked later (no restart) is reached over TLS the gateway
// originates (CA, client certificate and SNI from the link), and a wrong
// SNI in the link is refused by the server's certificate check.
func TestTerminatingGateway(t *testing.T) {
	t.Parallel()
	a := startAgent(t)
	ext, extTLS, gwName, web := uniq("ext"), uniq("extls"), uniq("tgw"), uniq("web")

	plain := startApp(t, modeEcho, 0x21)
	a.registerExternal(t, ext, plain.Addr())
	pki := newWebPKI(t, "db.external.test")
	tlsLn, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
		Certificates: []tls.Certificate{pki.server}, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: pki.pool,
	})
	if err != nil {
		t.Fatal(err)
	}
	secure := serveApp(t, tlsLn, modeEcho, 0x42)
	a.registerExternal(t, extTLS, secure.Addr())

	a.linkServices(t, gwName, api.LinkedService{Name: ext})
	gwPort := freePort(t)
	gw := startGatewayKind(t, a, "terminating", "-service", gwName, "-register", "-address", hostPort(gwPort))
	eventually(t, 30*time.Second, func() error {
		svcs, err := a.client.Agent().Services()
		if err != nil {
			return err
		}
		s, ok := svcs[gwName]
		if !ok || s.Kind != api.ServiceKindTerminatingGateway || s.Port != gwPort {
			return fmt.Errorf("gateway registration %+v", s)
		}
		return nil
	})

	// The gateway presents the linked service's own leaf.
	eventually(t, 30*time.Second, func() error {
		return meshVia(hostPort(gwPort), sni(ext, a.dc, a.trustDomain), a.leaf(t, web), a.roots(t), a.spiffeID(ext), 0x21)
	})

	_, upExt := startChainClient(t, a, ext)
	eventually(t, 30*time.Second, func() error { return echoVia("tcp", upExt, 64<<10, 0x21) })

	// A client without a mesh certificate gets nothing.
	if _, err := tlsRefused(hostPort(gwPort), &tls.Config{ServerName: sni(ext, a.dc, a.trustDomain), InsecureSkipVerify: true}); err != nil {
		t.Errorf("client without certificate: %v", err)
	}

	// Deny: new connections refused, the open one closed.
	open, err := net.DialTimeout("tcp", upExt, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer open.Close()
	if err := roundTrip(open, []byte("before the deny"), 0x21, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	a.setIntention(t, "*", ext, api.IntentionActionDeny)
	eventually(t, 30*time.Second, func() error { return refusedVia("tcp", upExt) })
	open.SetReadDeadline(time.Now().Add(10 * time.Second))
	if n, err := open.Read(make([]byte, 1)); n > 0 || isTimeout(err) {
		t.Errorf("open connection after the deny: read %d bytes, %v; want it closed", n, err)
	}
	// Once the gateway has the deny, a refused client never reaches the
	// external server.
	accepted := plain.Accepts()
	if err := refusedVia("tcp", upExt); err != nil {
		t.Errorf("after the deny: %v", err)
	}
	if got := plain.Accepts(); got != accepted {
		t.Errorf("external server accepted %d connections of a denied client", got-accepted)
	}
	a.deleteIntentions(t, ext)
	eventually(t, 30*time.Second, func() error { return echoVia("tcp", upExt, 1024, 0x21) })

	// Link a second service with TLS origination, without a restart.
	link := api.LinkedService{Name: extTLS, CAFile: pki.caFile, CertFile: pki.certFile, KeyFile: pki.keyFile, SNI: "db.external.test"}
	a.linkServices(t, gwName, api.LinkedService{Name: ext}, link)
	_, upTLS := startChainClient(t, a, extTLS)
	eventually(t, 30*time.Second, func() error { return echoVia("tcp", upTLS, 64<<10, 0x42) })
	if secure.Accepts() == 0 {
		t.Fatal("the TLS server accepted nothing")
	}
	// A name the server's certificate does not carry: refused.
	link.SNI = "other.external.test"
	a.linkServices(t, gwName, api.LinkedService{Name: ext}, link)
	eventually(t, 30*time.Second, func() error { return refusedVia("tcp", upTLS) })
	for _, result := range []string{"originate_failed", "denied"} {
		eventually(t, 10*time.Second, func() error {
			if v := metricValue(t, gw, `gateway_connections_total{result="`+result+`"}`); v < 1 {
				return fmt.Errorf("%s counted %v times", result, v)
			}
			return nil
		})
	}
	// Unlinking the plain service stops the gateway serving it.
	a.linkServices(t, gwName, link)
	eventually(t, 30*time.Second, func() error {
		return refusedAtGatewayTLS(hostPort(gwPort), sni(ext, a.dc, a.trustDomain), a.leaf(t, web))
	})
}

// refusedAtGatewayTLS expects a mesh client's handshake with serverName
// to fail.
func refusedAtGatewayTLS(addr, serverName string, cert tls.Certificate) error {
	cfg := &tls.Config{ServerName: serverName, InsecureSkipVerify: true, Certificates: []tls.Certificate{cert}}
	c, err := dialMesh(addr, cfg)
	if err == nil {
		c.Close()
		return errors.New("handshake completed")
	}
	return nil
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
