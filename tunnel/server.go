package tunnel

import (
	"context"
	"errors"
	"net"
	"time"

	"github.com/hashicorp/yamux"
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
}

// ErrStreamRate is reported for a stream refused because the tunnel opened
// streams faster than Limits allow.
var ErrStreamRate = errors.New("tunnel: stream-open rate exceeded")

// Serve runs a server session on an established tunnel connection and
// calls handle for every stream with its header read, in a goroutine of its
// own, within lim (streams beyond are closed at once and reported to
// onErr: ErrTooManyStreams, ErrStreamRate). It returns when the session ends or
// ctx is done, which sends GoAway (no new streams) and leaves live streams
// to finish; the caller closes conn after its streams are done. onErr
// also reports header errors; an error in the framing itself ends the
// session (Serve's error).
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
	opens := rate.NewLimiter(r, burst)
	sess, err := yamux.Server(newCoalescer(conn), YamuxConfig(maxStreams))
	if err != nil {
		return err
	}
	// Draining: GoAway refuses new streams; the session closes once the
	// live ones are done (or the caller closes conn).
	stop := context.AfterFunc(ctx, func() {
		sess.GoAway()
		for sess.NumStreams() > 0 && !sess.IsClosed() {
			time.Sleep(50 * time.Millisecond)
		}
		sess.Close()
	})
	defer stop()
	defer sess.Close()
	sem := make(chan struct{}, maxStreams)
	for {
		st, err := sess.AcceptStream()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		if !opens.Allow() {
			st.Close()
			if onErr != nil {
				onErr(ErrStreamRate)
			}
			continue
		}
		select {
		case sem <- struct{}{}:
		default:
			st.Close()
			if onErr != nil {
				onErr(ErrTooManyStreams)
			}
			continue
		}
		go func() {
			c := NewConn(st, func() { <-sem })
			st.SetReadDeadline(time.Now().Add(HeaderTimeout))
			svc, err := ReadHeader(st)
			st.SetReadDeadline(time.Time{})
			if err != nil {
				c.Close()
				if onErr != nil {
					onErr(err)
				}
				return
			}
			handle(c, svc)
		}()
	}
}

// ErrTooManyStreams is reported for a stream refused because the tunnel
// already carries Limits.MaxStreams streams.
var ErrTooManyStreams = errors.New("tunnel: too many concurrent streams")

// IsFramingError reports whether err, as returned by Serve, means the peer
// broke the yamux framing (the tunnel was closed for it) rather than the
// connection ending.
func IsFramingError(err error) bool {
	for _, e := range []error{yamux.ErrInvalidVersion, yamux.ErrInvalidMsgType, yamux.ErrDuplicateStream,
		yamux.ErrRecvWindowExceeded, yamux.ErrUnexpectedFlag} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}
