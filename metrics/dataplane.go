package metrics

// The agentless mode's metrics (strait dataplane, package dataplane): how
// it gets on with the Consul servers. init adds their Prometheus
// exposition to promDescs.
var (
	// DataplaneLogins counts logins through the auth method {result}: ok,
	// failed.
	DataplaneLogins = []string{"dataplane", "logins"}
	// DataplaneServerSwitches counts moves from a server that could not
	// be reached to the next one.
	DataplaneServerSwitches = []string{"dataplane", "server_switches"}
	// DataplaneLeafSigns counts leaf certificates signed by the servers
	// from a CSR of ours {result}: ok, failed.
	DataplaneLeafSigns = []string{"dataplane", "leaf_signs"}
)

var dataplaneDescs = map[string]promDesc{
	"dataplane.logins":          {"dataplane_logins_total", kindCounter, 1, "Logins to the Consul servers through the auth method, by result."},
	"dataplane.server_switches": {"dataplane_server_switches_total", kindCounter, 1, "Moves from a Consul server that could not be reached to the next one."},
	"dataplane.leaf_signs":      {"dataplane_leaf_signs_total", kindCounter, 1, "Leaf certificates the Consul servers signed from a CSR made by strait, by result."},
}

func init() {
	for k, d := range dataplaneDescs {
		promDescs[k] = d
	}
}
