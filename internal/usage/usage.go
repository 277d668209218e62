// Package usage renders a command's -h text from its flag.FlagSet: flags in
// named groups, each with its default, its environment variable and its
// meaning, followed by examples. Every flag of the set must be in exactly one
// group, so a flag added without a place in the help is an error, not a
// silent omission.
package usage

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
)

// Group is a titled list of flag names, shown in the order given.
type Group struct {
	Title string
	Flags []string
}

// Example is a command line with a one-line comment.
type Example struct {
	Comment string
	Command string
}

// Help describes a command's usage text.
type Help struct {
	// Usage is the synopsis lines, e.g. "strait [flags]".
	Usage []string
	// Summary is a short paragraph on what the command does.
	Summary string
	Groups  []Group
	// Env names the environment variable a flag falls back to, by flag
	// name.
	Env      map[string]string
	Examples []Example
	// Notes are paragraphs printed after the examples.
	Notes []string
}

// Write renders h for fs to w. It fails, writing nothing, when a flag of fs
// is in no group, in two, has no usage text, or when a group or Env names a
// flag fs does not define.
func Write(w io.Writer, fs *flag.FlagSet, h Help) error {
	if err := h.check(fs); err != nil {
		return err
	}
	var b strings.Builder
	for i, u := range h.Usage {
		if i == 0 {
			fmt.Fprintf(&b, "Usage: %s\n", u)
		} else {
			fmt.Fprintf(&b, "       %s\n", u)
		}
	}
	if h.Summary != "" {
		fmt.Fprintf(&b, "\n%s\n", wrap(h.Summary, "  ", 80))
	}
	for _, g := range h.Groups {
		fmt.Fprintf(&b, "\n%s:\n", g.Title)
		for _, name := range g.Flags {
			writeFlag(&b, fs.Lookup(name), h.Env[name])
		}
	}
	if len(h.Examples) > 0 {
		b.WriteString("\nExamples:\n")
		for _, e := range h.Examples {
			fmt.Fprintf(&b, "\n  # %s\n  %s\n", e.Comment, e.Command)
		}
	}
	for _, n := range h.Notes {
		fmt.Fprintf(&b, "\n%s\n", wrap(n, "  ", 80))
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// writeFlag writes one entry:
//
//	-name <value>   (default X; env VAR)
//	    Meaning.
func writeFlag(b *strings.Builder, f *flag.Flag, env string) {
	name, meaning := flag.UnquoteUsage(f)
	head := "  -" + f.Name
	if name != "" {
		head += " <" + strings.ToLower(name) + ">"
	}
	var attrs []string
	if f.DefValue != "" { // an empty default is no default
		attrs = append(attrs, "default "+f.DefValue)
	}
	if env != "" {
		attrs = append(attrs, "env "+env)
	}
	if len(attrs) > 0 {
		head = fmt.Sprintf("%-30s (%s)", head, strings.Join(attrs, "; "))
	}
	fmt.Fprintf(b, "%s\n%s\n", head, wrap(meaning, "      ", 80))
}

func (h Help) check(fs *flag.FlagSet) error {
	var errs []string
	seen := map[string]string{}
	for _, g := range h.Groups {
		for _, name := range g.Flags {
			if fs.Lookup(name) == nil {
				errs = append(errs, fmt.Sprintf("group %q lists -%s, which is not defined", g.Title, name))
			} else if prev, dup := seen[name]; dup {
				errs = append(errs, fmt.Sprintf("-%s is in groups %q and %q", name, prev, g.Title))
			}
			seen[name] = g.Title
		}
	}
	for name := range h.Env {
		if fs.Lookup(name) == nil {
			errs = append(errs, fmt.Sprintf("env given for -%s, which is not defined", name))
		}
	}
	fs.VisitAll(func(f *flag.Flag) {
		if _, ok := seen[f.Name]; !ok {
			errs = append(errs, fmt.Sprintf("-%s is in no help group", f.Name))
		}
		if strings.TrimSpace(f.Usage) == "" {
			errs = append(errs, fmt.Sprintf("-%s has no usage text", f.Name))
		}
	})
	if len(errs) > 0 {
		return errors.New(strings.Join(errs, "; "))
	}
	return nil
}

// wrap fills s into lines of at most width columns (a longer word gets a
// line of its own), each starting with prefix.
func wrap(s, prefix string, width int) string {
	var lines []string
	line := prefix
	for _, word := range strings.Fields(s) {
		if line != prefix && len(line)+1+len(word) > width {
			lines = append(lines, line)
			line = prefix
		}
		if line != prefix {
			line += " "
		}
		line += word
	}
	return strings.Join(append(lines, line), "\n")
}
