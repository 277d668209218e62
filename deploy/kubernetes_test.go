package deploy

import (
	"bytes"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"sigs.k8s.io/yaml"
)

// The parts of the Kubernetes API these manifests use, decoded the way
// Kubernetes decodes them (YAML to JSON, then the API's JSON field names).

type object struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name string `json:"name"`
	} `json:"metadata"`
}

type deployment struct {
	object
	Spec struct {
		Template struct {
			Spec podSpec `json:"spec"`
		} `json:"template"`
	} `json:"spec"`
}

type serviceAccount struct {
	object
	AutomountServiceAccountToken *bool `json:"automountServiceAccountToken"`
}

type podSpec struct {
	ServiceAccountName            string              `json:"serviceAccountName"`
	AutomountServiceAccountToken  *bool               `json:"automountServiceAccountToken"`
	TerminationGracePeriodSeconds *int64              `json:"terminationGracePeriodSeconds"`
	SecurityContext               *podSecurityContext `json:"securityContext"`
	Volumes                       []volume            `json:"volumes"`
	InitContainers                []container         `json:"initContainers"`
	Containers                    []container         `json:"containers"`
}

type podSecurityContext struct {
	RunAsNonRoot *bool  `json:"runAsNonRoot"`
	RunAsUser    *int64 `json:"runAsUser"`
}

type volume struct {
	Name      string `json:"name"`
	Projected *struct {
		Sources []struct {
			ServiceAccountToken *struct {
				Path              string `json:"path"`
				ExpirationSeconds int64  `json:"expirationSeconds"`
			} `json:"serviceAccountToken"`
		} `json:"sources"`
	} `json:"projected"`
	EmptyDir *struct {
		Medium string `json:"medium"`
	} `json:"emptyDir"`
}

type container struct {
	Name          string   `json:"name"`
	Image         string   `json:"image"`
	Command       []string `json:"command"`
	Args          []string `json:"args"`
	RestartPolicy string   `json:"restartPolicy"`
	Env           []envVar `json:"env"`
	Ports         []struct {
		Name          string `json:"name"`
		ContainerPort int    `json:"containerPort"`
	} `json:"ports"`
	VolumeMounts []struct {
		Name      string `json:"name"`
		MountPath string `json:"mountPath"`
		ReadOnly  bool   `json:"readOnly"`
	} `json:"volumeMounts"`
	ReadinessProbe *probe `json:"readinessProbe"`
	LivenessProbe  *probe `json:"livenessProbe"`
	Lifecycle      *struct {
		PreStop *struct {
			Exec  json.RawMessage `json:"exec"`
			Sleep *struct {
				Seconds int64 `json:"seconds"`
			} `json:"sleep"`
			HTTPGet json.RawMessage `json:"httpGet"`
		} `json:"preStop"`
	} `json:"lifecycle"`
	Resources struct {
		Requests map[string]string `json:"requests"`
		Limits   map[string]string `json:"limits"`
	} `json:"resources"`
	SecurityContext *struct {
		RunAsNonRoot             *bool `json:"runAsNonRoot"`
		ReadOnlyRootFilesystem   *bool `json:"readOnlyRootFilesystem"`
		AllowPrivilegeEscalation *bool `json:"allowPrivilegeEscalation"`
		Privileged               *bool `json:"privileged"`
		Capabilities             *struct {
			Add  []string `json:"add"`
			Drop []string `json:"drop"`
		} `json:"capabilities"`
	} `json:"securityContext"`
}

type envVar struct {
	Name      string `json:"name"`
	Value     string `json:"value"`
	ValueFrom *struct {
		FieldRef *struct {
			FieldPath string `json:"fieldPath"`
		} `json:"fieldRef"`
		ResourceFieldRef json.RawMessage `json:"resourceFieldRef"`
		SecretKeyRef     json.RawMessage `json:"secretKeyRef"`
		ConfigMapKeyRef  json.RawMessage `json:"configMapKeyRef"`
	} `json:"valueFrom"`
}

