package tproxy

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"

	"golang.org/x/sys/unix"
)

// soOriginalDst is SO_ORIGINAL_DST (linux/netfilter_ipv4.h) and, at
// SOL_IPV6, IP6T_SO_ORIGINAL_DST: the destination a connection had before
// an iptables REDIRECT rewrote it.
const soOriginalDst = 80

// OriginalDst returns the destination c's client dialed before iptables
// redirected it to us. For a connection that was not redirected it is c's
// local address.
func OriginalDst(c net.Conn) (netip.AddrPort, error) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return netip.AddrPort{}, fmt.Errorf("original destination: %T is not a socket", c)
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("original destination: %w", err)
	}
	local, _ := c.LocalAddr().(*net.TCPAddr)
	v6 := local != nil && local.IP.To4() == nil
	var ap netip.AddrPort
	var serr error
	err = rc.Control(func(fd uintptr) {
		if v6 {
			// sockaddr_in6 fits the Addr of an ip6_mtuinfo.
			var info *unix.IPv6MTUInfo
			info, serr = unix.GetsockoptIPv6MTUInfo(int(fd), unix.SOL_IPV6, soOriginalDst)
			if serr == nil {
				sa := info.Addr
				// Port holds the network-order bytes as the kernel wrote them.
				var pb [2]byte
				binary.NativeEndian.PutUint16(pb[:], sa.Port)
				ap = netip.AddrPortFrom(netip.AddrFrom16(sa.Addr).Unmap(), binary.BigEndian.Uint16(pb[:]))
			}
			return
		}
		// sockaddr_in fits the first 16 bytes of an ipv6_mreq.
		var mreq *unix.IPv6Mreq
		mreq, serr = unix.GetsockoptIPv6Mreq(int(fd), unix.SOL_IP, soOriginalDst)
		if serr == nil {
			b := mreq.Multiaddr
			ap = netip.AddrPortFrom(netip.AddrFrom4([4]byte{b[4], b[5], b[6], b[7]}), binary.BigEndian.Uint16(b[2:4]))
		}
	})
	if err == nil {
		err = serr
	}
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("original destination (SO_ORIGINAL_DST): %w", err)
	}
	if !ap.IsValid() {
		return netip.AddrPort{}, errors.New("original destination: none")
	}
	return ap, nil
}
