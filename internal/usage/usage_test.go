package usage

import (
	"bytes"
	"flag"
	"strings"
	"testing"
	"time"
)

func testSet() *flag.FlagSet {
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	fs.String("addr", "", "Agent `address`.")
	fs.Duration("grace", 15*time.Second, "How long connections may finish.")
	fs.Bool("json", false, "Log JSON lines.")
	return fs
}

func TestWrite(t *testing.T) {
	t.Parallel()
	var b bytes.Buffer
	err := Write(&b, testSet(), Help{
		Usage:    []string{"t [flags]", "t version"},
		Summary:  "Does things.",
		Groups:   []Group{{Title: "Agent", Flags: []string{"addr"}}, {Title: "Tuning", Flags: []string{"grace", "json"}}},
		Env:      map[string]string{"addr": "T_ADDR"},
		Examples: []Example{{Comment: "Run it:", Command: "t -addr x:1"}},
		Notes:    []string{"A note."},
	})
	if err != nil {
		t.Fatal(err)
	}
	want := `Usage: t [flags]
       t version

  Does things.

Agent:
  -addr <address>              (env T_ADDR)
      Agent address.

Tuning:
  -grace <duration>            (default 15s)
      How long connections may finish.
  -json                        (default false)
      Log JSON lines.

Examples:

  # Run it:
  t -addr x:1

  A note.
`
	if b.String() != want {
		t.Fatalf("got\n%s\nwant\n%s", b.String(), want)
	}
}

// TestWriteRefuses: a flag outside the groups, in two, without usage text,
// or a name the set does not define is an error, and nothing is written.
func TestWriteRefuses(t *testing.T) {
	t.Parallel()
	all := []string{"addr", "grace", "json"}
	for _, tc := range []struct {
		name   string
		groups []Group
		env    map[string]string
		extra  string // a flag defined with no usage text
		want   string
	}{
		{"missing", []Group{{Title: "A", Flags: []string{"addr", "grace"}}}, nil, "", "-json is in no help group"},
		{"twice", []Group{{Title: "A", Flags: all}, {Title: "B", Flags: []string{"json"}}}, nil, "", `-json is in groups "A" and "B"`},
		{"unknown", []Group{{Title: "A", Flags: append(all, "nope")}}, nil, "", `group "A" lists -nope`},
		{"unknown env", []Group{{Title: "A", Flags: all}}, map[string]string{"nope": "X"}, "", "env given for -nope"},
		{"no usage", []Group{{Title: "A", Flags: append(all, "bare")}}, nil, "bare", "-bare has no usage text"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			fs := testSet()
			if tc.extra != "" {
				fs.String(tc.extra, "", "")
			}
			var b bytes.Buffer
			err := Write(&b, fs, Help{Groups: tc.groups, Env: tc.env})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want %q", err, tc.want)
			}
			if b.Len() != 0 {
				t.Fatalf("wrote %q despite the error", b.String())
			}
		})
	}
}

func TestWrap(t *testing.T) {
	t.Parallel()
	got := wrap("aaa bbb ccc "+strings.Repeat("x", 20), "  ", 12)
	if want := "  aaa bbb\n  ccc\n  " + strings.Repeat("x", 20); got != want {
		t.Fatalf("got %q, want %q", got, want)
	}
}
