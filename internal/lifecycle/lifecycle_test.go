package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/straitproxy/strait/internal/testutil"
)

// The fake systemd is a unixgram socket in t.TempDir(), named by
// NOTIFY_SOCKET exactly as systemd does. Notifications are written
// synchronously (the datagram is queued on the socket before the call
// returns), so "nothing was sent" is checked with a non-blocking receive,
// and nothing here waits on a clock.
//
// NOTIFY_SOCKET is process-wide state that go-systemd reads at every send,
// so the tests that set it (t.Setenv) cannot run in parallel.

const waitLimit = 10 * time.Second // only bounds a failing test

type fakeSystemd struct {
	t    *testing.T
	conn *net.UnixConn
}

func listen(t *testing.T, name string) *fakeSystemd {
	t.Helper()
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		t.Fatalf("listening on %q: %v", name, err)
	}
	t.Cleanup(func() { conn.Close() })
	t.Setenv("NOTIFY_SOCKET", name)
	return &fakeSystemd{t: t, conn: conn}
}

// newFakeSystemd listens in t.TempDir() and points NOTIFY_SOCKET at it.
func newFakeSystemd(t *testing.T) *fakeSystemd {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify")
	if len(path) >= 108 {
		t.Fatalf("socket path %q is too long for a unix socket (TMPDIR too deep?)", path)
	}
	return listen(t, path)
}

// next returns the next notification as its KEY=VALUE lines.
func (f *fakeSystemd) next() map[string]string {
	f.t.Helper()
	f.conn.SetReadDeadline(time.Now().Add(waitLimit))
	buf := make([]byte, 4096)
	n, err := f.conn.Read(buf)
	if err != nil {
		f.t.Fatalf("no notification: %v", err)
	}
	return parse(f.t, string(buf[:n]))
}

// expect reads the next notification and checks it holds key=value.
func (f *fakeSystemd) expect(key, value string) map[string]string {
	f.t.Helper()
	m := f.next()
	if m[key] != value {
		f.t.Fatalf("notification %v: want %s=%s", m, key, value)
	}
	return m
}

// none checks that nothing has been sent: a non-blocking receive
// (MSG_DONTWAIT) finds the queue empty. (A read with a past deadline would
// not do: Go reports the deadline without looking at the socket.)
func (f *fakeSystemd) none() {
	f.t.Helper()
	f.conn.SetReadDeadline(time.Time{})
	raw, err := f.conn.SyscallConn()
	if err != nil {
		f.t.Fatal(err)
	}
	buf := make([]byte, 4096)
	var n int
	var rerr error
	if err := raw.Read(func(fd uintptr) bool {
		n, _, rerr = unix.Recvfrom(int(fd), buf, unix.MSG_DONTWAIT)
		return true // one attempt, never wait
	}); err != nil {
		f.t.Fatal(err)
	}
	switch {
	case rerr == nil:
		f.t.Fatalf("unexpected notification %q", buf[:n])
	case !errors.Is(rerr, unix.EAGAIN):
		f.t.Fatalf("reading the fake NOTIFY_SOCKET: %v", rerr)
	}
}

func parse(t *testing.T, msg string) map[string]string {
	t.Helper()
	m := map[string]string{}
	for _, line := range strings.Split(strings.TrimSuffix(msg, "\n"), "\n") {
		k, v, ok := strings.Cut(line, "=")
		if !ok || k == "" {
			t.Fatalf("malformed notification line %q in %q", line, msg)
		}
		if _, dup := m[k]; dup {
			t.Fatalf("duplicate %s in %q", k, msg)
		}
		m[k] = v
	}
	return m
}

// ticks replaces the Notifier's ticker with a channel the test drives and
// records the requested period.
type ticks struct {
	ch     chan time.Time
	mu     sync.Mutex
	period time.Duration
}

func (tk *ticks) requested() time.Duration {
	tk.mu.Lock()
	defer tk.mu.Unlock()
	return tk.period
}

func driveTicks(n *Notifier) *ticks {
	tk := &ticks{ch: make(chan time.Time)}
	n.ticker = func(d time.Duration) (<-chan time.Time, func()) {
		tk.mu.Lock()
		tk.period = d
		tk.mu.Unlock()
		return tk.ch, func() {}
	}
	return tk
}

