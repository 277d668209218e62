package tunnel

import (
	"context"
	"net"
	"time"

	"github.com/hashicorp/yamux"
)

// HeaderTimeout bounds the wait for a stream's header.
const HeaderTimeout = 10 * time.Second

// Serve runs a server session on an established tunnel connection and
// calls handle for every stream with its header read, in a goroutine of its
// own, at most maxStreams at a time (streams beyond are closed). It returns
// when the session ends or ctx is done, which sends GoAway (no new
// streams) and leaves live streams to finish; the caller closes conn after
// its streams are done. onErr reports framing and header errors.
func Serve(ctx context.Context, conn net.Conn, maxStreams int, handle func(c *Conn, service string), onErr func(error)) error {
	if maxStreams <= 0 {
		maxStreams = DefaultMaxStreams
	}
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
		select {
		case sem <- struct{}{}:
		default:
			st.Close()
			if onErr != nil {
				onErr(errTooMany)
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

type tooMany struct{}

func (tooMany) Error() string { return "tunnel: too many concurrent streams" }

var errTooMany error = tooMany{}
