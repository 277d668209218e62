package main

import (
	"io"

	"github.com/straitproxy/strait/internal/usage"
)

// help is strait's -h text. A flag defined in newFlagSet must be listed in
// one of these groups (TestHelpListsEveryFlag); Env names the variable a
// flag falls back to when not given.
var help = usage.Help{
	Usage: []string{"strait [flags]", "strait -gateway mesh|terminating|ingress [flags]", "strait redirect-traffic [flags] (transparent proxy's iptables rules; strait redirect-traffic -h)", "strait version"},
	Summary: "Runs a Consul service-mesh sidecar proxy in place of `consul connect proxy`, with the same flags " +
		"and environment variables. Agent mode (-proxy-id or -sidecar-for) reads and watches the proxy's " +
		"registration in the local agent; flags mode (-service) takes everything from the command line. " +
		"With -gateway mesh, strait is instead the datacenter's mesh gateway, in place of " +
		"`consul connect envoy -gateway=mesh`: it routes each TLS connection by its ClientHello's server name to " +
		"this datacenter's services or to another datacenter's gateways, without terminating TLS. " +
		"With -gateway terminating, mesh clients reach the services linked to it (which run no sidecar) with each " +
		"service's own certificate and intentions; with -gateway ingress, clients outside the mesh reach mesh " +
		"services on the tcp listeners of its config entry.",
	Groups: []usage.Group{
		{Title: "Mode", Flags: []string{"proxy-id", "sidecar-for", "service", "register", "register-id"}},
		{Title: "Listeners (flags mode)", Flags: []string{"listen", "service-addr", "upstream"}},
		{Title: "Agent API", Flags: []string{"http-addr", "token", "token-file", "ca-file", "ca-path", "client-cert", "client-key", "tls-server-name", "datacenter"}},
		{Title: "Observability", Flags: []string{"log-level", "log-json", "access-log", "admin-bind", "admin-pprof", "pprof-addr",
			"statsd-addr", "statsite-addr", "dogstatsd-addr", "dogstatsd-tags", "metrics-prefix", "disable-hostname"}},
		{Title: "Gateways (-gateway mesh|terminating|ingress; -wan-address, -max-pending, -max-watches are mesh only; also -service, -proxy-id, -register and the agent API and observability flags)", Flags: []string{"gateway", "address", "wan-address", "hello-timeout", "max-connections", "max-pending", "max-watches"}},
		{Title: "Tuning", Flags: []string{"shutdown-grace", "half-close-timeout", "tunnels", "tls-kex", "ktls", "max-inbound-connections", "max-handshakes", "max-outbound-connections"}},
	},
	Env: map[string]string{
		"proxy-id":        "CONNECT_PROXY_ID",
		"sidecar-for":     "CONNECT_SIDECAR_FOR",
		"http-addr":       "CONSUL_HTTP_ADDR",
		"token":           "CONSUL_HTTP_TOKEN",
		"token-file":      "CONSUL_HTTP_TOKEN_FILE",
		"ca-file":         "CONSUL_CACERT",
		"ca-path":         "CONSUL_CAPATH",
		"client-cert":     "CONSUL_CLIENT_CERT",
		"client-key":      "CONSUL_CLIENT_KEY",
		"tls-server-name": "CONSUL_TLS_SERVER_NAME",
	},
	Examples: []usage.Example{
		{Comment: "Sidecar for the registered service web (its web-sidecar-proxy registration):",
			Command: "strait -sidecar-for web"},
		{Comment: "Flags mode: inbound on :21000 to the app on :8080, upstream db on 127.0.0.1:9191, registered:",
			Command: "strait -service web -service-addr 127.0.0.1:8080 -listen 0.0.0.0:21000 -upstream db:9191 -register"},
		{Comment: "Flags mode, outbound only: a client reaching db through a unix socket:",
			Command: "strait -service cli -upstream db:unix:/run/cli/db.sock"},
		{Comment: "Mesh gateway on 10.0.0.5:8443, advertised to other datacenters as 203.0.113.7:8443, registered:",
			Command: "strait -gateway mesh -register -address 10.0.0.5:8443 -wan-address 203.0.113.7:8443"},
		{Comment: "Terminating gateway named tgw for the services its terminating-gateway config entry links:",
			Command: "strait -gateway terminating -register -service tgw -address 10.0.0.6:8443"},
	},
	Notes: []string{
		"The agent API client also honours CONSUL_HTTP_SSL, CONSUL_HTTP_SSL_VERIFY and CONSUL_HTTP_AUTH, " +
			"as Consul's own commands do. Invalid input prints one line and exits with status 2. " +
			"SIGINT/SIGTERM drain for -shutdown-grace (a second signal exits at once); SIGHUP re-reads the " +
			"token file. README.md has the full reference.",
	},
}

// writeHelp prints the -h text for a fresh flag set.
func writeHelp(w io.Writer) error {
	return usage.Write(w, newFlagSet(&options{}), help)
}
