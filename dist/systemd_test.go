package dist

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

const (
	unitPath     = "systemd/strait@.service"
	installedBin = "/usr/local/bin/strait"
)

// unit is a parsed unit file: section -> key -> every assignment in order
// (systemd accumulates some keys and resets them on an empty assignment).
type unit map[string]map[string][]string

func parseUnit(t *testing.T, path string) unit {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	u := unit{}
	section := ""
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";"):
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			section = line[1 : len(line)-1]
			if u[section] == nil {
				u[section] = map[string][]string{}
			}
		case strings.HasSuffix(line, `\`):
			t.Fatalf("%s:%d: continuation lines are not supported by this test", path, n)
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok || section == "" {
				t.Fatalf("%s:%d: not a key=value in a section: %q", path, n, line)
			}
			k, v = strings.TrimSpace(k), strings.TrimSpace(v)
			u[section][k] = append(u[section][k], v)
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return u
}

// get is the last assignment of key in section; it fails if there is none.
func (u unit) get(t *testing.T, section, key string) string {
	t.Helper()
	vs := u[section][key]
	if len(vs) == 0 {
		t.Fatalf("[%s] %s= is missing", section, key)
	}
	return vs[len(vs)-1]
}

// span parses a systemd time span such as "30s", "2min", "1min 30s" or a
// bare number of seconds.
func span(t *testing.T, s string) time.Duration {
	t.Helper()
	if n, err := strconv.Atoi(s); err == nil {
		return time.Duration(n) * time.Second
	}
	var total time.Duration
	for _, part := range strings.Fields(s) {
		part = strings.Replace(strings.Replace(part, "min", "m", 1), "sec", "s", 1)
		d, err := time.ParseDuration(part)
		if err != nil {
			t.Fatalf("time span %q: %v", s, err)
		}
		total += d
	}
	return total
}

// defaultShutdownGrace reads the -shutdown-grace default from cmd/strait, so
// that raising it without raising TimeoutStopSec fails here.
func defaultShutdownGrace(t *testing.T) time.Duration {
	t.Helper()
	src, err := os.ReadFile("../cmd/strait/flags.go")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`"shutdown-grace",\s*(\d+)\s*\*\s*time\.(Second|Minute)`).FindSubmatch(src)
	if m == nil {
		t.Fatal(`cannot find the -shutdown-grace default in cmd/strait/flags.go (expected "shutdown-grace", N*time.Second)`)
	}
	n, _ := strconv.Atoi(string(m[1]))
	if string(m[2]) == "Minute" {
		return time.Duration(n) * time.Minute
	}
	return time.Duration(n) * time.Second
}

func TestUnitSettings(t *testing.T) {
	t.Parallel()
	u := parseUnit(t, unitPath)
	want := func(section, key, value string) {
		t.Helper()
		if got := u.get(t, section, key); got != value {
			t.Errorf("[%s] %s=%s, want %s", section, key, got, value)
		}
	}

	want("Service", "Type", "notify")
	want("Service", "NotifyAccess", "main")
	want("Service", "EnvironmentFile", "/etc/strait/%i.env")
	if got, wantExec := u.get(t, "Service", "ExecStart"), installedBin+" -sidecar-for %i $STRAIT_OPTS"; got != wantExec {
		t.Errorf("ExecStart=%s, want %s", got, wantExec)
	}
	if got := u.get(t, "Service", "ExecReload"); !strings.Contains(got, "-HUP $MAINPID") {
		t.Errorf("ExecReload=%s: want a SIGHUP to $MAINPID (strait re-reads its token file and sends RELOADING=1/READY=1)", got)
	}

	// Hardening.
	for _, kv := range [][2]string{
		{"DynamicUser", "yes"}, {"NoNewPrivileges", "yes"}, {"ProtectSystem", "strict"},
		{"ProtectHome", "yes"}, {"PrivateTmp", "yes"}, {"Restart", "on-failure"}, {"KillMode", "mixed"},
	} {
		want("Service", kv[0], kv[1])
	}
	// An empty CapabilityBoundingSet= resets it to nothing; any non-empty
	// assignment would add capabilities back.
	for _, key := range []string{"CapabilityBoundingSet", "AmbientCapabilities"} {
		vs := u["Service"][key]
		if key == "CapabilityBoundingSet" && len(vs) == 0 {
			t.Errorf("CapabilityBoundingSet= is missing: the service would keep every capability")
		}
		for _, v := range vs {
			if v != "" {
				t.Errorf("%s=%s: strait needs no capabilities (see the comment on CAP_NET_BIND_SERVICE)", key, v)
			}
		}
	}
	raw, err := os.ReadFile(unitPath)
	if err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`(?m)^#.*CapabilityBoundingSet=CAP_NET_BIND_SERVICE`).Match(raw) {
		t.Errorf("the unit must explain how to allow ports below 1024 (CAP_NET_BIND_SERVICE)")
	}

	if n, err := strconv.ParseUint(strings.SplitN(u.get(t, "Service", "LimitNOFILE"), ":", 2)[0], 10, 64); err != nil || n < 65536 {
		t.Errorf("LimitNOFILE=%s: want at least 65536", u.get(t, "Service", "LimitNOFILE"))
	}

	grace := defaultShutdownGrace(t)
	if stop := span(t, u.get(t, "Service", "TimeoutStopSec")); stop <= grace {
		t.Errorf("TimeoutStopSec=%v does not exceed the default -shutdown-grace %v: systemd would SIGKILL a draining strait", stop, grace)
	}
	if wd := span(t, u.get(t, "Service", "WatchdogSec")); wd < 2*time.Second {
		t.Errorf("WatchdogSec=%v: want a watchdog of at least a few seconds", wd)
	}

	if got := u.get(t, "Install", "WantedBy"); got != "multi-user.target" {
		t.Errorf("WantedBy=%s", got)
	}
}

