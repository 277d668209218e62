package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"

	"github.com/hashicorp/consul/sdk/iptables"

	"github.com/straitproxy/strait/config"
	"github.com/straitproxy/strait/internal/usage"
	"github.com/straitproxy/strait/tproxy"
)

// stringList is a repeatable string flag.
type stringList []string

func (l *stringList) String() string     { return strings.Join(*l, ",") }
func (l *stringList) Set(s string) error { *l = append(*l, s); return nil }

type redirectOptions struct {
	r      tproxy.Redirect
	api    config.API
	dryRun bool
}

func newRedirectFlagSet(o *redirectOptions) *flag.FlagSet {
	fs := flag.NewFlagSet("strait redirect-traffic", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.StringVar(&o.r.ProxyUID, "proxy-uid", "", "The `uid` strait runs as; its own traffic is not redirected. Required.")
	fs.StringVar(&o.r.ProxyID, "proxy-id", "", "The proxy's service `ID`: its inbound port (bind_port, else the registered port), outbound listener port and exposed ports come from the registration.")
	fs.StringVar(&o.r.NodeName, "node-name", "", "Find -proxy-id in the catalog on this `node` instead of the local agent (no client agent).")
	fs.IntVar(&o.r.ProxyInboundPort, "proxy-inbound-port", 0, "Without -proxy-id: the `port` of strait's public listener.")
	fs.IntVar(&o.r.ProxyOutboundPort, "proxy-outbound-port", 0, "Without -proxy-id: the `port` of strait's outbound (transparent) listener; 0 means 15001.")
	fs.Var((*stringList)(&o.r.ExcludeInboundPorts), "exclude-inbound-port", "Repeatable: inbound `port` (or a:b range) not redirected.")
	fs.Var((*stringList)(&o.r.ExcludeOutboundPorts), "exclude-outbound-port", "Repeatable: outbound `port` (or a:b range) not redirected.")
	fs.Var((*stringList)(&o.r.ExcludeOutboundCIDRs), "exclude-outbound-cidr", "Repeatable: outbound `CIDR` (or address) not redirected.")
	fs.Var((*stringList)(&o.r.ExcludeUIDs), "exclude-uid", "Repeatable: `uid` whose outbound traffic is not redirected.")
	fs.StringVar(&o.r.ConsulDNSIP, "consul-dns-ip", "", "Send DNS queries (port 53) to Consul DNS at this `IP`.")
	fs.IntVar(&o.r.ConsulDNSPort, "consul-dns-port", 0, "Consul DNS `port` (with -consul-dns-ip, or 127.0.0.1).")
	fs.StringVar(&o.r.NetNS, "netns", "", "Apply the rules in this network namespace: a `path` such as /var/run/netns/pod (runs iptables through nsenter).")
	fs.BoolVar(&o.dryRun, "dry-run", false, "Print the iptables commands instead of running them.")
	addAPIFlags(fs, &o.api)
	return fs
}

var redirectHelp = usage.Help{
	Usage: []string{"strait redirect-traffic -proxy-uid UID (-proxy-id ID | -proxy-inbound-port PORT) [flags]"},
	Summary: "Installs the iptables rules that send a workload's TCP traffic through strait for transparent proxy: " +
		"inbound connections to strait's public listener, outbound ones to its outbound listener (15001 unless " +
		"the registration says otherwise), strait's own user and loopback excluded. The rules are Consul's own " +
		"(github.com/hashicorp/consul/sdk/iptables), the same `consul connect redirect-traffic` and consul-k8s " +
		"install; the flags are that command's. Needs root (CAP_NET_ADMIN) and the iptables command.",
	Groups: []usage.Group{
		{Title: "Proxy", Flags: []string{"proxy-uid", "proxy-id", "node-name", "proxy-inbound-port", "proxy-outbound-port"}},
		{Title: "Exclusions", Flags: []string{"exclude-inbound-port", "exclude-outbound-port", "exclude-outbound-cidr", "exclude-uid"}},
		{Title: "DNS", Flags: []string{"consul-dns-ip", "consul-dns-port"}},
		{Title: "Where", Flags: []string{"netns", "dry-run"}},
		{Title: "Agent API", Flags: []string{"http-addr", "token", "token-file", "ca-file", "ca-path", "client-cert", "client-key", "tls-server-name", "datacenter"}},
	},
	Env: apiEnv(),
	Examples: []usage.Example{
		{Comment: "On a VM, strait runs as user strait (uid 995) for the registration web-sidecar-proxy; SSH stays direct:",
			Command: "strait redirect-traffic -proxy-uid 995 -proxy-id web-sidecar-proxy -exclude-inbound-port 22"},
		{Comment: "Kubernetes init container (root, the pod's namespace), no client agent: the proxy from the catalog, strait as uid 5995, the kubelet's probes on 20300 left alone:",
			Command: "strait redirect-traffic -http-addr https://consul-server.consul:8501 -ca-file /consul/tls/ca.pem -token-file /consul/login/acl-token -proxy-uid 5995 -proxy-id $(POD_NAME)-web-sidecar-proxy -node-name $(NODE_NAME)-virtual -exclude-inbound-port 20300"},
		{Comment: "Without an agent at all: ports given, rules printed:",
			Command: "strait redirect-traffic -proxy-uid 5995 -proxy-inbound-port 20000 -dry-run"},
	},
	Notes: []string{
		"Invalid flags print one line and exit with status 2; a failure to read the registration or to apply the rules exits with 1.",
	},
}

// runRedirect is `strait redirect-traffic`.
func runRedirect(args []string, stdout, stderr io.Writer) int {
	o := &redirectOptions{}
	fs := newRedirectFlagSet(o)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			if err := usage.Write(stdout, newRedirectFlagSet(&redirectOptions{}), redirectHelp); err != nil {
				fmt.Fprintf(stderr, "strait redirect-traffic: -h: %v\n", err)
				return 1
			}
			return 0
		}
		fmt.Fprintf(stderr, "strait redirect-traffic: %v (strait redirect-traffic -h lists the flags)\n", err)
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "strait redirect-traffic: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	if err := o.r.Validate(); err != nil {
		fmt.Fprintf(stderr, "strait redirect-traffic: %v\n", err)
		return 2
	}
	// Without -proxy-id and with -dry-run nothing needs the agent.
	needAgent := o.r.ProxyID != "" || !o.dryRun
	var dual bool
	var cfg iptables.Config
	if needAgent {
		agent, err := o.api.Connect()
		if err != nil {
			fmt.Fprintf(stderr, "strait redirect-traffic: %v\n", err)
			return 2
		}
		if cfg, err = o.r.Config(agent.Client); err != nil {
			fmt.Fprintf(stderr, "strait redirect-traffic: %v\n", err)
			return 1
		}
		if dual, err = tproxy.DualStack(agent.Client); err != nil {
			fmt.Fprintf(stderr, "strait redirect-traffic: %v\n", err)
			return 1
		}
	} else {
		var err error
		if cfg, err = o.r.Config(nil); err != nil {
			fmt.Fprintf(stderr, "strait redirect-traffic: %v\n", err)
			return 2
		}
	}
	if o.dryRun {
		rules, err := tproxy.Rules(cfg, dual)
		if err != nil {
			fmt.Fprintf(stderr, "strait redirect-traffic: %v\n", err)
			return 1
		}
		for _, r := range rules {
			fmt.Fprintln(stdout, r)
		}
		return 0
	}
	if err := tproxy.Apply(cfg, dual); err != nil {
		fmt.Fprintf(stderr, "strait redirect-traffic: %v\n", err)
		return 1
	}
	fmt.Fprintln(stdout, "traffic redirection rules applied")
	return 0
}

// apiEnv is the environment fallbacks of the agent API flags.
func apiEnv() map[string]string {
	env := map[string]string{}
	for k, v := range help.Env {
		if strings.HasPrefix(v, "CONSUL_") {
			env[k] = v
		}
	}
	return env
}
