package deploy

import (
	"encoding/json"
	"os"
	"path"
	"strconv"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

// The agentless pod (deploy/kubernetes/agentless/pod.yaml): consul-k8s's
// injected pod with strait in place of consul-dataplane. cmd/strait's
// TestAgentlessPodArgs runs its sidecar arguments through strait's parser.

type lifecycleHandler struct {
	HTTPGet *struct {
		Path string          `json:"path"`
		Port json.RawMessage `json:"port"`
		Host string          `json:"host"`
	} `json:"httpGet"`
}

type agentlessContainer struct {
	container
	Lifecycle *struct {
		PostStart *lifecycleHandler `json:"postStart"`
		PreStop   *lifecycleHandler `json:"preStop"`
	} `json:"lifecycle"`
	SecurityContext *struct {
		RunAsUser              *int64 `json:"runAsUser"`
		RunAsNonRoot           *bool  `json:"runAsNonRoot"`
		ReadOnlyRootFilesystem *bool  `json:"readOnlyRootFilesystem"`
		Capabilities           *struct {
			Add  []string `json:"add"`
			Drop []string `json:"drop"`
		} `json:"capabilities"`
	} `json:"securityContext"`
}

type agentlessPod struct {
	object
	Spec struct {
		ServiceAccountName            string               `json:"serviceAccountName"`
		TerminationGracePeriodSeconds *int64               `json:"terminationGracePeriodSeconds"`
		Volumes                       []volume             `json:"volumes"`
		InitContainers                []agentlessContainer `json:"initContainers"`
		Containers                    []agentlessContainer `json:"containers"`
	} `json:"spec"`
}

func loadAgentlessPod(t *testing.T) *agentlessPod {
	t.Helper()
	raw, err := os.ReadFile("kubernetes/agentless/pod.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var p agentlessPod
	if err := yaml.Unmarshal(raw, &p); err != nil {
		t.Fatalf("pod.yaml: %v", err)
	}
	if p.Kind != "Pod" || p.APIVersion != "v1" {
		t.Fatalf("pod.yaml is a %s %s, want a v1 Pod", p.APIVersion, p.Kind)
	}
	return &p
}

func (p *agentlessPod) find(t *testing.T, name string) (*agentlessContainer, int) {
	t.Helper()
	for i := range p.Spec.InitContainers {
		if p.Spec.InitContainers[i].Name == name {
			return &p.Spec.InitContainers[i], -1
		}
	}
	for i := range p.Spec.Containers {
		if p.Spec.Containers[i].Name == name {
			return &p.Spec.Containers[i], i
		}
	}
	t.Fatalf("no container %q in the agentless pod", name)
	return nil, 0
}

// mountOf returns the volume mounted at the longest mount path that
// contains file, and that path.
func (c *agentlessContainer) mountOf(file string) (string, string) {
	name, at := "", ""
	for _, m := range c.VolumeMounts {
		if strings.HasPrefix(file, m.MountPath+"/") && len(m.MountPath) > len(at) {
			name, at = m.Name, m.MountPath
		}
	}
	return name, at
}

func TestAgentlessPodSidecarIsStrait(t *testing.T) {
	t.Parallel()
	p := loadAgentlessPod(t)
	dp, idx := p.find(t, "consul-dataplane")
	if idx != 0 {
		t.Errorf("the sidecar is container %d; it must come first, so that its postStart hook holds the application back", idx)
	}
	if strings.Contains(dp.Image, "consul-dataplane") || len(dp.Command) != 2 || path.Base(dp.Command[0]) != "strait" || dp.Command[1] != "dataplane" {
		t.Errorf("sidecar runs %s %v, want strait's image and command [/strait dataplane]", dp.Image, dp.Command)
	}

	// The node name the login and the catalog lookup use: consul-k8s's
	// virtual node, from the downward API, defined before its use.
	node, i := dp.env("DP_SERVICE_NODE_NAME")
	_, j := dp.env("NODE_NAME")
	if node.Value != "$(NODE_NAME)-virtual" || j < 0 || j > i {
		t.Errorf("DP_SERVICE_NODE_NAME %q (entry %d), NODE_NAME entry %d: want $(NODE_NAME)-virtual after NODE_NAME", node.Value, i, j)
	}
	init, _ := p.find(t, "consul-connect-inject-init")
	if v, _ := init.env("CONSUL_NODE_NAME"); v.Value != node.Value {
		t.Errorf("connect-init's node %q is not the sidecar's %q", v.Value, node.Value)
	}

	// The proxy ID file is written by connect-init into a volume the
	// sidecar mounts too.
	idPath, ok := flag(dp.Args, "proxy-service-id-path")
	if !ok {
		t.Fatal("no -proxy-service-id-path")
	}
	vol, at := dp.mountOf(idPath)
	if iv, iat := init.mountOf(idPath); vol == "" || iv != vol || iat != at {
		t.Errorf("%s: sidecar mounts %q at %q, connect-init %q at %q: want the same volume", idPath, vol, at, iv, iat)
	}

	// The login: the projected service-account token, the auth method
	// connect-init uses.
	if v, _ := flag(dp.Args, "credential-type"); v != "login" {
		t.Errorf("-credential-type %q, want login", v)
	}
	method, _ := flag(dp.Args, "login-auth-method")
	if v, _ := init.env("CONSUL_LOGIN_AUTH_METHOD"); v.Value != method || method == "" {
		t.Errorf("auth method %q, connect-init's %q", method, v.Value)
	}
	bearer, _ := flag(dp.Args, "login-bearer-token-path")
	bv, bat := dp.mountOf(bearer)
	projected := false
	for _, v := range p.Spec.Volumes {
		if v.Name == bv && v.Projected != nil {
			for _, s := range v.Projected.Sources {
				if s.ServiceAccountToken != nil && path.Join(bat, s.ServiceAccountToken.Path) == bearer {
					projected = true
				}
			}
		}
	}
	if !projected {
		t.Errorf("-login-bearer-token-path %s is not a projected service-account token", bearer)
	}
	if meta, _ := dp.env("DP_CREDENTIAL_LOGIN_META"); meta.Value != "pod=$(POD_NAMESPACE)/$(POD_NAME)" {
		t.Errorf("DP_CREDENTIAL_LOGIN_META %q", meta.Value)
	}
}

func TestAgentlessPodLifecycle(t *testing.T) {
	t.Parallel()
	p := loadAgentlessPod(t)
	dp, _ := p.find(t, "consul-dataplane")
	web, _ := p.find(t, "web")
	admin, _ := flag(dp.Args, "admin-bind")
	if admin != "0.0.0.0:19100" {
		t.Fatalf("-admin-bind %q: the kubelet reaches the probes and hooks on the pod IP, want 0.0.0.0:19100", admin)
	}
	adminPort := 19100
	for _, pr := range []struct {
		what string
		p    *probe
		path string
	}{{"readiness", dp.ReadinessProbe, "/ready"}, {"liveness", dp.LivenessProbe, "/live"}} {
		if pr.p == nil || pr.p.HTTPGet == nil || pr.p.HTTPGet.Path != pr.path || dp.port(t, pr.p.HTTPGet.Port) != adminPort {
			t.Errorf("%s probe: want GET %s on the admin port", pr.what, pr.path)
		}
	}
	hook := func(what string, h *lifecycleHandler, wantPath string) {
		t.Helper()
		if h == nil || h.HTTPGet == nil {
			t.Errorf("%s: no httpGet hook", what)
			return
		}
		if h.HTTPGet.Path != wantPath || h.HTTPGet.Host != "" || string(h.HTTPGet.Port) != strconv.Itoa(adminPort) && dp.port(t, h.HTTPGet.Port) != adminPort {
			t.Errorf("%s: GET %s:%s %s, want %s on the admin port of the pod IP", what, h.HTTPGet.Host, h.HTTPGet.Port, h.HTTPGet.Path, wantPath)
		}
	}
	startup, _ := flag(dp.Args, "graceful-startup-path")
	shutdown, _ := flag(dp.Args, "graceful-shutdown-path")
	if dp.Lifecycle == nil || web.Lifecycle == nil {
		t.Fatal("no lifecycle hooks")
	}
	hook("sidecar postStart", dp.Lifecycle.PostStart, startup)
	hook("application preStop", web.Lifecycle.PreStop, shutdown)
	if g, _ := flag(dp.Args, "startup-grace-period-seconds"); g == "0" || g == "" {
		t.Errorf("-startup-grace-period-seconds %q: 0 answers the startup hook at once, before strait is ready", g)
	}
	grace, _ := flag(dp.Args, "shutdown-grace-period-seconds")
	n, err := strconv.Atoi(grace)
	if err != nil || p.Spec.TerminationGracePeriodSeconds == nil || int64(n)+5 > *p.Spec.TerminationGracePeriodSeconds {
		t.Errorf("-shutdown-grace-period-seconds %q must fit in terminationGracePeriodSeconds with 5s to spare", grace)
	}
}

func TestAgentlessPodRedirectTraffic(t *testing.T) {
	t.Parallel()
	p := loadAgentlessPod(t)
	dp, _ := p.find(t, "consul-dataplane")
	r, _ := p.find(t, "strait-redirect-traffic")
	if len(r.Args) == 0 || r.Args[0] != "redirect-traffic" || r.Image != dp.Image {
		t.Fatalf("redirect step: %s %v, want strait's image running redirect-traffic", r.Image, r.Args)
	}
	if uid, _ := flag(r.Args, "proxy-uid"); dp.SecurityContext == nil || dp.SecurityContext.RunAsUser == nil || uid != strconv.FormatInt(*dp.SecurityContext.RunAsUser, 10) {
		t.Errorf("-proxy-uid %q is not the sidecar's runAsUser", uid)
	}
	node, _ := dp.env("DP_SERVICE_NODE_NAME")
	if v, _ := flag(r.Args, "node-name"); v != node.Value {
		t.Errorf("-node-name %q, the sidecar's node is %q", v, node.Value)
	}
	if v, _ := flag(r.Args, "exclude-inbound-port"); v != "19100" {
		t.Errorf("-exclude-inbound-port %q: the admin port (probes, hooks) must not be redirected", v)
	}
	if r.SecurityContext == nil || r.SecurityContext.Capabilities == nil || len(r.SecurityContext.Capabilities.Add) != 1 || r.SecurityContext.Capabilities.Add[0] != "NET_ADMIN" {
		t.Errorf("the redirect step needs NET_ADMIN and nothing more")
	}
	sc := dp.SecurityContext
	if sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem ||
		sc.Capabilities == nil || len(sc.Capabilities.Add) != 0 || len(sc.Capabilities.Drop) != 1 || sc.Capabilities.Drop[0] != "ALL" {
		t.Errorf("the sidecar must run non-root, read-only, without capabilities")
	}
}
