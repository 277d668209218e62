package main

import (
	"bufio"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"syscall"
)

// The backend's wire protocol. The client's first byte picks the mode:
//
//	'E' echo: every byte read is written back.
//	'S' source: an endless stream is written until the client goes away.
//	'D' discard sink: frames of a 4-byte big-endian length and that many
//	    bytes; a zero length ends the transfer and the sink answers with the
//	    8-byte big-endian count of payload bytes it received.
//
// The sink's end marker is in-band (not a half-close) because Consul's
// built-in proxy closes both directions on the first EOF, so a count sent
// after a half-close would never arrive.
const (
	modeEcho   = 'E'
	modeSource = 'S'
	modeSink   = 'D'

	frameHeader = 4
	bufSize     = 128 << 10
)

// runBackend is `bench backend -listen ADDR`: it prints "listening on ADDR"
// and serves until SIGTERM/SIGINT.
func runBackend(args []string) int {
	fs := flag.NewFlagSet("backend", flag.ExitOnError)
	listen := fs.String("listen", "127.0.0.1:0", "address to listen on")
	_ = fs.Parse(args)
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, "backend:", err)
		return 1
	}
	fmt.Printf("backend listening on %s\n", ln.Addr())
	go closeOnSignal(ln)
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return 0
			}
			fmt.Fprintln(os.Stderr, "backend: accept:", err)
			continue
		}
		go serveBackend(c)
	}
}

// closeOnSignal closes ln on SIGTERM/SIGINT, which ends the accept loop.
func closeOnSignal(ln net.Listener) {
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGTERM, syscall.SIGINT)
	<-ch
	ln.Close()
}

func serveBackend(c net.Conn) {
	defer c.Close()
	var mode [1]byte
	if _, err := io.ReadFull(c, mode[:]); err != nil {
		return
	}
	var err error
	switch mode[0] {
	case modeEcho:
		err = echo(c)
	case modeSource:
		err = source(c)
	case modeSink:
		err = sink(c)
	default:
		err = fmt.Errorf("unknown mode byte %q", mode[0])
	}
	if err != nil && !benign(err) {
		fmt.Fprintf(os.Stderr, "backend: %s: mode %q: %v\n", c.RemoteAddr(), mode[0], err)
	}
}

// echo writes back whatever it reads, until EOF.
func echo(c net.Conn) error {
	buf := make([]byte, 32<<10)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				return werr
			}
		}
		if err != nil {
			if err == io.EOF {
				return nil
			}
			return err
		}
	}
}

// source writes an endless stream until the write fails.
func source(c net.Conn) error {
	buf := make([]byte, bufSize)
	fillPattern(buf)
	for {
		if _, err := c.Write(buf); err != nil {
			return err
		}
	}
}

// sink reads frames, counting payload bytes; at each zero-length frame it
// answers with the count so far (then the client closes).
func sink(c net.Conn) error {
	br := bufio.NewReaderSize(c, 2*bufSize)
	var hdr [frameHeader]byte
	var total uint64
	for {
		if _, err := io.ReadFull(br, hdr[:]); err != nil {
			if err == io.EOF {
				return nil
			}
			return err
		}
		n := binary.BigEndian.Uint32(hdr[:])
		if n == 0 {
			var reply [8]byte
			binary.BigEndian.PutUint64(reply[:], total)
			if _, err := c.Write(reply[:]); err != nil {
				return err
			}
			continue
		}
		d, err := br.Discard(int(n))
		total += uint64(d)
		if err != nil {
			return fmt.Errorf("frame cut short after %d of %d bytes (%d in total): %w", d, n, total, err)
		}
	}
}

// fillPattern fills b with non-repeating-looking bytes (no compression or
// zero-page shortcuts anywhere on the path).
func fillPattern(b []byte) {
	x := uint32(2463534242)
	for i := range b {
		x ^= x << 13
		x ^= x >> 17
		x ^= x << 5
		b[i] = byte(x)
	}
}

// benign reports errors that only mean the peer went away.
func benign(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, syscall.EPIPE) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, net.ErrClosed)
}
