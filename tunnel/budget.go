package tunnel

import (
	"errors"
	"sync/atomic"

	"github.com/straitproxy/strait/internal/yamux"
)

// errBudget refuses a stream's window growth: the tunnel's budget is spent.
var errBudget = errors.New("tunnel: receive budget exhausted")

// budget is one tunnel's memory accounting. yamux asks it for a span per
// stream (yamux.MemoryManager): the initial window is always granted (the
// protocol gives the peer that much credit the moment it opens a stream);
// growth beyond it is granted while the tunnel's total stays within max.
// live counts the spans yamux holds, which is the number of streams it
// knows: the stream slots of the tunnel.
type budget struct {
	max  int64
	used atomic.Int64
	live atomic.Int64
}

func newBudget(max int64) *budget {
	if max <= 0 {
		max = DefaultTunnelBudget
	}
	return &budget{max: max}
}

// span is the yamux MemoryManager factory.
func (b *budget) span() (yamux.MemoryManager, error) {
	b.live.Add(1)
	return &span{b: b}, nil
}

// Used reports the bytes of receive window granted to the tunnel's streams.
func (b *budget) Used() int64 { return b.used.Load() }

type span struct {
	b    *budget
	held atomic.Int64
	done atomic.Bool
}

const prioInitial = 255 // yamux's priority for a stream's initial window

func (s *span) ReserveMemory(size int, prio uint8) error {
	n := int64(size)
	if prio < prioInitial {
		for {
			used := s.b.used.Load()
			if used+n > s.b.max {
				return errBudget
			}
			if s.b.used.CompareAndSwap(used, used+n) {
				break
			}
		}
	} else {
		s.b.used.Add(n)
	}
	s.held.Add(n)
	return nil
}

func (s *span) ReleaseMemory(size int) {
	s.held.Add(-int64(size))
	s.b.used.Add(-int64(size))
}

func (s *span) Done() {
	if !s.done.CompareAndSwap(false, true) {
		return
	}
	s.b.used.Add(-s.held.Swap(0))
	s.b.live.Add(-1)
}
