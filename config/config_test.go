package config

import (
	"strings"
	"testing"
	"time"
)

func TestPublicAccessors(t *testing.T) {
	t.Parallel()
	tests := []struct {
		p    Public
		addr string
	}{
		{Public{BindPort: 21000}, "0.0.0.0:21000"},
		{Public{BindAddress: "10.0.0.7", BindPort: 21000}, "10.0.0.7:21000"},
		{Public{BindAddress: "::", BindPort: 21000}, "[::]:21000"},
		{Public{BindAddress: "127.0.0.1"}, "127.0.0.1:0"},
	}
	for _, tc := range tests {
		if got := tc.p.Addr(); got != tc.addr {
			t.Errorf("%+v Addr() = %q, want %q", tc.p, got, tc.addr)
		}
	}
	p := Public{HandshakeTimeout: -time.Second, LocalConnectTimeout: 0}
	if got := p.HandshakeTimeoutOrDefault(); got != DefaultHandshakeTimeout {
		t.Errorf("negative handshake timeout gives %v, want the default", got)
	}
	if got := p.LocalConnectTimeoutOrDefault(); got != DefaultLocalConnectTimeout {
		t.Errorf("zero local connect timeout gives %v, want the default", got)
	}
	p = Public{HandshakeTimeout: 3 * time.Second, LocalConnectTimeout: 2 * time.Second}
	if p.HandshakeTimeoutOrDefault() != 3*time.Second || p.LocalConnectTimeoutOrDefault() != 2*time.Second {
		t.Errorf("set timeouts not returned: %v %v", p.HandshakeTimeoutOrDefault(), p.LocalConnectTimeoutOrDefault())
	}
	if DefaultHandshakeTimeout != 10*time.Second || DefaultLocalConnectTimeout != time.Second || DefaultConnectTimeout != 10*time.Second {
		t.Error("defaults differ from Consul's documented 10s / 1s / 10s")
	}
}

func TestUpstreamAccessors(t *testing.T) {
	t.Parallel()
	u := Upstream{DestinationName: "db", LocalBindPort: 9191}
	if u.Type() != TypeService || u.Network() != "tcp" || u.Addr() != "127.0.0.1:9191" || u.String() != "db" {
		t.Errorf("defaults: type %q network %q addr %q string %q", u.Type(), u.Network(), u.Addr(), u.String())
	}
	if u.ConnectTimeoutOrDefault() != DefaultConnectTimeout {
		t.Errorf("ConnectTimeoutOrDefault = %v", u.ConnectTimeoutOrDefault())
	}
	u = Upstream{DestinationType: TypePreparedQuery, DestinationName: "geo", Datacenter: "dc2", LocalBindAddress: "::1", LocalBindPort: 1, ConnectTimeout: time.Second}
	if u.String() != "geo (prepared_query) in dc2" || u.Addr() != "[::1]:1" || u.ConnectTimeoutOrDefault() != time.Second {
		t.Errorf("string %q addr %q timeout %v", u.String(), u.Addr(), u.ConnectTimeoutOrDefault())
	}
	u = Upstream{DestinationName: "db", LocalBindSocketPath: "/run/db.sock", LocalBindAddress: "10.0.0.1", LocalBindPort: 5}
	if u.Network() != "unix" || u.Addr() != "/run/db.sock" {
		t.Errorf("socket upstream listens on %s %s", u.Network(), u.Addr())
	}
}

func TestUpstreamValidate(t *testing.T) {
	t.Parallel()
	ok := []Upstream{
		{DestinationName: "db", LocalBindPort: 1},
		{DestinationName: "db", LocalBindPort: 65535},
		{DestinationType: TypePreparedQuery, DestinationName: "q", LocalBindPort: 80},
		{DestinationName: "db", LocalBindSocketPath: "/run/db.sock"},
		{DestinationName: "db", LocalBindPort: 1, MeshGatewayMode: MeshGatewayLocal, Protocol: "http"},
	}
	for _, u := range ok {
		if err := u.Validate(); err != nil {
			t.Errorf("Validate(%+v): %v", u, err)
		}
	}
	bad := []struct {
		u    Upstream
		want string
	}{
		{Upstream{LocalBindPort: 80}, "no destination name"},
		{Upstream{DestinationName: "db"}, "port 0"},
		{Upstream{DestinationName: "db", LocalBindPort: 65536}, "port 65536"},
		{Upstream{DestinationName: "db", LocalBindPort: -1}, "port -1"},
		{Upstream{DestinationType: "peer", DestinationName: "db", LocalBindPort: 80}, `"peer"`},
		{Upstream{DestinationName: "db", LocalBindPort: 80, MeshGatewayMode: "nearby"}, `mesh gateway mode "nearby"`},
	}
	for _, tc := range bad {
		err := tc.u.Validate()
		if err == nil {
			t.Errorf("Validate(%+v) passed", tc.u)
			continue
		}
		if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Validate(%+v) = %q, want it to mention %q", tc.u, err, tc.want)
		}
	}
}
