package config

import (
	"strings"
	"testing"
)

func TestParseUpstream(t *testing.T) {
	t.Parallel()
	tests := []struct {
		in   string
		want Upstream
		addr string // Addr()
	}{
		{"db:8181", Upstream{DestinationType: TypeService, DestinationName: "db", LocalBindPort: 8181}, "127.0.0.1:8181"},
		{"db:127.0.0.10:8282", Upstream{DestinationType: TypeService, DestinationName: "db", LocalBindAddress: "127.0.0.10", LocalBindPort: 8282}, "127.0.0.10:8282"},
		{"pq.query:9000", Upstream{DestinationType: TypePreparedQuery, DestinationName: "pq", LocalBindPort: 9000}, "127.0.0.1:9000"},
		{"db.service:1234", Upstream{DestinationType: TypeService, DestinationName: "db", LocalBindPort: 1234}, "127.0.0.1:1234"},
		{"db.:1234", Upstream{DestinationType: TypeService, DestinationName: "db", LocalBindPort: 1234}, "127.0.0.1:1234"},
		{"db:[::1]:8181", Upstream{DestinationType: TypeService, DestinationName: "db", LocalBindAddress: "::1", LocalBindPort: 8181}, "[::1]:8181"},
		{"db:localhost:1", Upstream{DestinationType: TypeService, DestinationName: "db", LocalBindAddress: "localhost", LocalBindPort: 1}, "localhost:1"},
		{"db:65535", Upstream{DestinationType: TypeService, DestinationName: "db", LocalBindPort: 65535}, "127.0.0.1:65535"},
		{"db:unix:/tmp/x.sock", Upstream{DestinationType: TypeService, DestinationName: "db", LocalBindSocketPath: "/tmp/x.sock"}, "/tmp/x.sock"},
		{"db:unix:/tmp//y/../x.sock", Upstream{DestinationType: TypeService, DestinationName: "db", LocalBindSocketPath: "/tmp/x.sock"}, "/tmp/x.sock"},
		{"db:0x1F90", Upstream{DestinationType: TypeService, DestinationName: "db", LocalBindPort: 8080}, "127.0.0.1:8080"},
		{"db:0o17620", Upstream{DestinationType: TypeService, DestinationName: "db", LocalBindPort: 8080}, "127.0.0.1:8080"},
		{"db:10.0.0.1:0x50", Upstream{DestinationType: TypeService, DestinationName: "db", LocalBindAddress: "10.0.0.1", LocalBindPort: 80}, "10.0.0.1:80"},
		{"db@peer-b:9191", Upstream{DestinationType: TypeService, DestinationName: "db", DestinationPeer: "peer-b", LocalBindPort: 9191}, "127.0.0.1:9191"},
		{"db@peer-b.service:9191", Upstream{DestinationType: TypeService, DestinationName: "db", DestinationPeer: "peer-b", LocalBindPort: 9191}, "127.0.0.1:9191"},
	}
	for _, tc := range tests {
		t.Run(tc.in, func(t *testing.T) {
			t.Parallel()
			got, err := ParseUpstream(tc.in)
			if err != nil {
				t.Fatalf("ParseUpstream(%q): %v", tc.in, err)
			}
			if got != tc.want {
				t.Fatalf("ParseUpstream(%q)\n got %+v\nwant %+v", tc.in, got, tc.want)
			}
			if err := got.Validate(); err != nil {
				t.Fatalf("Validate: %v", err)
			}
			if a := got.Addr(); a != tc.addr {
				t.Fatalf("Addr() = %q, want %q", a, tc.addr)
			}
			wantNet := "tcp"
			if tc.want.LocalBindSocketPath != "" {
				wantNet = "unix"
			}
			if n := got.Network(); n != wantNet {
				t.Fatalf("Network() = %q, want %q", n, wantNet)
			}
		})
	}
}

func TestParseUpstreamErrors(t *testing.T) {
	t.Parallel()
	for _, in := range []string{
		"",
		"db",
		"db:",
		":80",
		".query:80",
		"db.bogus:80",
		"db.query.x:80",
		"pq@peer-b.query:80",
		"db@:80",
		"@peer-b:80",
		"db:0",
		"db:65536",
		"db:-1",
		"db:abc",
		"db: 80",
		"db:unix:relative",
		"db:unix:",
		"db:[nothex]:80",
		"db:[::1]",
		"db:[::1]:",
		"db:host:",
		"db::80",
		"db:::1:80",
		"db:host:99999",
		"db:host:port",
	} {
		t.Run(in, func(t *testing.T) {
			t.Parallel()
			got, err := ParseUpstream(in)
			if err == nil {
				t.Fatalf("ParseUpstream(%q) = %+v, want an error", in, got)
			}
			if !strings.Contains(err.Error(), "\""+in+"\"") {
				t.Fatalf("error %q does not quote the input %q", err, in)
			}
			if got != (Upstream{}) {
				t.Fatalf("ParseUpstream(%q) returned %+v with its error", in, got)
			}
		})
	}
}

