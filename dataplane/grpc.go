package dataplane

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"

	"golang.org/x/net/http2"
)

// grpcClient makes unary gRPC calls to the servers' public gRPC port
// (-grpc-port) over HTTP/2, by hand: the one call strait needs (ConnectCA
// Sign) has a one-string request and a one-string response, which does not
// justify linking google.golang.org/grpc and protobuf into the binary.
// Requests follow the current server of Servers.
type grpcClient struct {
	servers *Servers
	port    int
	tls     *tls.Config // nil: plaintext (h2c)
	token   func() string
	rt      *http2.Transport
}

func newGRPCClient(servers *Servers, port int, tlsCfg *tls.Config, token func() string) *grpcClient {
	g := &grpcClient{servers: servers, port: port, tls: tlsCfg, token: token}
	g.rt = &http2.Transport{
		AllowHTTP: tlsCfg == nil,
		DialTLSContext: func(ctx context.Context, _, _ string, _ *tls.Config) (net.Conn, error) {
			c, addr, err := servers.Dial(ctx, port)
			if err != nil {
				return nil, err
			}
			if g.tls == nil {
				return c, nil
			}
			cfg := g.tls.Clone()
			cfg.NextProtos = []string{"h2"}
			if cfg.ServerName == "" {
				cfg.ServerName = addr
			}
			tc := tls.Client(c, cfg)
			if err := tc.HandshakeContext(ctx); err != nil {
				c.Close()
				return nil, fmt.Errorf("TLS to server %s: %w", addr, err)
			}
			return tc, nil
		},
	}
	return g
}

// close drops the pooled connections.
func (g *grpcClient) close() { g.rt.CloseIdleConnections() }

// grpcStatusError is a call answered with a non-OK grpc-status.
type grpcStatusError struct {
	Code    int
	Message string
}

func (e *grpcStatusError) Error() string {
	return fmt.Sprintf("grpc status %d: %s", e.Code, e.Message)
}

// call sends msg (an encoded protobuf message) to method and returns the
// encoded response message.
func (g *grpcClient) call(ctx context.Context, method string, msg []byte) ([]byte, error) {
	var body bytes.Buffer
	var hdr [5]byte
	binary.BigEndian.PutUint32(hdr[1:], uint32(len(msg)))
	body.Write(hdr[:])
	body.Write(msg)
	scheme := "https"
	if g.tls == nil {
		scheme = "http"
	}
	u := &url.URL{Scheme: scheme, Host: "consul-server:" + strconv.Itoa(g.port), Path: method}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u.String(), &body)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/grpc+proto")
	req.Header.Set("TE", "trailers")
	if tok := g.token(); tok != "" {
		req.Header.Set("x-consul-token", tok)
	}
	resp, err := g.rt.RoundTrip(req)
	if err != nil {
		return nil, fmt.Errorf("gRPC %s: %w", method, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("gRPC %s: HTTP status %s", method, resp.Status)
	}
	data, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil {
		return nil, fmt.Errorf("gRPC %s: reading the response: %w", method, err)
	}
	st := resp.Trailer.Get("grpc-status")
	if st == "" { // a trailers-only response carries the status in its headers
		st = resp.Header.Get("grpc-status")
	}
	if st != "0" {
		code, _ := strconv.Atoi(st)
		m := resp.Trailer.Get("grpc-message")
		if m == "" {
			m = resp.Header.Get("grpc-message")
		}
		if um, err := url.PathUnescape(m); err == nil {
			m = um
		}
		return nil, fmt.Errorf("gRPC %s: %w", method, &grpcStatusError{Code: code, Message: m})
	}
	if len(data) < 5 {
		return nil, fmt.Errorf("gRPC %s: short response (%d bytes)", method, len(data))
	}
	if data[0] != 0 {
		return nil, fmt.Errorf("gRPC %s: compressed response not supported", method)
	}
	n := binary.BigEndian.Uint32(data[1:5])
	if int(n) != len(data)-5 {
		return nil, fmt.Errorf("gRPC %s: response frame of %d bytes, have %d", method, n, len(data)-5)
	}
	return data[5:], nil
}

// appendStringField appends protobuf field num (wire type 2) holding s.
func appendStringField(b []byte, num int, s string) []byte {
	b = binary.AppendUvarint(b, uint64(num)<<3|2)
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

// stringField returns the last value of string field num in a protobuf
// message, skipping every other field.
func stringField(msg []byte, num int) (string, error) {
	var out string
	for len(msg) > 0 {
		key, n := binary.Uvarint(msg)
		if n <= 0 {
			return "", errors.New("protobuf: bad field key")
		}
		msg = msg[n:]
		f, wt := int(key>>3), key&7
		switch wt {
		case 0: // varint
			_, n := binary.Uvarint(msg)
			if n <= 0 {
				return "", errors.New("protobuf: bad varint")
			}
			msg = msg[n:]
		case 1: // 64-bit
			if len(msg) < 8 {
				return "", errors.New("protobuf: short fixed64")
			}
			msg = msg[8:]
		case 5: // 32-bit
			if len(msg) < 4 {
				return "", errors.New("protobuf: short fixed32")
			}
			msg = msg[4:]
		case 2: // length-delimited
			l, n := binary.Uvarint(msg)
			if n <= 0 || uint64(len(msg)-n) < l {
				return "", errors.New("protobuf: bad length")
			}
			if f == num {
				out = string(msg[n : n+int(l)])
			}
			msg = msg[n+int(l):]
		default:
			return "", fmt.Errorf("protobuf: wire type %d not supported", wt)
		}
	}
	return out, nil
}