type probe struct {
	HTTPGet *struct {
		Path string `json:"path"`
		// An int or the name of a container port.
		Port json.RawMessage `json:"port"`
	} `json:"httpGet"`
	PeriodSeconds int `json:"periodSeconds"`
}

type manifests struct {
	deployment      deployment
	serviceAccounts map[string]serviceAccount
}

func loadManifests(t *testing.T) manifests {
	t.Helper()
	files, err := filepath.Glob("kubernetes/*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no manifests in deploy/kubernetes (%v)", err)
	}
	m := manifests{serviceAccounts: map[string]serviceAccount{}}
	deployments := 0
	for _, f := range files {
		raw, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(raw, []byte("\n---")) {
			t.Fatalf("%s: one object per file, please (this test reads a single document)", f)
		}
		var obj object
		if err := yaml.Unmarshal(raw, &obj); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		if obj.APIVersion == "" || obj.Kind == "" || obj.Metadata.Name == "" {
			t.Fatalf("%s: apiVersion, kind and metadata.name are required: %+v", f, obj)
		}
		switch obj.Kind {
		case "Deployment":
			deployments++
			if err := yaml.Unmarshal(raw, &m.deployment); err != nil {
				t.Fatalf("%s: %v", f, err)
			}
		case "ServiceAccount":
			var sa serviceAccount
			if err := yaml.Unmarshal(raw, &sa); err != nil {
				t.Fatalf("%s: %v", f, err)
			}
			m.serviceAccounts[sa.Metadata.Name] = sa
		}
	}
	if deployments != 1 {
		t.Fatalf("%d Deployments in deploy/kubernetes, want 1", deployments)
	}
	return m
}

func (p *podSpec) container(t *testing.T, name string) *container {
	t.Helper()
	for _, cs := range [][]container{p.Containers, p.InitContainers} {
		for i := range cs {
			if cs[i].Name == name {
				return &cs[i]
			}
		}
	}
	t.Fatalf("no container %q in the pod", name)
	return nil
}

func (c *container) env(name string) (envVar, int) {
	for i, e := range c.Env {
		if e.Name == name {
			return e, i
		}
	}
	return envVar{}, -1
}

// flag returns the value of -name in args, in the -name=value or -name value
// form, and whether it is there.
func flag(args []string, name string) (string, bool) {
	for i, a := range args {
		if !strings.HasPrefix(a, "-") {
			continue
		}
		a = strings.TrimLeft(a, "-")
		if v, ok := strings.CutPrefix(a, name+"="); ok {
			return v, true
		}
		if a == name && i+1 < len(args) {
			return args[i+1], true
		}
	}
	return "", false
}

// port resolves a probe's port (a number or a container port's name).
func (c *container) port(t *testing.T, raw json.RawMessage) int {
	t.Helper()
	var n int
	if err := json.Unmarshal(raw, &n); err == nil {
		return n
	}
	var name string
	if err := json.Unmarshal(raw, &name); err != nil {
		t.Fatalf("probe port %s: %v", raw, err)
	}
	for _, p := range c.Ports {
		if p.Name == name {
			return p.ContainerPort
		}
	}
	t.Fatalf("probe port %q names no port of container %s", name, c.Name)
	return 0
}

func TestKubernetesProbesUseTheAdminEndpoint(t *testing.T) {
	t.Parallel()
	m := loadManifests(t)
	strait := m.deployment.Spec.Template.Spec.container(t, "strait")

	bind, ok := flag(strait.Args, "admin-bind")
	if !ok {
		t.Fatalf("strait args %q: no -admin-bind; the default (127.0.0.1) is unreachable for the kubelet's probes", strait.Args)
	}
	host, portStr, err := net.SplitHostPort(bind)
	if err != nil {
		t.Fatalf("-admin-bind %q: %v", bind, err)
	}
	if ip := net.ParseIP(host); host != "" && ip != nil && ip.IsLoopback() {
		t.Fatalf("-admin-bind %q is loopback: the kubelet probes the pod IP", bind)
	}
	adminPort, _ := strconv.Atoi(portStr)
	if adminPort != 19100 {
		t.Errorf("-admin-bind port %d, want 19100 (the documented admin port)", adminPort)
	}

	for _, p := range []struct {
		what  string
		probe *probe
		path  string
	}{
		{"readinessProbe", strait.ReadinessProbe, "/ready"},
		{"livenessProbe", strait.LivenessProbe, "/live"},
	} {
		if p.probe == nil || p.probe.HTTPGet == nil {
			t.Errorf("strait has no HTTP %s", p.what)
			continue
		}
		if p.probe.HTTPGet.Path != p.path {
			t.Errorf("%s path %q, want %q", p.what, p.probe.HTTPGet.Path, p.path)
		}
		if got := strait.port(t, p.probe.HTTPGet.Port); got != adminPort {
			t.Errorf("%s port %d, want the admin port %d", p.what, got, adminPort)
		}
	}
}