// tick hands one tick to the loop. The channel is unbuffered, so a tick is
// taken only when the loop is back in its select: the previous tick has
// been handled completely.
func (tk *ticks) tick(t *testing.T) {
	t.Helper()
	give(t, tk.ch, time.Now())
}

func give[T any](t *testing.T, ch chan<- T, v T) {
	t.Helper()
	timer := time.NewTimer(waitLimit)
	defer timer.Stop()
	select {
	case ch <- v:
	case <-timer.C:
		t.Fatalf("the loop did not take a %T within %v", v, waitLimit)
	}
}

func wait(t *testing.T, done <-chan struct{}, what string) {
	t.Helper()
	timer := time.NewTimer(waitLimit)
	defer timer.Stop()
	select {
	case <-done:
	case <-timer.C:
		t.Fatalf("%s did not return within %v", what, waitLimit)
	}
}

// answers is a condition func whose every result the test supplies.
func answers() (chan bool, func() bool) {
	ch := make(chan bool)
	return ch, func() bool { return <-ch }
}

func monotonicUsec(t *testing.T) int64 {
	t.Helper()
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		t.Fatal(err)
	}
	return ts.Nano() / 1000
}

func TestWithoutNotifySocketEverythingIsANoop(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	t.Setenv("WATCHDOG_USEC", "1000")
	n := New(nil)
	if n.Enabled() || n.WatchdogTimeout() != 0 {
		t.Fatalf("enabled=%v watchdog=%v without NOTIFY_SOCKET", n.Enabled(), n.WatchdogTimeout())
	}
	n.Ready()
	n.Reload(func() {})
	n.Stopping()
	// Both return at once: no ticker, no condition evaluated.
	n.Watchdog(context.Background(), func() bool { t.Error("healthy called"); return true })
	if n.ReadyWhen(context.Background(), func() bool { t.Error("ready called"); return true }) {
		t.Fatal("ReadyWhen reported a notification without NOTIFY_SOCKET")
	}
}

func TestReadyIsSentOnce(t *testing.T) {
	sd := newFakeSystemd(t)
	n := New(nil)
	if !n.Enabled() {
		t.Fatal("not enabled with NOTIFY_SOCKET set")
	}
	sd.none()
	n.Ready()
	m := sd.expect("READY", "1")
	if m["STATUS"] == "" {
		t.Errorf("READY=1 without STATUS: %v", m)
	}
	n.Ready()
	sd.none()
}

func TestReadyWhenWaitsForTheCondition(t *testing.T) {
	sd := newFakeSystemd(t)
	n := New(nil)
	tk := driveTicks(n)
	answer, cond := answers()
	done := make(chan struct{})
	var notified bool
	go func() {
		defer close(done)
		notified = n.ReadyWhen(context.Background(), cond)
	}()

	give(t, answer, false) // the immediate check
	tk.tick(t)
	give(t, answer, false)
	tk.tick(t) // taken only once the previous tick is fully handled
	sd.none()
	give(t, answer, true)
	wait(t, done, "ReadyWhen")
	if !notified {
		t.Fatal("ReadyWhen returned false after the condition held")
	}
	sd.expect("READY", "1")
	sd.none()
	if tk.requested() != readyPoll {
		t.Fatalf("polled every %v, want %v", tk.requested(), readyPoll)
	}
}

func TestReadyWhenGivesUpWithTheContext(t *testing.T) {
	sd := newFakeSystemd(t)
	n := New(nil)
	driveTicks(n)
	ctx, cancel := context.WithCancel(context.Background())
	answer, cond := answers()
	done := make(chan struct{})
	var notified bool
	go func() {
		defer close(done)
		notified = n.ReadyWhen(ctx, cond)
	}()
	give(t, answer, false)
	cancel()
	wait(t, done, "ReadyWhen")
	if notified {
		t.Fatal("ReadyWhen reported a notification after its context ended")
	}
	sd.none()
}

