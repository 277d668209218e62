// Package tunnel carries application connections as yamux streams inside
// long-lived mTLS connections between two strait proxies (ALPN
// tlsutil.ALPNMux).
//
// Stream header, written by the client right after opening a stream and
// followed at once by the application's bytes (no round trip):
//
//	byte 0      version (1)
//	byte 1      n, the length of the destination service name (1..255)
//	bytes 2..   the destination service name, n bytes
//
// The server reads the header, refuses any service but its own, authorizes
// the stream with the tunnel's verified peer and only then dials the app.
//
// Memory: yamux buffers at most the receive window per stream
// (StreamWindow, 4 MiB) when the local app reads slower than the peer
// sends, as a kernel TCP receive buffer would (Linux autotunes those up to
// 6 MiB). An idle stream holds no proxy buffer (the copy loop waits with
// WaitRead) and about 4 KiB of yamux state: yamux keeps a stream's receive
// buffer at the largest size it reached (up to about twice the window), so
// WaitRead gives it back after ShrinkAfter of idleness.
//
// Framing costs: yamux writes a frame's 12-byte header and its body with
// two Writes (two TLS records, two system calls) and hands every frame to
// its send loop. The coalescer joins header and body, and the proxy writes
// tunnel streams in frames of eight full TLS records, which together
// brought a single stream from 0.46x to 0.86x the throughput of a classic
// TLS connection (make bench; see docs/performance.md).
package tunnel

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/yamux"
)

// Version is the stream header version.
const Version = 1

// Defaults.
const (
	DefaultMaxTunnels  = 8
	DefaultMaxStreams  = 1024
	DefaultIdleTimeout = 90 * time.Second
	// StreamWindow is the per-stream receive window. yamux's 256 KiB
	// default stalls bulk streams on window updates: in make bench, 1 MiB
	// left 8 streams at 0.95-0.98x classic TLS, 2 MiB at 0.97-1.09x,
	// 4 MiB at 1.05-1.08x.
	StreamWindow = 4 * 1024 * 1024
)

// ErrBadHeader is returned for a stream header that does not parse.
var ErrBadHeader = errors.New("tunnel: bad stream header")

// AppendHeader appends the stream header for service to b.
func AppendHeader(b []byte, service string) ([]byte, error) {
	if len(service) == 0 || len(service) > 255 {
		return nil, fmt.Errorf("tunnel: service name length %d out of range", len(service))
	}
	b = append(b, Version, byte(len(service)))
	return append(b, service...), nil
}

// ReadHeader reads a stream header and returns the service name.
func ReadHeader(r io.Reader) (string, error) {
	var h [2]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return "", fmt.Errorf("%w: %w", ErrBadHeader, err)
	}
	if h[0] != Version {
		return "", fmt.Errorf("%w: version %d", ErrBadHeader, h[0])
	}
	if h[1] == 0 {
		return "", fmt.Errorf("%w: empty service name", ErrBadHeader)
	}
	name := make([]byte, h[1])
	if _, err := io.ReadFull(r, name); err != nil {
		return "", fmt.Errorf("%w: %w", ErrBadHeader, err)
	}
	return string(name), nil
}

// YamuxConfig is the session configuration both sides use.
func YamuxConfig(maxStreams int) *yamux.Config {
	c := yamux.DefaultConfig()
	c.LogOutput = io.Discard
	c.MaxStreamWindowSize = StreamWindow
	// No absolute limit on a half-closed stream: yamux's default (5m after
	// our FIN, then RST) would cut a long reply to a client that
	// half-closed after its request. The proxy's copy loop bounds
	// half-closed streams by idleness (-half-close-timeout) and Closes
	// both ends, which frees the stream on both sides.
	c.StreamCloseTimeout = 0
	if maxStreams > 0 {
		c.AcceptBacklog = maxStreams
	}
	return c
}

// Conn is one stream as a net.Conn for the proxy's copy loop: CloseWrite
// is yamux's Close (a FIN; reading goes on), Close also stops reading, and
// the first Close runs the release func.
type Conn struct {
	*yamux.Stream
	once    sync.Once
	release func()

	dl       sync.Mutex
	deadline time.Time // the caller's read deadline
	idleWait bool      // WaitRead is in its first wait, bounded by shrinkAt
	shrinkAt time.Time

	// readSinceShrink counts bytes read since the receive buffer was last
	// given back; only the reading goroutine touches it.
	readSinceShrink int
}

