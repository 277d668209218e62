package integration

import (
	"fmt"
	"net"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// TestRedirectTrafficInNetns: `strait redirect-traffic -proxy-id` reads a
// transparent proxy's registration from a real agent and installs the
// rules in a namespace of the test's own: TCP arriving at any port goes to
// the proxy's inbound port (bind_port), TCP leaving the namespace goes to
// its outbound listener port, the excluded ports (a flag, an exposed path)
// are left alone. Consul's own `consul connect redirect-traffic` with the
// same flags, in a second namespace, installs exactly the same nat table.
func TestRedirectTrafficInNetns(t *testing.T) {
	t.Parallel()
	requireNetns(t)
	a := startAgent(t)
	svc := uniq("web")
	proxyID := svc + "-sidecar-proxy"
	const inbound, outbound, exposed = 21001, 15123, 21500
	err := a.client.Agent().ServiceRegister(&api.AgentServiceRegistration{
		Kind: api.ServiceKindConnectProxy, ID: proxyID, Name: proxyID, Port: 21000, Address: "127.0.0.1",
		Proxy: &api.AgentServiceConnectProxyConfig{
			DestinationServiceName: svc,
			Mode:                   api.ProxyModeTransparent,
			TransparentProxy:       &api.TransparentProxyConfig{OutboundListenerPort: outbound},
			Config:                 map[string]any{"bind_port": inbound},
			Expose:                 api.ExposeConfig{Paths: []api.ExposePath{{ListenerPort: exposed, Path: "/health", LocalPathPort: 8080, Protocol: "http"}}},
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	flags := []string{"-http-addr", a.httpAddr, "-proxy-uid", "4242", "-proxy-id", proxyID, "-exclude-inbound-port", "22", "-exclude-outbound-cidr", "192.0.2.0/24"}

	ns := newNetns(t)
	out, err := exec.Command(straitBin, append([]string{"redirect-traffic", "-netns", ns.path()}, flags...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("strait redirect-traffic: %v\n%s", err, out)
	}

	const inKey, outKey = 0x11, 0x22
	ns.startEchoIn(t, "inbound-app", fmt.Sprintf("0.0.0.0:%d", inbound), inKey)
	ns.startEchoIn(t, "outbound-app", fmt.Sprintf("127.0.0.1:%d", outbound), outKey)

	// Inbound: any port of the namespace's address reaches the proxy's
	// inbound port.
	for _, port := range []int{80, 8080, 9999} {
		if err := echoVia("tcp", net.JoinHostPort(ns.inner, fmt.Sprint(port)), 512, inKey); err != nil {
			t.Errorf("inbound to port %d: %v (want it redirected to %d)", port, err, inbound)
		}
	}
	// Excluded inbound ports are not redirected: nothing listens there.
	for _, port := range []int{22, exposed} {
		if err := dialFails(net.JoinHostPort(ns.inner, fmt.Sprint(port))); err != nil {
			t.Errorf("inbound to excluded port %d: %v", port, err)
		}
	}
	// Outbound: a connection from inside the namespace to anywhere lands
	// on the outbound listener.
	c, err := ns.dial(net.JoinHostPort(ns.outer, "443"), 5*time.Second)
	if err != nil {
		t.Fatalf("outbound from the namespace: %v", err)
	}
	defer c.Close()
	if err := roundTrip(c, randomBytes(t, 512), outKey, 10*time.Second); err != nil {
		t.Errorf("outbound to %s:443: %v (want it redirected to %d)", ns.outer, err, outbound)
	}

	// Consul's own command, same flags, another namespace: the same table.
	ns2 := newNetns(t)
	out, err = exec.Command(consulBin, append([]string{"connect", "redirect-traffic", "-netns", ns2.path()}, flags...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("consul connect redirect-traffic: %v\n%s", err, out)
	}
	mine, theirs := ns.natRules(t), ns2.natRules(t)
	if mine != theirs {
		t.Errorf("nat tables differ:\nstrait:\n%s\nconsul:\n%s", mine, theirs)
	}
	for _, want := range []string{fmt.Sprintf("--to-ports %d", inbound), fmt.Sprintf("--to-ports %d", outbound), "--uid-owner 4242", fmt.Sprintf("--dport %d -j RETURN", exposed), "-d 192.0.2.0/24 -j RETURN"} {
		if !strings.Contains(mine, want) {
			t.Errorf("strait's rules lack %q:\n%s", want, mine)
		}
	}
}
