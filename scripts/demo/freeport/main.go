// Command freeport prints N distinct free TCP ports on 127.0.0.1, one per
// line. All N listeners are held open until every port is picked, so the
// ports differ from each other; another process may still take one before
// the caller binds it, which is acceptable for a demo.
package main

import (
	"flag"
	"fmt"
	"net"
	"os"
)

func main() {
	n := flag.Int("n", 1, "number of ports")
	flag.Parse()
	var ls []net.Listener
	for range *n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			fmt.Fprintln(os.Stderr, "freeport:", err)
			os.Exit(1)
		}
		ls = append(ls, l)
	}
	for _, l := range ls {
		fmt.Println(l.Addr().(*net.TCPAddr).Port)
		l.Close()
	}
}
