package main

import (
	"bytes"
	"flag"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"github.com/hashicorp/consul/api"
)

// TestInvalidInput: each mistake is one line on stderr, exit status 2, and
// nothing started (no agent is reachable at the default address in these
// cases, and none is needed: validation happens before any client exists).
func TestInvalidInput(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"unknown flag", []string{"-bogus"}, "flag provided but not defined: -bogus"},
		{"bad upstream", []string{"-service", "web", "-upstream", "db"}, `upstream "db"`},
		{"bad upstream type", []string{"-service", "web", "-upstream", "db.nope:80"}, "type must be"},
		{"port out of range", []string{"-service", "web", "-upstream", "db:70000"}, "out of range"},
		{"listen without service-addr", []string{"-service", "web", "-listen", "127.0.0.1:0"}, "-listen requires -service-addr"},
		{"neither mode", []string{"-log-level", "debug"}, "no mode given"},
		{"both modes", []string{"-sidecar-for", "web", "-service", "web"}, "both modes given"},
		{"register without listen", []string{"-service", "web", "-register"}, "-register requires -listen"},
		{"bad log level", []string{"-service", "web", "-log-level", "loud"}, "-log-level"},
		{"stray argument", []string{"-service", "web", "extra"}, "unexpected argument"},
		{"bad listen port", []string{"-service", "web", "-service-addr", "127.0.0.1:80", "-listen", "127.0.0.1:99999"}, "-listen"},
		{"negative max-inbound-connections", []string{"-service", "web", "-max-inbound-connections", "-1"}, "-max-inbound-connections"},
		{"zero max-handshakes", []string{"-service", "web", "-max-handshakes", "0"}, "-max-handshakes"},
		{"zero max-outbound-connections", []string{"-service", "web", "-max-outbound-connections", "0"}, "-max-outbound-connections"},
		{"bad ktls", []string{"-service", "web", "-ktls", "on"}, "-ktls"},
		{"bad tls-kex", []string{"-service", "web", "-tls-kex", "rsa"}, "-tls-kex"},
		{"duplicate bind", []string{"-service", "web", "-upstream", "a:9000", "-upstream", "b:9000"}, "two upstreams bind"},
		{"bad access-log", []string{"-service", "web", "-access-log", "all"}, "-access-log"},
		{"bad admin-bind", []string{"-service", "web", "-admin-bind", "19100"}, "-admin-bind"},
		{"bad statsd-addr", []string{"-service", "web", "-statsd-addr", "localhost"}, "-statsd-addr"},
		{"unix statsd-addr", []string{"-service", "web", "-statsd-addr", "unix:///run/statsd.sock"}, "only supported for dogstatsd"},
		{"bad dogstatsd-addr", []string{"-service", "web", "-dogstatsd-addr", "unix://dsd.sock"}, "-dogstatsd-addr"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var stdout, stderr bytes.Buffer
			code := run(tc.args, &stdout, &stderr)
			if code != 2 {
				t.Fatalf("exit %d, want 2 (stderr %q)", code, stderr.String())
			}
			lines := strings.Split(strings.TrimRight(stderr.String(), "\n"), "\n")
			if len(lines) != 1 || !strings.Contains(lines[0], tc.want) {
				t.Fatalf("stderr %q: want one line containing %q", stderr.String(), tc.want)
			}
			if stdout.Len() != 0 {
				t.Fatalf("unexpected stdout %q", stdout.String())
			}
		})
	}
}

// TestTelemetryFlags: flags become the telemetry overlay; -disable-hostname
// only when given.
func TestTelemetryFlags(t *testing.T) {
	t.Parallel()
	o, err := parseFlags([]string{"-service", "web", "-statsd-addr", "127.0.0.1:8125", "-dogstatsd-tags", "env:prod, team:a", "-metrics-prefix", "strait"})
	if err != nil {
		t.Fatal(err)
	}
	tel := o.telemetry()
	if tel.StatsdAddr != "127.0.0.1:8125" || tel.MetricsPrefix != "strait" || len(tel.DogstatsdTags) != 2 || tel.DogstatsdTags[1] != "team:a" || tel.DisableHostname != nil {
		t.Fatalf("telemetry %+v", tel)
	}
	if o, err = parseFlags([]string{"-service", "web", "-disable-hostname"}); err != nil {
		t.Fatal(err)
	}
	if tel := o.telemetry(); tel.DisableHostname == nil || !*tel.DisableHostname {
		t.Fatalf("-disable-hostname: %+v", tel)
	}
	if o.adminBind != "127.0.0.1:19100" || o.accessLog != "denied-only" {
		t.Fatalf("defaults: admin %q access %q", o.adminBind, o.accessLog)
	}
}

