package integration

import (
	"fmt"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// TestHarnessBuiltinToBuiltin proves the harness against the reference
// implementation: `consul connect proxy` upstream -> `consul connect proxy`
// public listener -> app, data both ways, and a deny intention refuses new
// connections as seen by the refusedVia helper the strait tests rely on.
func TestHarnessBuiltinToBuiltin(t *testing.T) {
	t.Parallel()
	a := startAgent(t)
	const key = 0x5a
	app := startApp(t, modeEcho, key)
	src, dst := uniq("web"), uniq("db")

	pub := freePort(t)
	startBuiltin(t, a, "-service", dst, "-listen", hostPort(pub), "-service-addr", app.Addr())
	a.registerProxy(t, dst, pub)
	up := freePort(t)
	startBuiltin(t, a, "-service", src, "-upstream", fmt.Sprintf("%s:%d", dst, up))

	eventually(t, 30*time.Second, func() error { return echoVia("tcp", hostPort(up), 64*1024, key) })

	a.setIntention(t, src, dst, api.IntentionActionDeny)
	eventually(t, 30*time.Second, func() error { return refusedVia("tcp", hostPort(up)) })

	a.setIntention(t, src, dst, api.IntentionActionAllow)
	eventually(t, 30*time.Second, func() error { return echoVia("tcp", hostPort(up), 64*1024, key) })
}
