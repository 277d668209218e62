package proxy

import (
	"fmt"
	"net"
	"testing"

	"github.com/straitproxy/strait/config"
)

// TestTunnelStreamLogsOneAttempt: a connection carried as a stream in a
// tunnel that is already up made one dial attempt, though no TCP
// connection; its access line says so.
func TestTunnelStreamLogsOneAttempt(t *testing.T) {
	t.Parallel()
	h := startHarness(t, AccessLogOn, config.Public{}, withTunnels)
	for i := range 2 { // the first dials the tunnel, the second rides it
		c, err := net.Dial("unix", h.upSock)
		if err != nil {
			t.Fatal(err)
		}
		roundTrip(t, c, fmt.Sprintf("hello %d", i))
		for range 2 {
			if l := h.access.next(t); l["direction"] == "upstream" {
				want(t, l, map[string]any{"reason": ReasonClosed, "attempts": 1})
			}
		}
	}
	if ts := h.p.Tunnels(); ts.OutboundTunnels != 1 {
		t.Fatalf("tunnels %+v, want one outbound", ts)
	}
}
