package integration

import (
	"bytes"
	"errors"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// fakeAgent counts every HTTP request strait makes: invalid invocations
// must not make any.
func fakeAgent(t *testing.T) (*httptest.Server, *atomic.Int64) {
	var n atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n.Add(1)
		t.Logf("strait contacted the fake agent: %s %s", r.Method, r.URL)
		http.Error(w, "fake agent", http.StatusInternalServerError)
	}))
	t.Cleanup(srv.Close)
	return srv, &n
}

// runStrait runs strait to completion (at most 10s) and returns stdout,
// stderr and the exit code.
func runStrait(t *testing.T, env []string, args ...string) (string, string, int) {
	t.Helper()
	requireStrait(t)
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(straitBin, args...)
	cmd.Env = cleanEnv(env...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	var err error
	select {
	case err = <-done:
	case <-time.After(10 * time.Second):
		_ = cmd.Process.Kill()
		<-done
		t.Fatalf("strait %s still running after 10s (output %q %q)", strings.Join(args, " "), stdout.String(), stderr.String())
	}
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return stdout.String(), stderr.String(), code
}

func TestStraitVersion(t *testing.T) {
	t.Parallel()
	agent, contacted := fakeAgent(t)
	stdout, stderr, code := runStrait(t, []string{"CONSUL_HTTP_ADDR=" + agent.Listener.Addr().String()}, "version")
	if code != 0 {
		t.Fatalf("strait version: exit %d, stderr %q", code, stderr)
	}
	line := strings.TrimSpace(stdout)
	if !regexp.MustCompile(`\d+\.\d+|\bdev\b`).MatchString(line) {
		t.Fatalf("strait version printed %q, want a version", stdout)
	}
	t.Logf("strait version: %s", line)
	if n := contacted.Load(); n != 0 {
		t.Fatalf("strait version made %d requests to the agent", n)
	}
}

// TestStraitInvalidInvocations: each invalid invocation exits 2 with
// exactly one line on stderr, without contacting the agent.
func TestStraitInvalidInvocations(t *testing.T) {
	t.Parallel()
	agent, contacted := fakeAgent(t)
	addr := agent.Listener.Addr().String()
	port := portOf(hostPort(freePort(t)))
	listen := "127.0.0.1:" + port
	cases := []struct {
		name string
		args []string
	}{
		{"unknown flag", []string{"-no-such-flag", "-service", "web", "-upstream", "db:" + port}},
		{"upstream without port", []string{"-service", "web", "-upstream", "db"}},
		{"upstream with unknown type", []string{"-service", "web", "-upstream", "db.bogus:" + port}},
		{"upstream port not a number", []string{"-service", "web", "-upstream", "db:http"}},
		{"upstream port out of range", []string{"-service", "web", "-upstream", "db:70000"}},
		{"upstream port zero", []string{"-service", "web", "-upstream", "db:0"}},
		{"listen port out of range", []string{"-service", "web", "-listen", "127.0.0.1:65536", "-service-addr", "127.0.0.1:1"}},
		{"listen without service-addr", []string{"-service", "web", "-listen", listen}},
		{"neither mode given", []string{"-upstream", "db:" + port}},
		{"no flags at all", nil},
		{"stray argument", []string{"-service", "web", "-upstream", "db:" + port, "extra"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"-http-addr", addr}, tc.args...)
			stdout, stderr, code := runStrait(t, nil, args...)
			if code != 2 {
				t.Errorf("exit code %d, want 2 (stdout %q, stderr %q)", code, stdout, stderr)
			}
			msg := strings.TrimSuffix(stderr, "\n")
			if msg == "" || strings.Contains(msg, "\n") {
				t.Errorf("stderr %q: want exactly one line", stderr)
			}
			t.Logf("stderr: %s", msg)
		})
	}
	if n := contacted.Load(); n != 0 {
		t.Fatalf("invalid invocations made %d requests to the agent", n)
	}
}
