// Package lifecycle tells the service manager where strait is in its life:
// systemd's notification protocol (sd_notify) for Type=notify units, the
// systemd watchdog, and the open-file limit reported at start.
//
// Under systemd a Notifier sends
//
//	READY=1                          once the proxy is ready (certificates loaded, listeners bound)
//	RELOADING=1, MONOTONIC_USEC=...  when a SIGHUP reload begins, READY=1 when it ends
//	STOPPING=1                       when draining begins
//	WATCHDOG=1                       every WATCHDOG_USEC/2 while the proxy is healthy
//
// Without NOTIFY_SOCKET (a terminal, a container, Nomad) every method is a
// no-op, so the caller never needs to ask where it runs.
package lifecycle

import (
	"context"
	"os"
	"sync"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/hashicorp/go-hclog"
)

// readyPoll is how often ReadyWhen evaluates its condition.
const readyPoll = 100 * time.Millisecond

type state int

const (
	starting state = iota
	ready
	reloading
	stopping
)

// Notifier reports strait's lifecycle to systemd. Its methods are safe for
// concurrent use; notifications are sent in the order the calls happen.
//
// The state machine keeps systemd's view truthful whatever the caller's
// timing: READY=1 is sent once at start and once at the end of each reload,
// never after STOPPING=1; a reload that begins before the proxy is ready
// sends nothing (a READY=1 at its end would announce a proxy that is not
// ready).
type Notifier struct {
	log      hclog.Logger
	enabled  bool
	watchdog time.Duration

	mu      sync.Mutex
	state   state
	failing bool // the last notification failed; logged once until one succeeds

	// ticker makes the tickers of Watchdog and ReadyWhen; tests replace it
	// with a channel they drive.
	ticker func(time.Duration) (<-chan time.Time, func())
}

// New reads NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID from the
// environment. log may be nil.
func New(log hclog.Logger) *Notifier {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	n := &Notifier{log: log.Named("systemd"), enabled: os.Getenv("NOTIFY_SOCKET") != "", ticker: realTicker}
	if !n.enabled {
		return n
	}
	// WATCHDOG_PID naming another process (a child that inherited the
	// variables) yields 0: the watchdog is not ours.
	d, err := daemon.SdWatchdogEnabled(false)
	if err != nil {
		n.log.Warn("ignoring the watchdog settings from systemd", "error", err)
	}
	n.watchdog = d
	return n
}

func realTicker(d time.Duration) (<-chan time.Time, func()) {
	t := time.NewTicker(d)
	return t.C, t.Stop
}

// Enabled reports whether systemd is listening (NOTIFY_SOCKET is set).
func (n *Notifier) Enabled() bool { return n.enabled }

// WatchdogTimeout is WATCHDOG_USEC as a duration; 0 when there is no
// watchdog.
func (n *Notifier) WatchdogTimeout() time.Duration { return n.watchdog }

// Ready tells systemd the proxy is ready: at start, and at the end of a
// reload begun with Reloading. Further calls, and any call after Stopping,
// send nothing.
func (n *Notifier) Ready() {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.state == ready || n.state == stopping {
		return
	}
	n.state = ready
	n.send(daemon.SdNotifyReady + "\nSTATUS=Ready: proxying")
}

// ReadyWhen calls Ready as soon as ready() returns true, checking now and
// then every ReadyPoll. It returns whether it did; false when ctx ended
// first or systemd is not listening.
func (n *Notifier) ReadyWhen(ctx context.Context, ready func() bool) bool {
	if !n.enabled {
		return false
	}
	if ready() {
		n.Ready()
		return true
	}
	ticks, stop := n.ticker(readyPoll)
	defer stop()
	for {
		select {
		case <-ctx.Done():
			return false
		case <-ticks:
			if ready() {
				n.Ready()
				return true
			}
		}
	}
}

// Reloading tells systemd a reload has begun (RELOADING=1 with the
// MONOTONIC_USEC that systemd 253 and later require) and returns the
// function that ends it with READY=1. Before the proxy is ready, or once it
// is stopping, neither sends anything.
func (n *Notifier) Reloading() (done func()) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.state != ready {
		return func() {}
	}
	n.state = reloading
	// SdNotifyMonotonicUsec ends with a newline, or is empty if the clock
	// cannot be read.
	n.send(daemon.SdNotifyReloading + "\n" + daemon.SdNotifyMonotonicUsec() + "STATUS=Reloading")
	return n.Ready
}

// Reload runs fn between Reloading and the READY=1 that ends it.
func (n *Notifier) Reload(fn func()) {
	done := n.Reloading()
	defer done()
	fn()
}

// Stopping tells systemd strait has begun to drain. Once only.
func (n *Notifier) Stopping() {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.state == stopping {
		return
	}
	n.state = stopping
	n.send(daemon.SdNotifyStopping + "\nSTATUS=Draining")
}

// Watchdog pings systemd's watchdog every WatchdogTimeout/2 for as long as
// healthy() returns true, until ctx is done; run it in its own goroutine. It
// returns at once when systemd set no watchdog for this process.
//
// An unhealthy (or hung) healthy func withholds the pings, and systemd
// aborts and restarts strait once the timeout passes: that is the point.
// systemd watches only between READY=1 and the start of a stop, so a
// healthy func that is false before the proxy is ready and during the drain
// (proxy.Ready) is exactly right.
func (n *Notifier) Watchdog(ctx context.Context, healthy func() bool) {
	if n.watchdog <= 0 {
		return
	}
	every := n.watchdog / 2
	n.log.Info("watchdog enabled", "timeout", n.watchdog, "ping_every", every)
	ticks, stop := n.ticker(every)
	defer stop()
	withheld := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-ticks:
		}
		ok := healthy()
		n.mu.Lock()
		watched := n.state == ready || n.state == reloading
		if ok {
			n.send(daemon.SdNotifyWatchdog)
		}
		n.mu.Unlock()
		switch {
		case !ok && watched && !withheld:
			n.log.Warn("proxy unhealthy: withholding watchdog pings; systemd restarts strait if this lasts", "timeout", n.watchdog)
			withheld = true
		case ok && withheld:
			n.log.Info("proxy healthy again: watchdog pings resumed")
			withheld = false
		}
	}
}

// send writes one notification; n.mu is held. A failure is logged once
// until a notification succeeds again: it must not flood the log at every
// watchdog tick.
func (n *Notifier) send(msg string) {
	if !n.enabled {
		return
	}
	sent, err := daemon.SdNotify(false, msg)
	switch {
	case err != nil:
		if !n.failing {
			n.log.Warn("notifying systemd failed", "error", err)
		}
		n.failing = true
	case sent:
		if n.failing {
			n.log.Info("notifying systemd works again")
		}
		n.failing = false
		n.log.Trace("notified systemd", "state", msg)
	}
}
