package proxy

import (
	"bufio"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/straitproxy/strait/config"
	"github.com/straitproxy/strait/internal/testagent"
)

// echoOnce writes msg on c and reads it back, within d.
func echoOnce(c net.Conn, r *bufio.Reader, msg string, d time.Duration) error {
	c.SetDeadline(time.Now().Add(d))
	defer c.SetDeadline(time.Time{})
	if _, err := io.WriteString(c, msg); err != nil {
		return err
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(r, buf); err != nil {
		return err
	}
	if string(buf) != msg {
		return errors.New("echo mismatch")
	}
	return nil
}

// TestDenyRevokesOpenConnections: an open connection whose source the
// intentions come to deny is reset within a second, with an access line
// (reason revoked) and a metric; an open connection from a source still
// allowed keeps flowing. Classic connections and tunnel streams alike.
func TestDenyRevokesOpenConnections(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		opt  []func(*Options)
	}{{"classic", nil}, {"tunnel", []func(*Options){withTunnels}}} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			h := startHarness(t, AccessLogDeniedOnly, config.Public{}, tc.opt...)
			h.agent.SetIntentions(
				testagent.Intention("web", "web", api.IntentionActionAllow),
				testagent.Intention("api", "web", api.IntentionActionAllow),
			)
			// web -> web through our own upstream listener (a tunnel
			// stream with tunnels on), and api -> web directly.
			viaUp, err := net.Dial("unix", h.upSock)
			if err != nil {
				t.Fatal(err)
			}
			defer viaUp.Close()
			upR := bufio.NewReader(viaUp)
			if err := echoOnce(viaUp, upR, "before", 10*time.Second); err != nil {
				t.Fatal("web before the deny:", err)
			}
			direct, err := h.dialPublic("api")
			if err != nil {
				t.Fatal(err)
			}
			defer direct.Close()
			dR := bufio.NewReader(direct)
			if err := echoOnce(direct, dR, "before", 10*time.Second); err != nil {
				t.Fatal("api before the deny:", err)
			}

			start := time.Now()
			h.agent.SetIntentions(
				testagent.Intention("web", "web", api.IntentionActionDeny),
				testagent.Intention("api", "web", api.IntentionActionAllow),
			)
			viaUp.SetReadDeadline(time.Now().Add(10 * time.Second))
			n, err := upR.Read(make([]byte, 1))
			took := time.Since(start)
			if n != 0 || err == nil || errors.Is(err, errDeadline()) || isTimeout(err) {
				t.Fatalf("revoked connection: read %d bytes, %v after %s; want it closed", n, err, took)
			}
			t.Logf("revoked connection closed after %s (%v)", took, err)
			if took > time.Second {
				t.Errorf("revoked after %s, want within 1s", took)
			}
			line := h.access.next(t)
			want(t, line, map[string]any{"direction": "inbound", "reason": "revoked", "source": "~/svc/web", "detail": "~deny"})
			if p, want := h.prom(), `inbound_revoked_total{src="web",dst="web"} 1`; !strings.Contains(p, want) {
				t.Errorf("metrics lack %s:\n%s", want, grepLines(p, "revoked"))
			}
			if err := echoOnce(direct, dR, "after", 10*time.Second); err != nil {
				t.Fatal("api after the deny of web:", err)
			}
		})
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
