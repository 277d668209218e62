package tlsutil

import (
	"crypto/tls"
	"net"
	"sync"
)

// Conn is a TLS connection whose Write sends all the records of one call
// with one system call. crypto/tls writes every record (at most 16 KiB of
// plaintext, and far less while its dynamic record sizing ramps up) with
// its own Write on the socket; a proxy writing 32 KiB at a time, or a
// tunnel writing 128 KiB frames, paid two to twenty-odd write system calls
// per call. Conn collects the records of one Write in a pooled buffer and
// writes them at once: one more copy of the ciphertext, far cheaper than
// the system calls it saves. Handshake, alerts and close_notify are not
// batched. An idle Conn holds no buffer.
type Conn struct {
	*tls.Conn
	b   *batchConn
	wmu sync.Mutex // one batched Write at a time
}

// Server is tls.Server on a batching connection.
func Server(conn net.Conn, cfg *tls.Config) *Conn {
	b := &batchConn{Conn: conn}
	return &Conn{Conn: tls.Server(b, cfg), b: b}
}

// Client is tls.Client on a batching connection.
func Client(conn net.Conn, cfg *tls.Config) *Conn {
	b := &batchConn{Conn: conn}
	return &Conn{Conn: tls.Client(b, cfg), b: b}
}

// Write encrypts p and sends its records with one system call.
func (c *Conn) Write(p []byte) (int, error) {
	if len(p) <= batchMin {
		return c.Conn.Write(p) // one record: nothing to gain
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.b.begin()
	n, err := c.Conn.Write(p)
	if ferr := c.b.flush(err == nil); err == nil && ferr != nil {
		return 0, ferr
	}
	return n, err
}

// batchMin: below this a Write is one record even at crypto/tls's
// smallest dynamic record size (about one TCP segment).
const batchMin = 1200

// batchConn is the socket under a Conn: between begin and flush its
// Writes are appended to a buffer.
type batchConn struct {
	net.Conn
	mu  sync.Mutex
	buf *[]byte // non-nil between begin and flush
}

var batchPool = sync.Pool{New: func() any { b := make([]byte, 0, 160<<10); return &b }}

func (b *batchConn) begin() {
	b.mu.Lock()
	b.buf = batchPool.Get().(*[]byte)
	b.mu.Unlock()
}

// flush writes what was batched (send false drops it: the TLS Write
// failed) and gives the buffer back.
func (b *batchConn) flush(send bool) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	buf := b.buf
	b.buf = nil
	var err error
	if send && len(*buf) > 0 {
		_, err = b.Conn.Write(*buf)
	}
	if cap(*buf) <= 1<<20 {
		*buf = (*buf)[:0]
		batchPool.Put(buf)
	}
	return err
}

func (b *batchConn) Write(p []byte) (int, error) {
	b.mu.Lock()
	if b.buf != nil {
		*b.buf = append(*b.buf, p...)
		b.mu.Unlock()
		return len(p), nil
	}
	b.mu.Unlock()
	return b.Conn.Write(p)
}

// NetConn returns the socket.
func (b *batchConn) NetConn() net.Conn { return b.Conn }
