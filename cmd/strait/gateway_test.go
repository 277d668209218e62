package main

import (
	"bytes"
	"strings"
	"testing"
)

// TestGatewayInvalidInput: mistakes in gateway mode, and gateway flags
// outside it, are one line and exit status 2, before anything starts.
func TestGatewayInvalidInput(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"other kind", []string{"-gateway", "api"}, `-gateway "api": want mesh, terminating or ingress`},
		{"empty kind", []string{"-gateway", ""}, `-gateway "": want mesh`},
		{"wan on terminating", []string{"-gateway", "terminating", "-wan-address", "1.2.3.4"}, "-wan-address applies only with -gateway mesh"},
		{"max-watches on ingress", []string{"-gateway", "ingress", "-max-watches", "3"}, "-max-watches applies only with -gateway mesh"},
		{"listen on ingress", []string{"-gateway", "ingress", "-listen", "127.0.0.1:1"}, "-listen does not apply with -gateway ingress"},
		{"proxy flag", []string{"-gateway", "mesh", "-listen", "127.0.0.1:1"}, "-listen does not apply with -gateway mesh"},
		{"upstream", []string{"-gateway", "mesh", "-upstream", "db:9000"}, "-upstream does not apply"},
		{"datacenter", []string{"-gateway", "mesh", "-datacenter", "dc2"}, "-datacenter does not apply"},
		{"sidecar-for", []string{"-gateway", "mesh", "-sidecar-for", "web"}, "-sidecar-for does not apply"},
		{"address without gateway", []string{"-service", "web", "-address", "127.0.0.1:8443"}, "-address applies only with -gateway"},
		{"max-watches without gateway", []string{"-service", "web", "-max-watches", "3"}, "-max-watches applies only"},
		{"bad port", []string{"-gateway", "mesh", "-address", "127.0.0.1:99999"}, "-address"},
		{"name as LAN host", []string{"-gateway", "mesh", "-address", "gw.example:8443"}, "must be an IP address"},
		{"bad wan", []string{"-gateway", "mesh", "-wan-address", "a:b:c"}, "-wan-address"},
		{"wan without host", []string{"-gateway", "mesh", "-wan-address", ":9443"}, "-wan-address \":9443\": needs a host"},
		{"zero hello timeout", []string{"-gateway", "mesh", "-hello-timeout", "0s"}, "-hello-timeout"},
		{"zero max-pending", []string{"-gateway", "mesh", "-max-pending", "0"}, "-max-pending"},
		{"zero max-connections", []string{"-gateway", "mesh", "-max-connections", "0"}, "-max-connections"},
		{"zero max-watches", []string{"-gateway", "mesh", "-max-watches", "0"}, "-max-watches"},
		{"bad log level", []string{"-gateway", "mesh", "-log-level", "loud"}, "-log-level"},
		{"empty service", []string{"-gateway", "mesh", "-service", ""}, "-service"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var stdout, stderr bytes.Buffer
			if code := run(tc.args, &stdout, &stderr); code != 2 {
				t.Fatalf("exit %d, want 2 (stderr %q)", code, stderr.String())
			}
			lines := strings.Split(strings.TrimRight(stderr.String(), "\n"), "\n")
			if len(lines) != 1 || !strings.Contains(lines[0], tc.want) {
				t.Fatalf("stderr %q: want one line containing %q", stderr.String(), tc.want)
			}
		})
	}
}

func TestGatewayFlags(t *testing.T) {
	t.Parallel()
	o, err := parseFlags([]string{"-gateway", "mesh", "-address", "10.0.0.5", "-wan-address", "203.0.113.7"})
	if err != nil {
		t.Fatal(err)
	}
	if o.service != "mesh-gateway" || o.gatewayID() != "mesh-gateway" {
		t.Errorf("service %q, id %q: want mesh-gateway for both", o.service, o.gatewayID())
	}
	if o.gw.lanHost != "10.0.0.5" || o.gw.lanPort != 8443 || o.gw.wanHost != "203.0.113.7" || o.gw.wanPort != 8443 {
		t.Errorf("addresses %+v: want port 8443 when omitted", o.gw)
	}
	o, err = parseFlags([]string{"-gateway", "mesh", "-service", "gw-east", "-proxy-id", "gw-east-1", "-address", ":9000", "-wan-address", "198.51.100.1"})
	if err != nil {
		t.Fatal(err)
	}
	if o.service != "gw-east" || o.gatewayID() != "gw-east-1" || o.gw.lanHost != "" || o.gw.lanPort != 9000 || o.gw.wanPort != 9000 {
		t.Errorf("got service %q id %q lan %q:%d wan port %d", o.service, o.gatewayID(), o.gw.lanHost, o.gw.lanPort, o.gw.wanPort)
	}
	var out bytes.Buffer
	if err := writeHelp(&out); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"-gateway", "strait -gateway mesh", "-wan-address", "-max-pending"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("-h lacks %q", want)
		}
	}
}