// shrinkMinBytes: below this much data read since the last shrink, the
// receive buffer cannot have grown much and WaitRead waits plainly,
// without the deadline juggling (and its allocations) of a bounded wait.
const shrinkMinBytes = 64 << 10

// ShrinkAfter is how long WaitRead waits before it gives the stream's
// receive buffer back: yamux keeps that buffer at the largest size it
// reached (up to twice StreamWindow after a slow reader) for the stream's
// lifetime otherwise.
var ShrinkAfter = time.Second

// NewConn wraps a stream; release (may be nil) runs once on Close.
func NewConn(s *yamux.Stream, release func()) *Conn { return &Conn{Stream: s, release: release} }

// ErrTunnelLost is what a live stream reads when its tunnel dies: yamux
// reports EOF, which would look like the peer's half-close.
var ErrTunnelLost = errors.New("tunnel: connection lost")

// Read is the stream's Read, except that EOF caused by the tunnel ending
// is ErrTunnelLost, so the copy loop resets the app connection instead of
// half-closing it.
func (c *Conn) Read(b []byte) (int, error) {
	n, err := c.Stream.Read(b)
	c.readSinceShrink += n
	if err == io.EOF && c.Stream.Session().IsClosed() {
		err = ErrTunnelLost
	}
	return n, err
}

// WaitRead blocks until Read would return data, EOF or an error, without
// a buffer: yamux's Read with an empty buffer waits for data and leaves it
// buffered. The proxy's copy loop waits this way so that an idle stream
// holds no read buffer; after ShrinkAfter of waiting the stream's receive
// buffer is released too, once enough has been read for it to have grown.
func (c *Conn) WaitRead() error {
	if c.readSinceShrink < shrinkMinBytes {
		_, err := c.Read(nil)
		return err
	}
	c.dl.Lock()
	c.idleWait, c.shrinkAt = true, time.Now().Add(ShrinkAfter)
	c.Stream.SetReadDeadline(c.effectiveDeadline())
	c.dl.Unlock()
	_, err := c.Read(nil)
	c.dl.Lock()
	c.idleWait = false
	user := c.deadline
	c.Stream.SetReadDeadline(user)
	c.dl.Unlock()
	if !errors.Is(err, yamux.ErrTimeout) || (!user.IsZero() && !time.Now().Before(user)) {
		return err
	}
	c.Stream.Shrink()
	c.readSinceShrink = 0
	_, err = c.Read(nil)
	return err
}

// effectiveDeadline is the caller's deadline, or WaitRead's shrink
// deadline when that comes first; c.dl is held.
func (c *Conn) effectiveDeadline() time.Time {
	if c.idleWait && (c.deadline.IsZero() || c.shrinkAt.Before(c.deadline)) {
		return c.shrinkAt
	}
	return c.deadline
}

// SetReadDeadline sets the read deadline; it also applies at once to a
// WaitRead in progress.
func (c *Conn) SetReadDeadline(t time.Time) error {
	c.dl.Lock()
	defer c.dl.Unlock()
	c.deadline = t
	return c.Stream.SetReadDeadline(c.effectiveDeadline())
}

// SetDeadline sets both deadlines.
func (c *Conn) SetDeadline(t time.Time) error {
	c.SetReadDeadline(t)
	return c.Stream.SetWriteDeadline(t)
}

// CloseWrite sends FIN; the peer reads EOF and may go on writing.
func (c *Conn) CloseWrite() error { return c.Stream.Close() }

// Close finishes the stream both ways.
func (c *Conn) Close() error {
	err := c.Stream.Close()
	c.once.Do(func() {
		// Stop waiting for the peer's data: a reader blocked in Read is
		// woken, and what the peer still sends is dropped by the deadline.
		c.SetReadDeadline(time.Now())
		if c.release != nil {
			c.release()
		}
	})
	return err
}

var _ net.Conn = (*Conn)(nil)