func TestKubernetesConsulEnvironment(t *testing.T) {
	t.Parallel()
	m := loadManifests(t)
	pod := &m.deployment.Spec.Template.Spec
	strait := pod.container(t, "strait")

	if _, ok := flag(strait.Args, "sidecar-for"); !ok {
		if _, ok := flag(strait.Args, "proxy-id"); !ok {
			t.Errorf("strait args %q: no -sidecar-for or -proxy-id (agent mode)", strait.Args)
		}
	}

	hostIP, hostIdx := strait.env("HOST_IP")
	if hostIdx < 0 || hostIP.ValueFrom == nil || hostIP.ValueFrom.FieldRef == nil || hostIP.ValueFrom.FieldRef.FieldPath != "status.hostIP" {
		t.Fatalf("HOST_IP must come from the downward API (fieldRef status.hostIP): %+v", hostIP)
	}
	addr, addrIdx := strait.env("CONSUL_HTTP_ADDR")
	if addr.Value != "http://$(HOST_IP):8500" && addr.Value != "https://$(HOST_IP):8501" {
		t.Errorf("CONSUL_HTTP_ADDR=%q, want the node's agent: http://$(HOST_IP):8500", addr.Value)
	}
	if addrIdx < hostIdx {
		t.Errorf("CONSUL_HTTP_ADDR is defined before HOST_IP: Kubernetes would leave $(HOST_IP) unexpanded")
	}

	// The ACL token: a file on a memory volume that the login init
	// container writes and strait reads.
	tokenFile, _ := strait.env("CONSUL_HTTP_TOKEN_FILE")
	if tokenFile.Value == "" {
		t.Fatal("strait has no CONSUL_HTTP_TOKEN_FILE")
	}
	var tokenVol string
	for _, vm := range strait.VolumeMounts {
		if strings.HasPrefix(tokenFile.Value, vm.MountPath+"/") {
			tokenVol = vm.Name
			if !vm.ReadOnly {
				t.Errorf("strait mounts %s read-write; it only reads the token", vm.Name)
			}
		}
	}
	if tokenVol == "" {
		t.Fatalf("CONSUL_HTTP_TOKEN_FILE=%s is on no volume mounted into strait", tokenFile.Value)
	}
	for _, v := range pod.Volumes {
		if v.Name == tokenVol && (v.EmptyDir == nil || v.EmptyDir.Medium != "Memory") {
			t.Errorf("volume %s holds the ACL token: want an emptyDir with medium Memory", v.Name)
		}
	}
	login := pod.container(t, "consul-login")
	script := strings.Join(append(slices.Clone(login.Command), login.Args...), " ")
	if !strings.Contains(script, "consul login") || !strings.Contains(script, "-token-sink-file="+tokenFile.Value) {
		t.Errorf("consul-login does not write the token strait reads (%s)", tokenFile.Value)
	}

	// The service-account token is projected into the login container and
	// nowhere else; no default token is mounted.
	if a := pod.AutomountServiceAccountToken; a == nil || *a {
		t.Error("the pod must set automountServiceAccountToken: false")
	}
	if _, ok := m.serviceAccounts[pod.ServiceAccountName]; !ok {
		t.Errorf("serviceAccountName %q has no ServiceAccount manifest", pod.ServiceAccountName)
	}
	var saVol string
	for _, v := range pod.Volumes {
		if v.Projected == nil {
			continue
		}
		for _, s := range v.Projected.Sources {
			if s.ServiceAccountToken != nil {
				saVol = v.Name
				if s.ServiceAccountToken.ExpirationSeconds < 600 {
					t.Errorf("projected token expirationSeconds %d: Kubernetes requires at least 600", s.ServiceAccountToken.ExpirationSeconds)
				}
			}
		}
	}
	if saVol == "" {
		t.Fatal("no projected serviceAccountToken volume")
	}
	for _, c := range append(slices.Clone(pod.InitContainers), pod.Containers...) {
		for _, vm := range c.VolumeMounts {
			if vm.Name == saVol && c.Name != login.Name {
				t.Errorf("container %s mounts the service-account token; only %s needs it", c.Name, login.Name)
			}
			if vm.Name == saVol && !strings.Contains(script, "-bearer-token-file="+vm.MountPath+"/") {
				t.Errorf("consul login does not read the projected token at %s", vm.MountPath)
			}
		}
	}

	// The registration the login container makes must match strait's ports.
	for _, path := range []string{"/ready", "/live"} {
		if !strings.Contains(script, ":19100"+path) {
			t.Errorf("the Consul checks in the registration do not probe strait's %s on the admin port", path)
		}
	}
	for _, p := range strait.Ports {
		if p.Name == "mesh" && !regexp.MustCompile(`port\s*=\s*`+strconv.Itoa(p.ContainerPort)+`\b`).MatchString(script) {
			t.Errorf("the sidecar registration does not use the mesh port %d", p.ContainerPort)
		}
	}
}

