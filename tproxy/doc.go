// Package tproxy holds strait's transparent-proxy pieces. This file's
// concern is traffic redirection: the iptables rules that send a pod's or a
// VM's traffic through strait (`strait redirect-traffic`). The rules are
// Consul's own, from github.com/hashicorp/consul/sdk/iptables, so a
// workload redirected by strait looks exactly like one redirected by
// `consul connect redirect-traffic` or consul-k8s: inbound TCP to the
// proxy's public port, outbound TCP to its outbound listener, the proxy's
// own user and loopback excluded.
package tproxy
