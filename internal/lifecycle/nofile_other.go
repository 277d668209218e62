//go:build !unix

package lifecycle

import "errors"

// RaiseNoFile is unsupported outside Unix: there is no RLIMIT_NOFILE.
func RaiseNoFile() (soft, hard uint64, err error) {
	return 0, 0, errors.New("open-file limits are not supported on this platform")
}
