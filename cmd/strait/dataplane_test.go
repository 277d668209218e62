package main

import (
	"bytes"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"sigs.k8s.io/yaml"
)

// TestAgentlessPodArgs runs the sidecar of deploy/kubernetes/agentless
// (consul-k8s's arguments and environment, unchanged) through strait
// dataplane's parser, with $(VAR) references expanded as the kubelet does.
func TestAgentlessPodArgs(t *testing.T) {
	raw, err := os.ReadFile("../../deploy/kubernetes/agentless/pod.yaml")
	if err != nil {
		t.Fatal(err)
	}
	type podContainer struct {
		Name    string   `json:"name"`
		Command []string `json:"command"`
		Args    []string `json:"args"`
		Env     []struct {
			Name  string `json:"name"`
			Value string `json:"value"`
		} `json:"env"`
	}
	var pod struct {
		Spec struct {
			Containers []podContainer `json:"containers"`
		} `json:"spec"`
	}
	if err := yaml.Unmarshal(raw, &pod); err != nil {
		t.Fatal(err)
	}
	i := slices.IndexFunc(pod.Spec.Containers, func(c podContainer) bool { return c.Name == "consul-dataplane" })
	if i < 0 {
		t.Fatal("no consul-dataplane container")
	}
	c := pod.Spec.Containers[i]
	// The downward API's values, then the kubelet's $(VAR) expansion.
	vars := map[string]string{"NODE_NAME": "node-1", "POD_NAME": "web-abc", "POD_NAMESPACE": "default", "POD_UID": "u-1", "HOST_IP": "10.0.0.1"}
	ref := regexp.MustCompile(`\$\(([A-Z_0-9]+)\)`)
	expand := func(s string) string {
		return ref.ReplaceAllStringFunc(s, func(m string) string { return vars[m[2:len(m)-1]] })
	}
	for _, e := range c.Env {
		if e.Value != "" {
			vars[e.Name] = expand(e.Value)
		}
		if strings.HasPrefix(e.Name, "DP_") {
			t.Setenv(e.Name, vars[e.Name])
		}
	}
	if len(c.Command) < 2 || c.Command[1] != "dataplane" {
		t.Fatalf("command %v", c.Command)
	}
	args := append(slices.Clone(c.Command[2:]), c.Args...)
	for k := range args {
		args[k] = expand(args[k])
	}
	o, err := parseDataplaneFlags(args)
	if err != nil {
		t.Fatalf("strait dataplane %s: %v", strings.Join(args, " "), err)
	}
	d := o.dp
	if d.nodeName != "node-1-virtual" || d.proxyIDPath != "/consul/connect-inject/proxyid" || d.addresses != "consul-server.consul.svc" {
		t.Errorf("node %q, id path %q, addresses %q", d.nodeName, d.proxyIDPath, d.addresses)
	}
	if d.loginMeta["pod"] != "default/web-abc" || d.loginMeta["pod-uid"] != "u-1" {
		t.Errorf("login meta %v", d.loginMeta)
	}
	if o.shutdownGrace != 15*time.Second || !d.tlsDisabled || d.credType != "login" {
		t.Errorf("grace %s, tls-disabled %v, credential %q", o.shutdownGrace, d.tlsDisabled, d.credType)
	}
	for _, f := range []string{"envoy-admin-bind-address", "xds-bind-addr", "envoy-concurrency", "telemetry-prom-scrape-path"} {
		if !slices.Contains(d.ignored, f) {
			t.Errorf("-%s not reported as ignored (%v)", f, d.ignored)
		}
	}
}

// Invalid dataplane flags: one line, exit 2, nothing started.
func TestDataplaneBadFlags(t *testing.T) {
	base := []string{"dataplane", "-addresses", "127.0.0.1", "-proxy-service-id", "p", "-service-node-name", "n"}
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"dataplane", "-nope"}, "flag provided but not defined"},
		{[]string{"dataplane", "-proxy-service-id", "p", "-service-node-name", "n"}, "-addresses is required"},
		{[]string{"dataplane", "-addresses", "a:1", "-proxy-service-id", "p", "-service-node-name", "n"}, "without a port"},
		{append(slices.Clone(base), "-credential-type", "login"), "requires -login-auth-method"},
		{append(slices.Clone(base), "-credential-type", "oidc"), "want login or static"},
		{append(slices.Clone(base), "-grpc-port", "0"), "-grpc-port 0 out of range"},
		{append(slices.Clone(base), "-tunnels", "maybe"), "-tunnels"},
		{append(slices.Clone(base), "stray"), "unexpected argument"},
		{[]string{"dataplane", "-addresses", "127.0.0.1", "-proxy-service-id", "p"}, "-service-node-name is required"},
		{append(slices.Clone(base), "-config-file", "/etc/dp.json"), "-config-file is not supported"},
		{append(slices.Clone(base), "-tls-cert", "/c.pem"), "-tls-cert and -tls-key go together"},
	} {
		t.Setenv("DP_SERVICE_NODE_NAME", "")
		var stdout, stderr bytes.Buffer
		code := run(c.args, &stdout, &stderr)
		if code != 2 || strings.Count(stderr.String(), "\n") != 1 || !strings.Contains(stderr.String(), c.want) || stdout.Len() != 0 {
			t.Errorf("%v: exit %d, stderr %q; want exit 2 and one line with %q", c.args, code, stderr.String(), c.want)
		}
	}
	// Envoy arguments after -- are accepted.
	if _, err := parseDataplaneFlags(append(slices.Clone(base[1:]), "--", "--base-id", "1")); err != nil {
		t.Errorf("envoy args after --: %v", err)
	}
}

func TestDataplaneHelp(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if code := run([]string{"dataplane", "-h"}, &stdout, &stderr); code != 0 || stderr.Len() != 0 {
		t.Fatalf("exit %d, stderr %q", code, stderr.String())
	}
	for _, f := range append([]string{"addresses", "http-port", "login-bearer-token-path", "graceful-port", "admin-bind", "tunnels"}, envoyOnlyFlags...) {
		if !strings.Contains(stdout.String(), "-"+f+" ") && !strings.Contains(stdout.String(), "-"+f+"\n") {
			t.Errorf("-h does not document -%s", f)
		}
	}
}

// -check-proxy-health asks the running strait's /ready (consul-k8s's
// startup probe of a native sidecar) instead of starting a proxy.
func TestCheckProxyHealth(t *testing.T) {
	ready := true
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/ready" || !ready {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
	}))
	defer srv.Close()
	_, port, _ := net.SplitHostPort(srv.Listener.Addr().String())
	for _, c := range []struct {
		ready bool
		want  int
	}{{true, 0}, {false, 1}} {
		ready = c.ready
		var stdout, stderr bytes.Buffer
		if code := run([]string{"dataplane", "-check-proxy-health", "-admin-bind", "0.0.0.0:" + port}, &stdout, &stderr); code != c.want {
			t.Errorf("ready %v: exit %d, want %d (%s)", c.ready, code, c.want, stderr.String())
		}
	}
}