func TestParseListen(t *testing.T) {
	t.Parallel()
	tests := []struct {
		in   string
		host string
		port int
	}{
		{"127.0.0.1:21000", "127.0.0.1", 21000},
		{"0.0.0.0:0", "0.0.0.0", 0},
		{":8443", "", 8443},
		{"[::]:21000", "::", 21000},
		{"[::1]:0x5208", "::1", 21000},
		{"localhost:65535", "localhost", 65535},
	}
	for _, tc := range tests {
		host, port, err := ParseListen(tc.in)
		if err != nil {
			t.Errorf("ParseListen(%q): %v", tc.in, err)
			continue
		}
		if host != tc.host || port != tc.port {
			t.Errorf("ParseListen(%q) = %q, %d; want %q, %d", tc.in, host, port, tc.host, tc.port)
		}
	}
	for _, in := range []string{"", "8443", "host", "host:", "host:-1", "host:65536", "host:abc", "::1:80", "[::1]"} {
		if h, p, err := ParseListen(in); err == nil {
			t.Errorf("ParseListen(%q) = %q, %d; want an error", in, h, p)
		} else if !strings.Contains(err.Error(), "\""+in+"\"") {
			t.Errorf("ParseListen(%q) error %q does not quote the input", in, err)
		}
	}
}

func FuzzParseUpstream(f *testing.F) {
	for _, s := range []string{
		"db:8181", "db:127.0.0.10:8282", "pq.query:9000", "db.service:1234", "db:[::1]:8181",
		"db:unix:/tmp/x.sock", "db:0x1F90", "db", "db:", ":80", "db.bogus:80", "db:0", "db:65536",
		"db:abc", "db:unix:relative", "db:[nothex]:80", "db:host:", "db:[1.2.3.4]:80", "a.:1",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		u, err := ParseUpstream(s)
		if err != nil {
			if u != (Upstream{}) {
				t.Fatalf("ParseUpstream(%q) returned %+v with error %v", s, u, err)
			}
			return
		}
		if err := u.Validate(); err != nil {
			t.Fatalf("ParseUpstream(%q) = %+v fails Validate: %v", s, u, err)
		}
		if u.DestinationName == "" || strings.Contains(u.DestinationName, ":") {
			t.Fatalf("ParseUpstream(%q): bad destination name %q", s, u.DestinationName)
		}
		if u.Type() != TypeService && u.Type() != TypePreparedQuery {
			t.Fatalf("ParseUpstream(%q): type %q", s, u.Type())
		}
		if u.LocalBindSocketPath != "" {
			if u.LocalBindPort != 0 || u.LocalBindAddress != "" {
				t.Fatalf("ParseUpstream(%q) = %+v: socket and TCP address both set", s, u)
			}
			if !strings.HasPrefix(u.LocalBindSocketPath, "/") {
				t.Fatalf("ParseUpstream(%q): relative socket path %q", s, u.LocalBindSocketPath)
			}
			if u.Network() != "unix" || u.Addr() != u.LocalBindSocketPath {
				t.Fatalf("ParseUpstream(%q): socket upstream listens on %s %s", s, u.Network(), u.Addr())
			}
			return
		}
		if u.LocalBindPort < 1 || u.LocalBindPort > 65535 {
			t.Fatalf("ParseUpstream(%q): port %d out of range", s, u.LocalBindPort)
		}
		if u.Network() != "tcp" {
			t.Fatalf("ParseUpstream(%q): network %q", s, u.Network())
		}
		// The listen address must parse back to the same host and port.
		host, port, err := ParseListen(u.Addr())
		if err != nil {
			t.Fatalf("ParseUpstream(%q): Addr() %q does not parse: %v", s, u.Addr(), err)
		}
		wantHost := u.LocalBindAddress
		if wantHost == "" {
			wantHost = DefaultUpstreamBindAddress
		}
		if host != wantHost || port != u.LocalBindPort {
			t.Fatalf("ParseUpstream(%q): Addr() %q parses to %q, %d", s, u.Addr(), host, port)
		}
	})
}
