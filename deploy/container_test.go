package deploy

import (
	"bufio"
	"debug/elf"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

const (
	module      = "github.com/straitproxy/strait"
	distroless  = "gcr.io/distroless/static-debian12:nonroot"
	imageBinary = "/strait"
	waitLimit   = 60 * time.Second // only bounds a failing test
)

// buildFlags are the Dockerfile's; TestDockerfile checks it still uses them.
var buildFlags = []string{"-trimpath", "-ldflags", "-s -w"}

type instruction struct {
	cmd, args string
	line      int
}

// dockerfile reads the Dockerfile's instructions, continuation lines joined.
func dockerfile(t *testing.T) []instruction {
	t.Helper()
	raw, err := os.ReadFile("../Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	var out []instruction
	var cur strings.Builder
	start := 0
	for i, line := range strings.Split(string(raw), "\n") {
		trimmed := strings.TrimSpace(line)
		if cur.Len() == 0 && (trimmed == "" || strings.HasPrefix(trimmed, "#")) {
			continue
		}
		if cur.Len() == 0 {
			start = i + 1
		}
		if s, ok := strings.CutSuffix(trimmed, `\`); ok {
			cur.WriteString(s + " ")
			continue
		}
		cur.WriteString(trimmed)
		cmd, args, _ := strings.Cut(cur.String(), " ")
		out = append(out, instruction{strings.ToUpper(cmd), strings.Join(strings.Fields(args), " "), start})
		cur.Reset()
	}
	return out
}

func goLine(t *testing.T) string {
	t.Helper()
	raw, err := os.ReadFile("../go.mod")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^go (\d+\.\d+)`).FindSubmatch(raw)
	if m == nil {
		t.Fatal("no go line in go.mod")
	}
	return string(m[1])
}

func TestDockerfile(t *testing.T) {
	t.Parallel()
	ins := dockerfile(t)
	var froms []instruction
	for _, in := range ins {
		if in.cmd == "FROM" {
			froms = append(froms, in)
		}
	}
	if len(froms) < 2 {
		t.Fatalf("want a multi-stage build, got %d FROM", len(froms))
	}
	builder := froms[0].args
	image := regexp.MustCompile(`(?:--platform=\S+ )?(\S+) AS (\S+)`).FindStringSubmatch(builder)
	if image == nil {
		t.Fatalf("line %d: builder stage %q is not `FROM <image> AS <name>`", froms[0].line, builder)
	}
	goVersion := goLine(t)
	if !regexp.MustCompile(`^golang:` + regexp.QuoteMeta(goVersion) + `(\.\d+)?(-\w+)?$`).MatchString(image[1]) {
		t.Errorf("builder image %s: want a pinned golang:%s tag (go.mod's go line)", image[1], goVersion)
	}
	stage := image[2]

	final := froms[len(froms)-1]
	if final.args != distroless {
		t.Errorf("final stage FROM %s, want %s", final.args, distroless)
	}
	var build, copied, user, entrypoint string
	for _, in := range ins {
		switch {
		case in.cmd == "RUN" && strings.Contains(in.args, "go build"):
			build = in.args
		case in.cmd == "COPY" && in.line > final.line && strings.HasPrefix(in.args, "--from="+stage+" "):
			copied = in.args
		case in.cmd == "USER" && in.line > final.line:
			user = in.args
		case in.cmd == "ENTRYPOINT":
			entrypoint = in.args
		}
	}
	for _, want := range []string{"CGO_ENABLED=0", "-trimpath", `-ldflags "-s -w`, "./cmd/strait"} {
		if !strings.Contains(build, want) {
			t.Errorf("the go build step %q lacks %s", build, want)
		}
	}
	out := regexp.MustCompile(`-o (\S+)`).FindStringSubmatch(build)
	if out == nil || copied != "--from="+stage+" "+out[1]+" "+imageBinary {
		t.Errorf("the final stage must COPY --from=%s <go build -o> %s, got %q (build %q)", stage, imageBinary, copied, build)
	}
	if user != "nonroot" && user != "nonroot:nonroot" && user != "65532" && user != "65532:65532" {
		t.Errorf("final stage USER %q, want nonroot", user)
	}
	// The exec form: strait is PID 1 and receives SIGTERM itself.
	if entrypoint != `["`+imageBinary+`"]` {
		t.Errorf(`ENTRYPOINT %s, want ["%s"]`, entrypoint, imageBinary)
	}
	for _, in := range froms {
		if strings.Contains(in.args, ":latest") {
			t.Errorf("line %d: FROM %s: pin a tag", in.line, in.args)
		}
	}
}

// TestDockerignore: the build context leaves out what the image does not
// need (bin/ holds a Consul binary of some 150 MB) but never a file that
// cmd/strait is built from.
func TestDockerignore(t *testing.T) {
	t.Parallel()
	raw, err := os.ReadFile("../.dockerignore")
	if err != nil {
		t.Fatal(err)
	}
	var patterns []*regexp.Regexp
	var texts []string
	for _, line := range strings.Split(string(raw), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if strings.HasPrefix(line, "!") {
			t.Fatalf(".dockerignore exception %q: this test does not model exceptions; extend it", line)
		}
		patterns = append(patterns, dockerignorePattern(path.Clean(strings.TrimPrefix(line, "/"))))
		texts = append(texts, line)
	}
	excluded := func(p string) string {
		// A pattern that matches a parent directory excludes its contents.
		for dir := p; dir != "." && dir != "/"; dir = path.Dir(dir) {
			for i, re := range patterns {
				if re.MatchString(dir) {
					return texts[i]
				}
			}
		}
		return ""
	}
	for _, must := range []string{".git", "bin/consul", "bin/strait", "integration/go.mod"} {
		if excluded(must) == "" {
			t.Errorf("%s is sent to the image build; exclude it", must)
		}
	}

	needed := []string{"go.mod", "go.sum"}
	cmd := exec.Command("go", "list", "-deps", "-json", "./cmd/strait")
	cmd.Dir = ".."
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	dec := json.NewDecoder(strings.NewReader(string(out)))
	for {
		var p struct {
			ImportPath                                            string
			Dir                                                   string
			GoFiles, IgnoredGoFiles, EmbedFiles, SFiles, CgoFiles []string
		}
		if err := dec.Decode(&p); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			t.Fatal(err)
		}
		if p.ImportPath != module && !strings.HasPrefix(p.ImportPath, module+"/") {
			continue
		}
		rel, err := filepath.Rel(root, p.Dir)
		if err != nil {
			t.Fatal(err)
		}
		for _, files := range [][]string{p.GoFiles, p.IgnoredGoFiles, p.EmbedFiles, p.SFiles, p.CgoFiles} {
			for _, f := range files {
				needed = append(needed, filepath.ToSlash(filepath.Join(rel, f)))
			}
		}
	}
	if len(needed) < 10 {
		t.Fatalf("go list found only %v", needed)
	}
	for _, f := range needed {
		if p := excluded(f); p != "" {
			t.Errorf(".dockerignore %q excludes %s, which cmd/strait is built from", p, f)
		}
	}
}

// dockerignorePattern translates a .dockerignore pattern (Go's
// filepath.Match syntax plus **, anchored at the context root) to a regexp.
func dockerignorePattern(p string) *regexp.Regexp {
	var b strings.Builder
	b.WriteString("^")
	for i := 0; i < len(p); i++ {
		switch c := p[i]; {
		case strings.HasPrefix(p[i:], "**/"):
			b.WriteString("(?:.*/)?")
			i += 2
		case strings.HasPrefix(p[i:], "**"):
			b.WriteString(".*")
			i++
		case c == '*':
			b.WriteString("[^/]*")
		case c == '?':
			b.WriteString("[^/]")
		default:
			b.WriteString(regexp.QuoteMeta(string(c)))
		}
	}
	b.WriteString("$")
	return regexp.MustCompile(b.String())
}

// TestStaticBinaryRunsInEmptyRoot stands in for running the image, which
// needs a container engine this machine does not have: it builds strait as
// the Dockerfile does, checks that the ELF file asks for no dynamic loader
// and no shared library, and runs it chrooted into a directory that holds
// nothing but the binary (no libc, no /etc, no /dev, no /proc: less than
// distroless gives it). There it prints its version, rejects bad flags,
// talks to a (fake) Consul agent over loopback, and drains and exits 0 on
// SIGTERM.
func TestStaticBinaryRunsInEmptyRoot(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	bin := filepath.Join(root, imageBinary)
	build := exec.Command("go", append(append([]string{"build"}, buildFlags...), "-o", bin, "./cmd/strait")...)
	build.Dir = ".."
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}

	f, err := elf.Open(bin)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Errorf("the binary has a PT_INTERP program header: it needs a dynamic loader the image does not have")
		}
	}
	if libs, err := f.ImportedLibraries(); err != nil || len(libs) > 0 {
		t.Errorf("the binary needs shared libraries %v (%v)", libs, err)
	}
	f.Close()

	t.Run("version", func(t *testing.T) {
		t.Parallel()
		out, code := runChrooted(t, root, "version")
		if code != 0 || !strings.HasPrefix(out, "strait ") {
			t.Fatalf("strait version in an empty root: exit %d, output %q", code, out)
		}
	})
	t.Run("usage error", func(t *testing.T) {
		t.Parallel()
		out, code := runChrooted(t, root, "-log-level", "loud", "-service", "web")
		if code != 2 || !strings.Contains(out, "-log-level") {
			t.Fatalf("invalid flag in an empty root: exit %d, output %q", code, out)
		}
	})
	t.Run("agent and SIGTERM", func(t *testing.T) {
		t.Parallel()
		asked := make(chan string, 16)
		agent := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			select {
			case asked <- r.URL.Path:
			default:
			}
			w.Header().Set("Content-Type", "application/json")
			io.WriteString(w, "{}") // no services registered
		}))
		defer agent.Close()

		cmd := chrooted(root, "-sidecar-for", "web", "-http-addr", agent.Listener.Addr().String())
		stderr, err := cmd.StderrPipe()
		if err != nil {
			t.Fatal(err)
		}
		startChrooted(t, cmd)
		lines := make(chan string, 64)
		go func() {
			defer close(lines)
			sc := bufio.NewScanner(stderr)
			for sc.Scan() {
				lines <- sc.Text()
			}
		}()
		waitForLine(t, lines, "no sidecar proxy registered for service")
		if p := <-asked; p != "/v1/agent/services" {
			t.Fatalf("strait asked the agent for %s", p)
		}
		if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		waitForLine(t, lines, "stopped")
		for range lines {
		}
		if err := cmd.Wait(); err != nil {
			t.Fatalf("strait after SIGTERM: %v (want exit 0)", err)
		}
	})
}

