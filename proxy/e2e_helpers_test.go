package proxy

import (
	"context"
	"os"
	"syscall"
)

func errReset() error { return syscall.ECONNRESET }

func timeoutErr() error { return os.ErrDeadlineExceeded }

func errDeadline() error { return context.DeadlineExceeded }