// TestKubernetesVariableReferences: Kubernetes expands $(VAR) in command,
// args and env values only when VAR is defined (for env values: earlier in
// the list) and silently leaves it verbatim otherwise.
func TestKubernetesVariableReferences(t *testing.T) {
	t.Parallel()
	m := loadManifests(t)
	pod := &m.deployment.Spec.Template.Spec
	ref := regexp.MustCompile(`\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)`)
	check := func(c *container, where, s string, defined func(string) bool) {
		for _, sm := range ref.FindAllStringSubmatch(s, -1) {
			if sm[0] != "$$" && !defined(sm[1]) {
				t.Errorf("container %s, %s: $(%s) is not defined there and would stay verbatim", c.Name, where, sm[1])
			}
		}
	}
	for _, cs := range [][]container{pod.InitContainers, pod.Containers} {
		for i := range cs {
			c := &cs[i]
			for j, e := range c.Env {
				check(c, "env "+e.Name, e.Value, func(v string) bool { _, k := c.env(v); return k >= 0 && k < j })
			}
			for _, a := range append(slices.Clone(c.Command), c.Args...) {
				check(c, "command/args", a, func(v string) bool { _, k := c.env(v); return k >= 0 })
			}
		}
	}
}

func TestKubernetesGracefulShutdown(t *testing.T) {
	t.Parallel()
	m := loadManifests(t)
	pod := &m.deployment.Spec.Template.Spec
	strait := pod.container(t, "strait")

	grace := 15 * time.Second // strait's default
	if v, ok := flag(strait.Args, "shutdown-grace"); ok {
		d, err := time.ParseDuration(v)
		if err != nil {
			t.Fatalf("-shutdown-grace %q: %v", v, err)
		}
		grace = d
	}
	if strait.Lifecycle == nil || strait.Lifecycle.PreStop == nil {
		t.Fatal("strait has no preStop hook")
	}
	pre := strait.Lifecycle.PreStop
	if pre.Exec != nil {
		t.Error("preStop exec cannot work: the strait image has no shell or sleep binary; use the sleep action")
	}
	if pre.Sleep == nil || pre.Sleep.Seconds <= 0 {
		t.Fatal("strait's preStop must sleep (lifecycle.preStop.sleep.seconds)")
	}
	if pod.TerminationGracePeriodSeconds == nil {
		t.Fatal("terminationGracePeriodSeconds is not set")
	}
	const exitMargin = 5 * time.Second
	total := time.Duration(*pod.TerminationGracePeriodSeconds) * time.Second
	need := time.Duration(pre.Sleep.Seconds)*time.Second + grace + exitMargin
	if total < need {
		t.Errorf("terminationGracePeriodSeconds %v < preStop %ds + -shutdown-grace %v + %v: the kubelet would SIGKILL strait while it drains",
			total, pre.Sleep.Seconds, grace, exitMargin)
	}
}