// chrooted is a command that runs the binary in root with an empty
// environment. As root it chroots directly; otherwise it does so inside a
// new user namespace (as `unshare -r chroot` would).
func chrooted(root string, args ...string) *exec.Cmd {
	// Not exec.Command: it would look the path up here, outside root.
	cmd := &exec.Cmd{Path: imageBinary, Args: append([]string{imageBinary}, args...)}
	cmd.Dir = "/"
	cmd.Env = []string{}
	attr := &syscall.SysProcAttr{Chroot: root}
	if os.Geteuid() != 0 {
		attr.Cloneflags = syscall.CLONE_NEWUSER
		attr.UidMappings = []syscall.SysProcIDMap{{ContainerID: 0, HostID: os.Geteuid(), Size: 1}}
		attr.GidMappings = []syscall.SysProcIDMap{{ContainerID: 0, HostID: os.Getegid(), Size: 1}}
	}
	cmd.SysProcAttr = attr
	return cmd
}

func startChrooted(t *testing.T, cmd *exec.Cmd) {
	t.Helper()
	if err := cmd.Start(); err != nil {
		how := "chroot as root"
		if os.Geteuid() != 0 {
			how = "chroot inside an unprivileged user namespace (CLONE_NEWUSER)"
		}
		t.Fatalf("cannot run strait in an empty root: %s failed: %v.\n"+
			"This test stands in for running the distroless image and does not skip: run it as root, or where "+
			"unprivileged user namespaces are allowed (sysctl kernel.unprivileged_userns_clone=1, "+
			"user.max_user_namespaces > 0)", how, err)
	}
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
}

