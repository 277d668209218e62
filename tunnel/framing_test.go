package tunnel

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"testing"

	"github.com/hashicorp/yamux"
)

// writesConn records each Write.
type writesConn struct {
	net.Conn
	writes [][]byte
}

func (w *writesConn) Write(p []byte) (int, error) {
	w.writes = append(w.writes, bytes.Clone(p))
	return len(p), nil
}

func frameHeader(typ byte, length uint32) []byte {
	h := make([]byte, frameHeaderSize)
	h[1] = typ
	binary.BigEndian.PutUint32(h[8:], length)
	return h
}

// TestCoalescer: a data frame's header goes out with the first record's
// worth of its body in one Write; the rest of a large body follows as is;
// header-only frames (window updates, pings) are not held back.
func TestCoalescer(t *testing.T) {
	w := &writesConn{}
	c := newCoalescer(w)
	upd := frameHeader(1, 1000) // window update
	c.Write(upd)
	if len(w.writes) != 1 || !bytes.Equal(w.writes[0], upd) {
		t.Fatalf("window update held back: %d writes", len(w.writes))
	}
	body := bytes.Repeat([]byte{7}, 3*maxTLSPlaintext)
	hdr := frameHeader(frameTypeData, uint32(len(body)))
	if n, err := c.Write(hdr); n != frameHeaderSize || err != nil {
		t.Fatal(n, err)
	}
	if len(w.writes) != 1 {
		t.Fatal("data header written before its body")
	}
	if n, err := c.Write(body); n != len(body) || err != nil {
		t.Fatal(n, err)
	}
	if len(w.writes) != 3 || len(w.writes[1]) != maxTLSPlaintext {
		t.Fatalf("%d writes, first %d bytes", len(w.writes), len(w.writes[1]))
	}
	got := append(append([]byte{}, w.writes[1]...), w.writes[2]...)
	if !bytes.Equal(got, append(hdr, body...)) {
		t.Fatal("frame bytes changed")
	}
	// A small frame: one Write of header and body.
	c.Write(frameHeader(frameTypeData, 3))
	c.Write([]byte("abc"))
	if last := w.writes[len(w.writes)-1]; len(w.writes) != 4 || !bytes.HasSuffix(last, []byte("abc")) || len(last) != frameHeaderSize+3 {
		t.Fatalf("small frame: %d writes, last %q", len(w.writes), last)
	}
}

func TestIsFramingError(t *testing.T) {
	if !IsFramingError(fmt.Errorf("x: %w", yamux.ErrInvalidVersion)) || IsFramingError(io.EOF) || IsFramingError(nil) {
		t.Fatal("IsFramingError")
	}
}
