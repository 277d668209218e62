package tunnel

import (
	"encoding/binary"
	"net"
)

// yamux frame header layout (yamux spec.md): version, type, flags (2),
// stream id (4), length (4).
const (
	frameHeaderSize = 12
	frameTypeData   = 0
	// maxTLSPlaintext is a TLS record's largest payload.
	maxTLSPlaintext = 16384
	// maxFrameBody is what fits in a TLS record after a frame header.
	maxFrameBody = maxTLSPlaintext - frameHeaderSize
)

// coalescer is the connection under a yamux session. yamux's send loop
// writes a data frame's 12-byte header and its body with two Writes; on a
// TLS connection that is two records, two seals and two system calls per
// frame. The coalescer holds a data frame's header back and writes it
// with the body in one Write. Everything else (window updates, pings,
// GoAway: header-only frames) passes through at once. Only yamux's send
// loop writes, from one goroutine, so no lock is needed.
type coalescer struct {
	net.Conn
	buf  []byte // header held back, then header+body
	held bool
}

func newCoalescer(c net.Conn) *coalescer {
	return &coalescer{Conn: c, buf: make([]byte, 0, frameHeaderSize+maxFrameBody)}
}

func (c *coalescer) Write(p []byte) (int, error) {
	if c.held {
		// The header and the first record's worth of body in one Write;
		// the rest of a large body goes as is (crypto/tls writes one
		// record per system call either way).
		c.held = false
		first := min(len(p), maxFrameBody)
		c.buf = append(c.buf[:frameHeaderSize], p[:first]...)
		if _, err := c.Conn.Write(c.buf); err != nil {
			return 0, err
		}
		if first < len(p) {
			if n, err := c.Conn.Write(p[first:]); err != nil {
				return first + n, err
			}
		}
		return len(p), nil
	}
	if len(p) == frameHeaderSize && p[1] == frameTypeData && binary.BigEndian.Uint32(p[8:12]) > 0 {
		c.buf = append(c.buf[:0], p...)
		c.held = true
		return len(p), nil
	}
	return c.Conn.Write(p)
}