// TestUnitVerifies runs systemd-analyze verify on the unit, instantiated as
// strait@web.service. verify requires every Exec binary to exist, so the
// test verifies a copy whose ExecStart names an executable that exists here
// (this test binary; systemd-analyze only checks that it is executable).
// Warnings (an unknown or misspelt key, a bad value) fail the test, not
// only errors.
func TestUnitVerifies(t *testing.T) {
	t.Parallel()
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Fatalf("systemd-analyze not found (%v): the unit cannot be verified. Install it: "+
			"apt-get install -y --no-install-recommends systemd (Debian; .ci/run does this)", err)
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	src, err := os.ReadFile(unitPath)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(src), "ExecStart="+installedBin+" ") {
		t.Fatalf("ExecStart does not run %s", installedBin)
	}
	dir := t.TempDir()
	tmpl := filepath.Join(dir, "strait@.service")
	rewritten := strings.ReplaceAll(string(src), "ExecStart="+installedBin+" ", "ExecStart="+self+" ")
	if err := os.WriteFile(tmpl, []byte(rewritten), 0o644); err != nil {
		t.Fatal(err)
	}

	cmd := exec.Command(analyze, "verify", "--man=no", tmpl+":strait@web.service")
	cmd.Env = append(os.Environ(), "SYSTEMD_LOG_COLOR=0", "SYSTEMD_PAGER=")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
	if s := strings.TrimSpace(string(out)); s != "" {
		t.Fatalf("systemd-analyze verify printed warnings:\n%s", s)
	}
}

// TestDocsShowTheInstall keeps docs/systemd.md in step with the unit.
func TestDocsShowTheInstall(t *testing.T) {
	t.Parallel()
	doc, err := os.ReadFile("../docs/systemd.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{
		"dist/systemd/strait@.service", installedBin, "/etc/strait/", "CONSUL_HTTP_ADDR=",
		"CONSUL_HTTP_TOKEN_FILE=", "STRAIT_OPTS=", "systemctl enable --now strait@", "systemctl reload strait@",
	} {
		if !strings.Contains(string(doc), s) {
			t.Errorf("docs/systemd.md does not mention %q", s)
		}
	}
}