func TestVersion(t *testing.T) {
	t.Parallel()
	var stdout, stderr bytes.Buffer
	if code := run([]string{"version"}, &stdout, &stderr); code != 0 {
		t.Fatalf("exit %d", code)
	}
	if !strings.HasPrefix(stdout.String(), "strait ") {
		t.Fatalf("version output %q", stdout.String())
	}
}

// TestDependencies keeps the binary's link graph clean: the BUSL-licensed
// Consul root module (the whole server) belongs in the integration tests
// only, and test libraries never ship.
func TestDependencies(t *testing.T) {
	t.Parallel()
	out, err := exec.Command("go", "list", "-deps", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	deps := strings.Fields(string(out))
	if len(deps) < 50 {
		t.Fatalf("suspiciously few dependencies (%d): %v", len(deps), deps)
	}
	for _, d := range deps {
		switch {
		case d == "testing", strings.HasPrefix(d, "testing/"),
			strings.HasPrefix(d, "github.com/stretchr/testify"),
			strings.HasPrefix(d, "google.golang.org/grpc"),
			d == "github.com/hashicorp/consul" || (strings.HasPrefix(d, "github.com/hashicorp/consul/") && !strings.HasPrefix(d, "github.com/hashicorp/consul/api") &&
				d != "github.com/hashicorp/consul/sdk/iptables"): // MPL-2.0, Consul's own redirect rules
			t.Errorf("binary links %s", d)
		}
	}
}

// TestHelpListsEveryFlag: -h, -help and --help print the grouped help on
// stdout and exit 0; every flag of the FlagSet has an entry with its
// default, its environment variable and a meaning. A flag added without a
// place in help.go makes -h fail, and so this test.
func TestHelpListsEveryFlag(t *testing.T) {
	t.Parallel()
	for _, arg := range []string{"-h", "-help", "--help"} {
		var stdout, stderr bytes.Buffer
		if code := run([]string{arg}, &stdout, &stderr); code != 0 || stderr.Len() != 0 {
			t.Fatalf("%s: exit %d, stderr %q", arg, code, stderr.String())
		}
		out := stdout.String()
		for _, g := range help.Groups {
			if !strings.Contains(out, "\n"+g.Title+":\n") {
				t.Errorf("%s: group %q missing", arg, g.Title)
			}
		}
		if !strings.Contains(out, "\nExamples:\n") || !strings.Contains(out, "strait -sidecar-for web\n") || !strings.Contains(out, "-upstream db:9191") {
			t.Errorf("%s: examples missing", arg)
		}
		lines := strings.Split(out, "\n")
		newFlagSet(&options{}).VisitAll(func(f *flag.Flag) {
			i := slices.IndexFunc(lines, func(l string) bool {
				return strings.HasPrefix(l, "  -"+f.Name+" ") || l == "  -"+f.Name
			})
			if i < 0 {
				t.Errorf("%s: no entry for -%s", arg, f.Name)
				return
			}
			if f.DefValue != "" && !strings.Contains(lines[i], "default "+f.DefValue) {
				t.Errorf("%s: -%s entry %q lacks its default %q", arg, f.Name, lines[i], f.DefValue)
			}
			if env := help.Env[f.Name]; env != "" && !strings.Contains(lines[i], "env "+env) {
				t.Errorf("%s: -%s entry %q lacks env %s", arg, f.Name, lines[i], env)
			}
			if i+1 >= len(lines) || !strings.HasPrefix(lines[i+1], "      ") || strings.TrimSpace(lines[i+1]) == "" {
				t.Errorf("%s: -%s has no meaning line", arg, f.Name)
			}
		})
	}
}

// TestHelpEnv: the help names, for each agent API flag, the variable the
// API client really falls back to.
func TestHelpEnv(t *testing.T) {
	t.Parallel()
	for flagName, env := range map[string]string{
		"http-addr": api.HTTPAddrEnvName, "token": api.HTTPTokenEnvName, "token-file": api.HTTPTokenFileEnvName,
		"ca-file": api.HTTPCAFile, "ca-path": api.HTTPCAPath, "client-cert": api.HTTPClientCert,
		"client-key": api.HTTPClientKey, "tls-server-name": api.HTTPTLSServerName,
		"proxy-id": "CONNECT_PROXY_ID", "sidecar-for": "CONNECT_SIDECAR_FOR",
	} {
		if help.Env[flagName] != env {
			t.Errorf("-%s: env %q, want %q", flagName, help.Env[flagName], env)
		}
	}
}