// runChrooted runs strait to completion and returns its combined output and
// exit status.
func runChrooted(t *testing.T, root string, args ...string) (string, int) {
	t.Helper()
	cmd := chrooted(root, args...)
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	startChrooted(t, cmd)
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	timer := time.NewTimer(waitLimit)
	defer timer.Stop()
	select {
	case err := <-done:
		var exit *exec.ExitError
		if err != nil && !errors.As(err, &exit) {
			t.Fatalf("strait %q: %v", args, err)
		}
		return out.String(), cmd.ProcessState.ExitCode()
	case <-timer.C:
		cmd.Process.Kill()
		<-done
		t.Fatalf("strait %q did not exit within %v; output so far:\n%s", args, waitLimit, out.String())
		return "", 0
	}
}

func waitForLine(t *testing.T, lines <-chan string, want string) {
	t.Helper()
	timer := time.NewTimer(waitLimit)
	defer timer.Stop()
	var seen []string
	for {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("strait's output ended before %q:\n%s", want, strings.Join(seen, "\n"))
			}
			seen = append(seen, l)
			if strings.Contains(l, want) {
				return
			}
		case <-timer.C:
			t.Fatalf("no %q from strait within %v:\n%s", want, waitLimit, strings.Join(seen, "\n"))
		}
	}
}
