package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"
)

// runRelay is `bench relay -listen ADDR -target ADDR`: a plain TCP relay,
// the no-crypto ceiling. Each accepted connection is paired with a new one
// to target and bytes are copied both ways; an EOF in one direction becomes
// a CloseWrite on the other side (half-close) and the connection pair is
// closed once both directions are done. io.Copy between two *net.TCPConn
// uses splice(2), so the payload never enters user space; with -copy the
// relay reads and writes through a 32 KiB buffer instead, as a TLS proxy
// must: the copies into and out of the kernel that no user-space TLS proxy
// can avoid.
func runRelay(args []string) int {
	fs := flag.NewFlagSet("relay", flag.ExitOnError)
	listen := fs.String("listen", "127.0.0.1:0", "address to listen on")
	target := fs.String("target", "", "address to relay to")
	userCopy := fs.Bool("copy", false, "copy through user space (read/write, no splice)")
	_ = fs.Parse(args)
	if *target == "" {
		fmt.Fprintln(os.Stderr, "relay: -target is required")
		return 2
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, "relay:", err)
		return 1
	}
	fmt.Printf("relay listening on %s -> %s\n", ln.Addr(), *target)
	go closeOnSignal(ln)
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return 0
			}
			fmt.Fprintln(os.Stderr, "relay: accept:", err)
			continue
		}
		go relay(c.(*net.TCPConn), *target, *userCopy)
	}
}

func relay(in *net.TCPConn, target string, userCopy bool) {
	defer in.Close()
	c, err := net.DialTimeout("tcp", target, 5*time.Second)
	if err != nil {
		fmt.Fprintln(os.Stderr, "relay: dial:", err)
		return
	}
	out := c.(*net.TCPConn)
	defer out.Close()
	var wg sync.WaitGroup
	wg.Add(2)
	pipe := func(dst, src *net.TCPConn) {
		defer wg.Done()
		var err error
		if userCopy {
			// Hide ReadFrom and WriteTo, which would splice.
			_, err = io.CopyBuffer(struct{ io.Writer }{dst}, struct{ io.Reader }{src}, make([]byte, 32<<10))
		} else {
			_, err = io.Copy(dst, src)
		}
		if err != nil && !benign(err) {
			fmt.Fprintln(os.Stderr, "relay: copy:", err)
		}
		_ = dst.CloseWrite()
	}
	go pipe(out, in)
	go pipe(in, out)
	wg.Wait()
}