func TestReloadSendsMonotonicUsecThenReady(t *testing.T) {
	sd := newFakeSystemd(t)
	n := New(nil)
	n.Ready()
	sd.expect("READY", "1")

	before := monotonicUsec(t)
	ran := false
	n.Reload(func() {
		ran = true
		after := monotonicUsec(t)
		// RELOADING=1 is out before the reload work starts...
		m := sd.expect("RELOADING", "1")
		usec, err := strconv.ParseInt(m["MONOTONIC_USEC"], 10, 64)
		if err != nil {
			t.Fatalf("RELOADING=1 without a valid MONOTONIC_USEC (systemd >= 253 rejects it): %v", m)
		}
		if usec < before || usec > after {
			t.Fatalf("MONOTONIC_USEC=%d not within [%d, %d] of CLOCK_MONOTONIC", usec, before, after)
		}
		// ...and READY=1 only after it has finished.
		sd.none()
	})
	if !ran {
		t.Fatal("Reload did not run its function")
	}
	sd.expect("READY", "1")
	sd.none()

	// A second reload works the same way.
	done := n.Reloading()
	sd.expect("RELOADING", "1")
	done()
	sd.expect("READY", "1")
	done() // ending the same reload twice sends nothing more
	sd.none()
}

func TestReloadBeforeReadySendsNothing(t *testing.T) {
	sd := newFakeSystemd(t)
	n := New(nil)
	ran := false
	n.Reload(func() { ran = true })
	if !ran {
		t.Fatal("Reload did not run its function before the proxy was ready")
	}
	// A READY=1 here would tell systemd startup had finished.
	sd.none()
	n.Ready()
	sd.expect("READY", "1")
	sd.none()
}

func TestStoppingIsFinal(t *testing.T) {
	sd := newFakeSystemd(t)
	n := New(nil)
	n.Ready()
	sd.expect("READY", "1")
	n.Stopping()
	if m := sd.expect("STOPPING", "1"); m["STATUS"] == "" {
		t.Errorf("STOPPING=1 without STATUS: %v", m)
	}
	n.Stopping()
	n.Ready()
	n.Reload(func() {})
	sd.none()
}

func TestStoppingBeforeReady(t *testing.T) {
	sd := newFakeSystemd(t)
	n := New(nil)
	n.Stopping()
	sd.expect("STOPPING", "1")
	// The proxy may become ready while draining starts; systemd must not
	// hear READY=1 after STOPPING=1.
	if !n.ReadyWhen(context.Background(), func() bool { return true }) {
		t.Fatal("ReadyWhen returned false though the condition held")
	}
	sd.none()
}

func TestStoppingDuringReload(t *testing.T) {
	sd := newFakeSystemd(t)
	n := New(nil)
	n.Ready()
	sd.expect("READY", "1")
	done := n.Reloading()
	sd.expect("RELOADING", "1")
	n.Stopping()
	sd.expect("STOPPING", "1")
	done()
	sd.none()
}

func TestWatchdogPingsOnlyWhileHealthy(t *testing.T) {
	sd := newFakeSystemd(t)
	t.Setenv("WATCHDOG_USEC", "30000000")
	t.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid()))
	var logs testutil.Buffer
	n := New(hclog.New(&hclog.LoggerOptions{Output: &logs, Level: hclog.Info}))
	if n.WatchdogTimeout() != 30*time.Second {
		t.Fatalf("watchdog timeout %v, want 30s", n.WatchdogTimeout())
	}
	tk := driveTicks(n)
	answer, healthy := answers()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); n.Watchdog(ctx, healthy) }()

	// Before READY=1 systemd is not watching: an unready proxy is quietly
	// not pinged for.
	tk.tick(t)
	give(t, answer, false)
	tk.tick(t)
	sd.none()
	if strings.Contains(logs.String(), "unhealthy") {
		t.Fatalf("warned before the proxy was ready:\n%s", logs.String())
	}

	n.Ready()
	sd.expect("READY", "1")
	give(t, answer, true)
	sd.expect("WATCHDOG", "1")
	sd.none()

	tk.tick(t)
	give(t, answer, false)
	tk.tick(t) // the unhealthy tick is fully handled
	sd.none()
	if !strings.Contains(logs.String(), "withholding watchdog pings") {
		t.Fatalf("an unhealthy proxy was not reported:\n%s", logs.String())
	}
	give(t, answer, true)
	sd.expect("WATCHDOG", "1")
	sd.none()

	cancel()
	wait(t, done, "Watchdog")
	if tk.requested() != 15*time.Second {
		t.Fatalf("pinged every %v, want half of WATCHDOG_USEC (15s)", tk.requested())
	}
	if !strings.Contains(logs.String(), "pings resumed") {
		t.Fatalf("recovery was not reported:\n%s", logs.String())
	}
}

