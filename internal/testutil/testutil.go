// Package testutil holds the helpers the unit tests share: a polling
// Eventually, a goroutine-safe buffer for log output, and a throwaway
// Consul-like Connect CA issuing SPIFFE leaf certificates. It is imported by
// tests only and never linked into the binary.
//
// It must not import any strait package: the tests of those packages (tlsutil
// in particular) import it from inside the package under test.
package testutil

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"
)

// Timeout bounds every wait in Eventually and EventuallyNil: generous, for
// conditions that should hold quickly even on a loaded 2-core machine.
const Timeout = 15 * time.Second

// PollInterval is how often Eventually and EventuallyNil re-check.
const PollInterval = 5 * time.Millisecond

// Eventually polls cond until it holds. If it does not within Timeout, it
// fails t with "timed out waiting for <what>".
func Eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.NewTimer(Timeout)
	defer deadline.Stop()
	tick := time.NewTicker(PollInterval)
	defer tick.Stop()
	for !cond() {
		select {
		case <-deadline.C:
			t.Fatalf("timed out waiting for %s", what)
		case <-tick.C:
		}
	}
}

// EventuallyNil polls cond until it returns nil. If it does not within
// Timeout, it fails t with the last error, which says what was awaited.
func EventuallyNil(t testing.TB, cond func() error) {
	t.Helper()
	deadline := time.NewTimer(Timeout)
	defer deadline.Stop()
	tick := time.NewTicker(PollInterval)
	defer tick.Stop()
	for {
		err := cond()
		if err == nil {
			return
		}
		select {
		case <-deadline.C:
			t.Fatal(err)
		case <-tick.C:
		}
	}
}

// Buffer is a bytes.Buffer safe to write from one goroutine (a logger) and
// read from another (the test). The zero value is ready to use.
type Buffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

// Write appends p.
func (b *Buffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

// String is everything written so far.
func (b *Buffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// PromtoolCheck runs Prometheus's own linter (promtool check metrics) on
// an exposition and fails on any finding. Without promtool it skips,
// unless STRAIT_REQUIRE_TOOLS=1 (make test, CI) makes that a failure.
func PromtoolCheck(t testing.TB, exposition string) {
	t.Helper()
	path, err := exec.LookPath("promtool")
	if err != nil {
		if os.Getenv("STRAIT_REQUIRE_TOOLS") == "1" {
			t.Fatalf("promtool not found and STRAIT_REQUIRE_TOOLS=1 (install the Debian package prometheus): %v", err)
		}
		t.Skip("promtool not on PATH; set STRAIT_REQUIRE_TOOLS=1 to make this a failure")
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, path, "check", "metrics")
	cmd.Stdin = strings.NewReader(exposition)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil || strings.TrimSpace(out.String()) != "" {
		t.Fatalf("promtool check metrics: %v\n%s\nexposition:\n%s", err, out.String(), exposition)
	}
}
