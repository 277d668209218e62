// Package tproxy holds strait's transparent-proxy pieces.
//
// Traffic redirection (redirect.go): the iptables rules that send a pod's
// or a VM's traffic through strait (`strait redirect-traffic`). The rules
// are Consul's own, from github.com/hashicorp/consul/sdk/iptables, so a
// workload redirected by strait looks exactly like one redirected by
// `consul connect redirect-traffic` or consul-k8s: inbound TCP to the
// proxy's public port, outbound TCP to its outbound listener, the proxy's
// own user and loopback excluded. OriginalDst reads where a redirected
// connection was going (SO_ORIGINAL_DST).
//
// Outbound routing (outbound.go, implicit.go, table.go): the implicit
// upstreams of a transparent proxy, every service the intentions let it
// reach (Consul's IntentionUpstreams, computed from blocking watches), each
// followed as a discovery chain by package upstream, and the Table that
// maps their virtual IPs (and DialedDirectly instance addresses), on any
// port, to them. The outbound listener itself, its limits, metrics and
// access log are package proxy's.
//
// Permissive mutual TLS (mtls.go): the service's MutualTLSMode, watched
// in the config entries.
package tproxy
