// Package tunnel carries application connections as yamux streams inside
// long-lived mTLS connections between two strait proxies (ALPN
// tlsutil.ALPNMux, "strait-mux/2").
//
// Framing is yamux (a fork of github.com/libp2p/go-yamux in
// strait/internal/yamux, see its FORK.md: stream resets with error codes,
// context-aware opens, per-stream memory accounting, and a small initial
// window both ends agree on). On a new
// stream the client writes the stream header at once:
//
//	byte 0      version (2)
//	byte 1      n, the length of the destination service name (1..255)
//	bytes 2..   the destination service name, n bytes
//
// and waits for the server's answer before any application byte is sent:
// one byte, StatusOK, once the server has checked the service, authorized
// the stream with the tunnel's verified peer and dialed the app; or a reset
// of the stream whose error code says why (StatusRefused: a limit or a
// stream limit, StatusDraining, StatusRate: try another tunnel or a
// classic connection; StatusDenied;
// StatusUnavailable: the app could not be dialed; StatusBadHeader). Nothing
// the client sends before the answer can reach an application, so a refused
// stream is retried elsewhere without losing a byte.
//
// Stream slots: both ends count a stream from its SYN until yamux forgets it
// (both FINs, or a reset). A stream closed before both sides finished is
// reset, never left half-open, so the client's count is never below the
// server's and a client within the server's MaxStreams is never refused.
//
// Memory: a stream may have InitialWindow (16 KiB) unread in flight;
// window growth beyond it (up to StreamWindow per stream) is drawn from a
// per-tunnel budget (DefaultTunnelBudget). What a peer can make a tunnel
// buffer is therefore at most MaxStreams x InitialWindow + the budget
// (16 MiB with the defaults). Refused streams are reset at once, so data
// sent on them is dropped on arrival. docs/limits.md has the worst case
// per peer.
package tunnel

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/straitproxy/strait/internal/yamux"
)

// Version is the stream header version.
const Version = 2

// Defaults.
const (
	DefaultMaxTunnels  = 4
	DefaultMaxStreams  = 512
	DefaultIdleTimeout = 90 * time.Second
	// InitialWindow is the receive window a stream starts with, in both
	// directions (strait-mux/2 fixes it; yamux's specification says 256
	// KiB). It is all a peer can make us buffer for a stream without our
	// granting more from the tunnel's budget.
	InitialWindow = 16 << 10
	// StreamWindow is the largest receive window a stream grows to. yamux's
	// 256 KiB initial window stalls bulk streams on window updates: in make
	// bench, 1 MiB left 8 streams at 0.95-0.98x classic TLS, 2 MiB at
	// 0.97-1.09x, 4 MiB at 1.05-1.08x.
	StreamWindow = 4 << 20
	// DefaultTunnelBudget bounds the window growth of all streams of one
	// tunnel together (see the package doc).
	DefaultTunnelBudget = 8 << 20
	// frameSize is the largest yamux frame: eight full TLS records
	// (header included), so that a bulk stream's frames fill records.
	frameSize = 8 * 16384
)

// Answers of the server to a stream header: StatusOK is written as one
// byte; the others are the error code of the stream's reset.
const (
	StatusOK          = 0
	StatusRefused     = 1
	StatusDenied      = 2
	StatusUnavailable = 3
	StatusBadHeader   = 4
	StatusDraining    = 5 // the server is draining: no new streams on this tunnel
	StatusRate        = 6 // the tunnel opened streams too fast: try another
	StatusBusy        = 7 // the server takes no more connections now (its admission limits)
)

// Errors of a stream open (Pool.Open).
var (
	// ErrDenied: the server's intentions deny us; a classic connection
	// would be denied too.
	ErrDenied = errors.New("tunnel: stream denied by the server")
	// ErrUnavailable: the server could not dial its application.
	ErrUnavailable = errors.New("tunnel: the server's application is unavailable")
	// errRefused: a limit or a drain on the server; retried elsewhere.
	errRefused = errors.New("tunnel: stream refused")
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

// yamuxConfig is the session configuration; maxIncoming bounds the
// streams the peer may open (yamux resets the rest).
func yamuxConfig(maxIncoming int) *yamux.Config {
	c := yamux.DefaultConfig()
	c.LogOutput = io.Discard
	c.InitialStreamWindowSize = InitialWindow
	c.MaxStreamWindowSize = StreamWindow
	c.MaxMessageSize = frameSize
	c.MaxIncomingStreams = uint32(maxIncoming)
	c.AcceptBacklog = maxIncoming
	return c
}

// Conn is one stream as a net.Conn for the proxy's copy loop: CloseWrite
// sends FIN (reading goes on); Close resets the stream unless both sides
// have finished, and runs the release func once.
type Conn struct {
	*yamux.Stream
	once    sync.Once
	release func()
}

// NewConn wraps a stream; release (may be nil) runs once on Close.
func NewConn(s *yamux.Stream, release func()) *Conn { return &Conn{Stream: s, release: release} }

// ErrTunnelLost is what a live stream reads when its tunnel dies, so that
// the copy loop resets the app connection instead of half-closing it. A
// stream whose peer had already finished still reads its data and EOF.
var ErrTunnelLost = errors.New("tunnel: connection lost")

// Read is the stream's Read, with the tunnel's end reported as
// ErrTunnelLost.
func (c *Conn) Read(b []byte) (int, error) {
	n, err := c.Stream.Read(b)
	if err != nil && err != io.EOF && c.Stream.Session().IsClosed() {
		err = fmt.Errorf("%w: %w", ErrTunnelLost, err)
	}
	return n, err
}

// WaitRead blocks until Read would return data, EOF or an error, without
// a buffer: a stream's Read with an empty buffer waits for data and leaves
// it buffered. The proxy's copy loop waits this way so that an idle stream
// holds no read buffer (yamux gives a stream's receive segments back as
// they are read).
func (c *Conn) WaitRead() error {
	_, err := c.Read(nil)
	return err
}

// CloseWrite sends FIN; the peer reads EOF and may go on writing.
func (c *Conn) CloseWrite() error { return c.Stream.CloseWrite() }

// CloseRead does nothing: yamux's CloseRead is not seen by the peer and
// would let the two ends disagree on the stream's slot. Close resets.
func (c *Conn) CloseRead() error { return nil }

// Close finishes the stream: a reset unless both sides already finished
// (then yamux has forgotten it and the reset is a no-op).
func (c *Conn) Close() error {
	err := c.Stream.Reset()
	c.once.Do(func() {
		if c.release != nil {
			c.release()
		}
	})
	return err
}

// Refuse resets the stream with status (StatusRefused, ...) as its error
// code and releases it.
func (c *Conn) Refuse(status uint32) {
	c.Stream.ResetWithError(status)
	c.Close()
}

// Accept answers the stream's header with StatusOK.
func (c *Conn) Accept() error {
	_, err := c.Stream.Write([]byte{StatusOK})
	return err
}

// Reset is an abortive close (the copy loop's abort): the peer's reads and
// writes fail at once.
func (c *Conn) Reset() error { return c.Close() }

var _ net.Conn = (*Conn)(nil)

// IsReset reports whether err is a stream reset (by either side) or the
// loss of the stream's tunnel.
func IsReset(err error) bool {
	return errors.Is(err, yamux.ErrStreamReset) || errors.Is(err, ErrTunnelLost)
}

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
