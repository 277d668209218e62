//go:build !linux

package ktls

import "syscall"

// Probe reports that kTLS exists only on Linux.
func Probe() error { return ErrUnsupported }

// Install is unsupported off Linux.
func Install(syscall.RawConn, *CryptoInfo, *CryptoInfo) error { return ErrUnsupported }
