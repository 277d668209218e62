package testutil

import (
	"bytes"
	"runtime"
	"strings"
	"testing"
	"time"
)

// module is the frame prefix that makes a goroutine strait's.
const module = "github.com/straitproxy/strait/"

// Goroutines returns the stacks of the goroutines that run, or were
// started by, strait code (testutil excluded), keyed by goroutine ID.
func Goroutines() map[string]string {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	out := map[string]string{}
	for _, g := range bytes.Split(buf, []byte("\n\n")) {
		s := string(g)
		id, _, ok := strings.Cut(strings.TrimPrefix(s, "goroutine "), " ")
		if !ok || !ours(s) {
			continue
		}
		out[id] = s
	}
	return out
}

func ours(stack string) bool {
	for _, line := range strings.Split(stack, "\n") {
		if strings.Contains(line, module) && !strings.Contains(line, module+"internal/testutil.") {
			return true
		}
	}
	return false
}

// NoNewGoroutines fails t unless every strait goroutine not in before
// (from Goroutines) is gone within Timeout: what a component starts must
// have ended once it is stopped. It polls, since a goroutine joined with
// a WaitGroup may still be returning when the join does.
func NoNewGoroutines(t testing.TB, before map[string]string) {
	t.Helper()
	deadline := time.Now().Add(Timeout)
	for {
		left := map[string]string{}
		for id, s := range Goroutines() {
			if _, ok := before[id]; !ok {
				left[id] = s
			}
		}
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			var b strings.Builder
			for _, s := range left {
				b.WriteString(s)
				b.WriteString("\n\n")
			}
			t.Fatalf("%d goroutines of strait still running after stop:\n%s", len(left), b.String())
		}
		time.Sleep(PollInterval)
	}
}
