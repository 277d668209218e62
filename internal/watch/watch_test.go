package watch

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
)

// TestLoopResyncsAfterError: after a failure the next query is
// non-blocking (index 0), because the agent may have come back with lower
// indexes; a blocking query on an index it has not reached would hang.
func TestLoopResyncsAfterError(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var seen []uint64
	calls := 0
	done := make(chan struct{})
	go func() {
		defer close(done)
		Loop(ctx, hclog.NewNullLogger(), "test", Backoff{Min: time.Millisecond, Max: time.Millisecond}, func(_ context.Context, index uint64) (uint64, error) {
			seen = append(seen, index)
			calls++
			switch calls {
			case 1:
				return 40, nil // first answer: index 40
			case 2:
				return 40, errors.New("agent gone")
			case 3:
				return 7, nil // the restarted agent is at 7
			default:
				cancel()
				return index, nil
			}
		})
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Loop did not finish")
	}
	want := []uint64{0, 40, 0, 7}
	if len(seen) != len(want) {
		t.Fatalf("indexes %v, want %v", seen, want)
	}
	for i := range want {
		if seen[i] != want[i] {
			t.Fatalf("indexes %v, want %v", seen, want)
		}
	}
}