// TestWatchdogRealClock runs the real ticker: a 20ms watchdog yields pings
// every 10ms.
func TestWatchdogRealClock(t *testing.T) {
	sd := newFakeSystemd(t)
	t.Setenv("WATCHDOG_USEC", "20000")
	t.Setenv("WATCHDOG_PID", "")
	n := New(nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); n.Watchdog(ctx, func() bool { return true }) }()
	for range 3 {
		sd.expect("WATCHDOG", "1")
	}
	cancel()
	wait(t, done, "Watchdog")
}

func TestWatchdogDisabled(t *testing.T) {
	for _, tc := range []struct{ name, usec, pid string }{
		{"no WATCHDOG_USEC", "", ""},
		{"WATCHDOG_PID of another process", "1000", strconv.Itoa(os.Getppid())},
		{"malformed WATCHDOG_USEC", "soon", ""},
		{"zero WATCHDOG_USEC", "0", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sd := newFakeSystemd(t)
			t.Setenv("WATCHDOG_USEC", tc.usec)
			t.Setenv("WATCHDOG_PID", tc.pid)
			n := New(nil)
			if n.WatchdogTimeout() != 0 {
				t.Fatalf("watchdog %v", n.WatchdogTimeout())
			}
			n.Watchdog(context.Background(), func() bool { t.Error("healthy called"); return true }) // returns at once
			sd.none()
		})
	}
}

// TestAbstractNotifySocket: systemd may name a socket in the abstract
// namespace ("@...").
func TestAbstractNotifySocket(t *testing.T) {
	sd := listen(t, fmt.Sprintf("@strait-lifecycle-test-%d-%d", os.Getpid(), time.Now().UnixNano()))
	n := New(nil)
	n.Ready()
	sd.expect("READY", "1")
}

func TestNotifyFailureIsLoggedOnce(t *testing.T) {
	sd := newFakeSystemd(t)
	path := os.Getenv("NOTIFY_SOCKET")
	var logs testutil.Buffer
	n := New(hclog.New(&hclog.LoggerOptions{Output: &logs, Level: hclog.Info}))
	n.Ready()
	sd.expect("READY", "1")
	sd.conn.Close()
	os.Remove(path)

	done := n.Reloading()
	done()
	n.Stopping()
	if got := strings.Count(logs.String(), "notifying systemd failed"); got != 1 {
		t.Fatalf("%d failure warnings for 3 failed notifications, want 1:\n%s", got, logs.String())
	}

	sd2 := listen(t, path)
	n2 := New(nil)
	n2.Ready()
	sd2.expect("READY", "1")
}

func TestRaiseNoFile(t *testing.T) {
	t.Parallel() // process-wide, but no other test depends on the limit
	var orig syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &orig); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Setrlimit(syscall.RLIMIT_NOFILE, &orig) })
	if orig.Max < 64 {
		t.Fatalf("hard RLIMIT_NOFILE is %d: too low to test", orig.Max)
	}
	// Start from a soft limit below the hard one, as a service manager
	// that sets 1024:524288 would.
	lowered := orig
	lowered.Cur = orig.Max / 2
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lowered); err != nil {
		t.Fatal(err)
	}
	soft, hard, err := RaiseNoFile()
	if err != nil {
		t.Fatal(err)
	}
	var now syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &now); err != nil {
		t.Fatal(err)
	}
	if soft != orig.Max || hard != orig.Max || now.Cur != orig.Max || now.Max != orig.Max {
		t.Fatalf("RaiseNoFile = %d, %d; getrlimit = %d, %d; want both %d", soft, hard, now.Cur, now.Max, orig.Max)
	}
	// Already at the hard limit: reported, unchanged.
	if soft2, hard2, err := RaiseNoFile(); err != nil || soft2 != soft || hard2 != hard {
		t.Fatalf("second RaiseNoFile = %d, %d, %v", soft2, hard2, err)
	}
}
