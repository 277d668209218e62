package gateway

import (
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"time"
)

// TLS record layer constants (RFC 8446 5.1).
const (
	recordHeaderLen     = 5
	recordTypeHandshake = 22
	// MaxHelloRecord is the largest ClientHello record the gateway reads:
	// one TLS plaintext record (2^14 bytes) after its 5-byte header.
	MaxHelloRecord           = recordHeaderLen + 1<<14
	handshakeTypeClientHello = 1
	extensionServerName      = 0
	serverNameTypeHostName   = 0
	maxHostNameLen           = 253
)

// Errors of ReadHello. They say what the peer sent wrong; none of them is
// the gateway's fault.
var (
	ErrNotTLS      = errors.New("not a TLS handshake record")
	ErrHelloTooBig = errors.New("ClientHello record longer than 16 KiB")
	// ErrFragmented: the ClientHello does not fit in its first record.
	// Every mesh client (Go, Envoy, the SDK) sends it in one record.
	ErrFragmented = errors.New("ClientHello split across records")
	ErrBadHello   = errors.New("malformed ClientHello")
	ErrNoSNI      = errors.New("ClientHello has no server name")
)

// ReadHello reads exactly one TLS record from c, which must hold a whole
// ClientHello, and returns the record's bytes (to be replayed to the
// backend) and the server name it carries, lowercased. It never reads past
// the record, so the rest of the stream stays in the socket for the kernel
// to splice. deadline bounds the whole read (zero: none); it is cleared
// before ReadHello returns.
func ReadHello(c net.Conn, deadline time.Time) (record []byte, sni string, err error) {
	if !deadline.IsZero() {
		if err := c.SetReadDeadline(deadline); err != nil {
			return nil, "", fmt.Errorf("reading the ClientHello: %w", err)
		}
		defer c.SetReadDeadline(time.Time{})
	}
	var hdr [recordHeaderLen]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		return nil, "", fmt.Errorf("reading the ClientHello record header: %w", err)
	}
	n, err := checkRecordHeader(hdr[:])
	if err != nil {
		return nil, "", err
	}
	record = make([]byte, recordHeaderLen+n)
	copy(record, hdr[:])
	if _, err := io.ReadFull(c, record[recordHeaderLen:]); err != nil {
		return nil, "", fmt.Errorf("reading the ClientHello record (%d bytes): %w", n, err)
	}
	sni, err = ParseClientHello(record[recordHeaderLen:])
	if err != nil {
		return nil, "", err
	}
	return record, sni, nil
}

// checkRecordHeader validates a record header and returns the length of
// the record's body.
func checkRecordHeader(h []byte) (int, error) {
	// A handshake record; legacy_record_version 3.x (3.1 in every
	// ClientHello from TLS 1.2 and 1.3 clients, 3.0 from some old ones).
	if h[0] != recordTypeHandshake || h[1] != 3 {
		return 0, ErrNotTLS
	}
	n := int(h[3])<<8 | int(h[4])
	switch {
	case n == 0:
		return 0, ErrBadHello
	case n > MaxHelloRecord-recordHeaderLen:
		return 0, ErrHelloTooBig
	}
	return n, nil
}

// ParseClientHello returns the host name of the server_name extension of
// the ClientHello handshake message at the start of body (a record's
// payload), lowercased. The name must be a plausible DNS name (letters,
// digits, '-', '_' and '.', no empty label, at most 253 bytes); the
// gateway routes nothing else.
func ParseClientHello(body []byte) (string, error) {
	s := reader(body)
	typ, ok1 := s.u8()
	n, ok2 := s.u24()
	if !ok1 || !ok2 || typ != handshakeTypeClientHello {
		return "", ErrBadHello
	}
	if n > len(s) {
		return "", ErrFragmented
	}
	s = s[:n] // anything after the message in the record is replayed untouched
	// The structure is checked as far as crypto/tls's parser checks it
	// (handshake_messages.go), no further: the backend's TLS stack judges
	// the rest, and the gateway only needs the server name.
	var sessionID, suites, compression, exts reader
	if !s.skip(2+32) || // legacy_version, random
		!s.vec8(&sessionID) ||
		!s.vec16(&suites) || len(suites)%2 != 0 ||
		!s.vec8(&compression) {
		return "", ErrBadHello
	}
	if len(s) == 0 {
		return "", ErrNoSNI // no extensions at all
	}
	if !s.vec16(&exts) || len(s) != 0 {
		return "", ErrBadHello
	}
	name, found := "", false
	for len(exts) > 0 {
		var typ uint16
		var data reader
		if !exts.u16(&typ) || !exts.vec16(&data) {
			return "", ErrBadHello
		}
		if typ != extensionServerName {
			continue
		}
		if found {
			return "", ErrBadHello // a second server_name extension
		}
		found = true
		var list reader
		if !data.vec16(&list) || len(data) != 0 || len(list) == 0 {
			return "", ErrBadHello
		}
		for len(list) > 0 {
			nt, ok := list.u8()
			var host reader
			if !ok || !list.vec16(&host) {
				return "", ErrBadHello
			}
			if nt == serverNameTypeHostName && name == "" {
				name = string(host)
				if name == "" {
					return "", ErrBadHello
				}
			}
		}
	}
	if name == "" {
		return "", ErrNoSNI
	}
	name = strings.ToLower(name)
	if !validHostName(name) {
		return "", ErrBadHello
	}
	return name, nil
}

// validHostName reports whether s (lowercase) is a DNS name the gateway
// may route and log: LDH labels (plus '_'), none empty, no trailing dot.
func validHostName(s string) bool {
	if len(s) == 0 || len(s) > maxHostNameLen {
		return false
	}
	label := 0
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '.':
			if label == 0 {
				return false
			}
			label = 0
			continue
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9', c == '-', c == '_':
		default:
			return false
		}
		label++
		if label > 63 {
			return false
		}
	}
	return label > 0
}

// reader consumes a byte slice from the front; every method reports
// whether the bytes were there and consumes nothing when they were not.
type reader []byte

func (r *reader) u8() (byte, bool) {
	if len(*r) < 1 {
		return 0, false
	}
	v := (*r)[0]
	*r = (*r)[1:]
	return v, true
}

func (r *reader) u16(v *uint16) bool {
	if len(*r) < 2 {
		return false
	}
	*v = uint16((*r)[0])<<8 | uint16((*r)[1])
	*r = (*r)[2:]
	return true
}

func (r *reader) u24() (int, bool) {
	if len(*r) < 3 {
		return 0, false
	}
	v := int((*r)[0])<<16 | int((*r)[1])<<8 | int((*r)[2])
	*r = (*r)[3:]
	return v, true
}

func (r *reader) skip(n int) bool {
	if len(*r) < n {
		return false
	}
	*r = (*r)[n:]
	return true
}

// vec8 and vec16 read a vector with a 1- or 2-byte length prefix.
func (r *reader) vec8(out *reader) bool {
	if len(*r) < 1 {
		return false
	}
	n := int((*r)[0])
	if len(*r) < 1+n {
		return false
	}
	*out = (*r)[1 : 1+n]
	*r = (*r)[1+n:]
	return true
}

func (r *reader) vec16(out *reader) bool {
	if len(*r) < 2 {
		return false
	}
	n := int((*r)[0])<<8 | int((*r)[1])
	if len(*r) < 2+n {
		return false
	}
	*out = (*r)[2 : 2+n]
	*r = (*r)[2+n:]
	return true
}
