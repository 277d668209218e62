package admin

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/straitproxy/strait/config"
	"github.com/straitproxy/strait/metrics"
	"github.com/straitproxy/strait/proxy"
)

// TestUpstreamJSON pins the upstream objects of /config and /upstreams,
// which share the destination fields (proxy.UpstreamDestination): same
// keys, same order.
func TestUpstreamJSON(t *testing.T) {
	t.Parallel()
	u := config.Upstream{DestinationName: "db", DestinationNamespace: "ns", Datacenter: "dc2",
		LocalBindAddress: "127.0.0.1", LocalBindPort: 9191, ConnectTimeout: 2 * time.Second, Protocol: "http", MeshGatewayMode: "local"}
	b, err := json.Marshal(configView(Settings{}, &config.Config{Service: "web", Upstreams: []config.Upstream{u}}, metrics.Telemetry{}).Proxy.Upstreams)
	if err != nil {
		t.Fatal(err)
	}
	want := `[{"destination_type":"service","destination_name":"db","destination_namespace":"ns","datacenter":"dc2",` +
		`"listen":"127.0.0.1:9191","network":"tcp","connect_timeout":"2s","protocol":"http","mesh_gateway_mode":"local"}]`
	if string(b) != want {
		t.Errorf("/config upstreams:\n got %s\nwant %s", b, want)
	}
	st := proxy.UpstreamStatus{Name: u.String(), UpstreamDestination: proxy.DestinationOf(u), Listen: "127.0.0.1:9191", Endpoints: []proxy.EndpointInfo{}}
	if b, err = json.Marshal(st); err != nil {
		t.Fatal(err)
	}
	want = `{"name":"` + u.String() + `","destination_type":"service","destination_name":"db","destination_namespace":"ns","datacenter":"dc2",` +
		`"listen":"127.0.0.1:9191","discovered":false,"active_connections":0,"healthy_endpoints":0,"endpoints":[]}`
	if string(b) != want {
		t.Errorf("/upstreams upstream:\n got %s\nwant %s", b, want)
	}
}
