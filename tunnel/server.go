package tunnel

import (
	"context"
	"errors"
	"net"
	"sync"
	"time"

	"github.com/straitproxy/strait/internal/yamux"
	"golang.org/x/time/rate"
)

// HeaderTimeout bounds the wait for a stream's header.
const HeaderTimeout = 10 * time.Second

// Server-side defaults: the stream-open rate a tunnel may sustain and the
// burst above it. They bound what a runaway or hostile peer can make the
// server do (an authorization and an app dial per stream); a legitimate
// client spreads over more tunnels long before (see docs/performance.md).
const (
	DefaultStreamRate  = 20000
	DefaultStreamBurst = 2000
)

// Limits bound one inbound tunnel. Zero values mean the defaults.
type Limits struct {
	MaxStreams  int        // concurrent streams (DefaultMaxStreams)
	StreamRate  rate.Limit // stream opens per second (DefaultStreamRate)
	StreamBurst int        // (DefaultStreamBurst)
	// Budget bounds the receive-window growth of the tunnel's streams
	// together (DefaultTunnelBudget).
	Budget int64
}

// Refusals reported to Serve's onErr.
var (
	// ErrStreamRate: the tunnel opened streams faster than Limits allow.
	ErrStreamRate = errors.New("tunnel: stream-open rate exceeded")
	// ErrTooManyStreams: the tunnel already carries Limits.MaxStreams.
	ErrTooManyStreams = errors.New("tunnel: too many concurrent streams")
)

// drainPoll is how often a draining tunnel checks whether its last stream
// has ended.
const drainPoll = 50 * time.Millisecond

// Serve runs a server session on an established tunnel connection and
// calls handle for every stream with its header read, on a goroutine of
// its own; handle answers the stream (Conn.Accept or Conn.Refuse) and may
// return before the stream ends. Streams beyond lim are refused
// (StatusRefused, StatusRate) and reported to onErr (ErrTooManyStreams,
// ErrStreamRate), as are bad headers (ErrBadHeader). When ctx is done the
// tunnel drains: new streams are refused with StatusDraining (the client takes them
// elsewhere) and the session closes once the live ones have ended. Serve
// returns when the session has ended and every goroutine it started has
// returned (handle included); an error in the framing itself ends the
// session and is Serve's error.
func Serve(ctx context.Context, conn net.Conn, lim Limits, handle func(c *Conn, service string), onErr func(error)) error {
	maxStreams := lim.MaxStreams
	if maxStreams <= 0 {
		maxStreams = DefaultMaxStreams
	}
	r, burst := lim.StreamRate, lim.StreamBurst
	if r <= 0 {
		r = DefaultStreamRate
	}
	if burst <= 0 {
		burst = DefaultStreamBurst
	}
	if onErr == nil {
		onErr = func(error) {}
	}
	opens := rate.NewLimiter(r, burst)
	// yamux resets streams beyond twice the limit by itself (a backstop
	// that does not wait for the accept loop); up to there, the accept
	// loop refuses and counts.
	b := newBudget(lim.Budget)
	sess, err := yamux.Server(conn, yamuxConfig(2*maxStreams), b.span)
	if err != nil {
		return err
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	defer sess.Close()
	wg.Go(func() {
		select {
		case <-ctx.Done():
		case <-sess.CloseChan():
			return
		}
		t := time.NewTicker(drainPoll)
		defer t.Stop()
		// Close only once the streams are gone AND their last frames
		// (a reply, a FIN) have left: Close drops what is still queued.
		for sess.NumStreams() > 0 || sess.Pending() > 0 {
			select {
			case <-t.C:
			case <-sess.CloseChan():
				return
			}
		}
		sess.Close()
	})
	for {
		st, err := sess.AcceptStream()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, yamux.ErrSessionShutdown) {
				return nil
			}
			return err
		}
		c := NewConn(st, nil)
		switch {
		case ctx.Err() != nil:
			c.Refuse(StatusDraining)
			continue
		case !opens.Allow():
			c.Refuse(StatusRate)
			onErr(ErrStreamRate)
			continue
		case sess.NumStreams() > maxStreams:
			// The client counts a stream until yamux forgets it on its
			// side, which is never before ours: a client within the
			// limit does not get here.
			c.Refuse(StatusRefused)
			onErr(ErrTooManyStreams)
			continue
		}
		wg.Go(func() {
			st.SetReadDeadline(time.Now().Add(HeaderTimeout))
			svc, err := ReadHeader(st)
			st.SetReadDeadline(time.Time{})
			if err != nil {
				c.Refuse(StatusBadHeader)
				onErr(err)
				return
			}
			handle(c, svc)
		})
	}
}