func TestKubernetesContainersAreLockedDown(t *testing.T) {
	t.Parallel()
	m := loadManifests(t)
	pod := &m.deployment.Spec.Template.Spec
	podNonRoot := pod.SecurityContext != nil && pod.SecurityContext.RunAsNonRoot != nil && *pod.SecurityContext.RunAsNonRoot
	for _, c := range append(slices.Clone(pod.InitContainers), pod.Containers...) {
		if c.Image == "" || !strings.Contains(c.Image[strings.LastIndex(c.Image, "/")+1:], ":") || strings.HasSuffix(c.Image, ":latest") {
			t.Errorf("container %s: image %q must carry a pinned tag", c.Name, c.Image)
		}
		sc := c.SecurityContext
		if sc == nil {
			t.Errorf("container %s has no securityContext", c.Name)
			continue
		}
		if !podNonRoot && (sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot) {
			t.Errorf("container %s may run as root (runAsNonRoot)", c.Name)
		}
		if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
			t.Errorf("container %s: readOnlyRootFilesystem must be true", c.Name)
		}
		if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
			t.Errorf("container %s: allowPrivilegeEscalation must be false", c.Name)
		}
		if sc.Privileged != nil && *sc.Privileged {
			t.Errorf("container %s is privileged", c.Name)
		}
		if sc.Capabilities == nil || !slices.Contains(sc.Capabilities.Drop, "ALL") || len(sc.Capabilities.Add) > 0 {
			t.Errorf("container %s: capabilities must drop ALL and add none", c.Name)
		}
		for _, r := range []string{"cpu", "memory"} {
			if c.Resources.Requests[r] == "" {
				t.Errorf("container %s: no %s request", c.Name, r)
			}
		}
		if c.Resources.Limits["memory"] == "" {
			t.Errorf("container %s: no memory limit", c.Name)
		}
	}

	strait := pod.container(t, "strait")
	if sc := strait.SecurityContext; sc == nil || sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot {
		t.Error("strait itself must set runAsNonRoot: true")
	}
	if e, i := strait.env("GOMEMLIMIT"); i >= 0 {
		if lim, limit := bytesOf(t, e.Value), bytesOf(t, strait.Resources.Limits["memory"]); lim >= limit {
			t.Errorf("GOMEMLIMIT %s is not below the memory limit %s", e.Value, strait.Resources.Limits["memory"])
		}
	}
}

// bytesOf parses the binary-suffixed sizes used here: Kubernetes quantities
// (128Mi) and Go's GOMEMLIMIT (100MiB).
func bytesOf(t *testing.T, s string) int64 {
	t.Helper()
	for i, suffix := range []string{"Ki", "Mi", "Gi"} {
		for _, form := range []string{suffix + "B", suffix} {
			if v, ok := strings.CutSuffix(s, form); ok {
				n, err := strconv.ParseInt(v, 10, 64)
				if err != nil {
					t.Fatalf("size %q: %v", s, err)
				}
				return n << (10 * (i + 1))
			}
		}
	}
	n, err := strconv.ParseInt(strings.TrimSuffix(s, "B"), 10, 64)
	if err != nil {
		t.Fatalf("size %q: %v", s, err)
	}
	return n
}

// TestKubernetesDocs keeps docs/kubernetes.md in step with the manifests.
func TestKubernetesDocs(t *testing.T) {
	t.Parallel()
	doc, err := os.ReadFile("../docs/kubernetes.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{"deploy/kubernetes", "consul-dataplane", "status.hostIP", "-admin-bind 0.0.0.0:19100",
		"terminationGracePeriodSeconds", "consul acl auth-method create", "consul acl binding-rule create"} {
		if !strings.Contains(string(doc), s) {
			t.Errorf("docs/kubernetes.md does not mention %q", s)
		}
	}
}
