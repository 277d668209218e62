package config

import (
	"fmt"
	"net"
	"path/filepath"
	"strconv"
	"strings"
)

// ParseUpstream parses the -upstream flag grammar of `consul connect proxy`,
//
//	<name>[.service|.query]:[<bind-host>:]<port>
//
// extended with a cluster peer (db@peer-b:9191, a service imported from
// the peering named peer-b), with bracketed IPv6 hosts (db:[::1]:8181) and unix sockets
// (db:unix:/run/db.sock), which the built-in cannot express. The port is
// parsed as Consul does (base prefixes such as 0x allowed) and must be in
// 1-65535. The bind host defaults to 127.0.0.1.
func ParseUpstream(s string) (Upstream, error) {
	name, rest, ok := strings.Cut(s, ":")
	if !ok || rest == "" {
		return Upstream{}, fmt.Errorf("upstream %q: want <name>[.service|.query]:[<bind-host>:]<port>", s)
	}
	u := Upstream{DestinationType: TypeService}
	if n, typ, hasType := strings.Cut(name, "."); hasType {
		name = n
		switch typ {
		case "", "service":
		case "query":
			u.DestinationType = TypePreparedQuery
		default:
			return Upstream{}, fmt.Errorf("upstream %q: type must be blank, 'service' or 'query', got %q", s, typ)
		}
	}
	if n, peer, hasPeer := strings.Cut(name, "@"); hasPeer {
		if peer == "" || strings.ContainsAny(peer, "@/") {
			return Upstream{}, fmt.Errorf("upstream %q: bad peer name %q", s, peer)
		}
		if u.DestinationType != TypeService {
			return Upstream{}, fmt.Errorf("upstream %q: a prepared query cannot have a destination peer", s)
		}
		name, u.DestinationPeer = n, peer
	}
	if name == "" {
		return Upstream{}, fmt.Errorf("upstream %q: empty destination name", s)
	}
	u.DestinationName = name

	if path, isUnix := strings.CutPrefix(rest, "unix:"); isUnix {
		if !filepath.IsAbs(path) {
			return Upstream{}, fmt.Errorf("upstream %q: unix socket path must be absolute", s)
		}
		u.LocalBindSocketPath = filepath.Clean(path)
		return u, nil
	}

	portRaw := rest
	if strings.HasPrefix(rest, "[") || strings.Contains(rest, ":") {
		host, port, err := net.SplitHostPort(rest)
		if err != nil {
			return Upstream{}, fmt.Errorf("upstream %q: bad bind address %q: %w", s, rest, err)
		}
		if host == "" {
			return Upstream{}, fmt.Errorf("upstream %q: empty bind host", s)
		}
		if strings.HasPrefix(rest, "[") && net.ParseIP(host) == nil {
			return Upstream{}, fmt.Errorf("upstream %q: %q is not an IPv6 address", s, host)
		}
		u.LocalBindAddress, portRaw = host, port
	}
	port, err := strconv.ParseInt(portRaw, 0, 0)
	if err != nil {
		return Upstream{}, fmt.Errorf("upstream %q: port %q is not a number", s, portRaw)
	}
	if port < 1 || port > 65535 {
		return Upstream{}, fmt.Errorf("upstream %q: port %d out of range 1-65535", s, port)
	}
	u.LocalBindPort = int(port)
	return u, nil
}

// ParseListen parses a -listen host:port into a Public. Port 0 asks the
// kernel for a free port.
func ParseListen(s string) (host string, port int, err error) {
	h, p, err := net.SplitHostPort(s)
	if err != nil {
		return "", 0, fmt.Errorf("listen address %q: %w", s, err)
	}
	n, err := strconv.ParseInt(p, 0, 0)
	if err != nil || n < 0 || n > 65535 {
		return "", 0, fmt.Errorf("listen address %q: port %q is not in 0-65535", s, p)
	}
	return h, int(n), nil
}
