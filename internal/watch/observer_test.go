package watch

import (
	"context"
	"errors"
	"sync"
	"testing"

	"github.com/hashicorp/go-hclog"
)

type recorder struct {
	mu  sync.Mutex
	got []string
}

func (r *recorder) WatchResult(what string, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := what + ": ok"
	if err != nil {
		s = what + ": " + err.Error()
	}
	r.got = append(r.got, s)
}

// TestLoopReportsToObserver: every outcome reaches the context's observer,
// the cancellation of the context does not, and the end of the loop does.
func TestLoopReportsToObserver(t *testing.T) {
	r := &recorder{}
	ctx, cancel := context.WithCancel(WithObserver(context.Background(), r))
	calls := 0
	Loop(ctx, hclog.NewNullLogger(), "w", Backoff{Min: 1, Max: 1}, func(ctx context.Context, index uint64) (uint64, error) {
		calls++
		switch calls {
		case 1:
			return 0, errors.New("agent down")
		case 2:
			return 5, nil
		}
		cancel()
		return index, ctx.Err()
	})
	want := []string{"w: agent down", "w: ok", "w: " + ErrStopped.Error()}
	if len(r.got) != len(want) {
		t.Fatalf("observed %q, want %q", r.got, want)
	}
	for i := range want {
		if r.got[i] != want[i] {
			t.Fatalf("observed %q, want %q", r.got, want)
		}
	}
	if observerFrom(context.Background()) != nil {
		t.Fatal("observer from a bare context")
	}
}
