package tlsutil

import (
	"errors"
	"net/url"
	"strings"
	"testing"
)

const testTD = "11111111-2222-3333-4444-555555555555.consul"

func TestParseIDValid(t *testing.T) {
	t.Parallel()
	td := testTD
	tests := []struct {
		name string
		in   string
		want Identity
		// canonical is what String() must render; empty means the input.
		canonical string
	}{
		{
			name: "service default partition",
			in:   "spiffe://" + td + "/ns/default/dc/dc1/svc/web",
			want: Identity{Kind: KindService, TrustDomain: td, Partition: "default", Namespace: "default", Datacenter: "dc1", Service: "web"},
		},
		{
			name: "service in a namespace",
			in:   "spiffe://" + td + "/ns/team-a/dc/dc2/svc/billing_api",
			want: Identity{Kind: KindService, TrustDomain: td, Partition: "default", Namespace: "team-a", Datacenter: "dc2", Service: "billing_api"},
		},
		{
			name: "service in a partition",
			in:   "spiffe://" + td + "/ap/part1/ns/ns1/dc/dc1/svc/db",
			want: Identity{Kind: KindService, TrustDomain: td, Partition: "part1", Namespace: "ns1", Datacenter: "dc1", Service: "db"},
		},
		{
			name:      "service upper-case partition is lowered",
			in:        "spiffe://" + td + "/ap/Part1/ns/ns1/dc/dc1/svc/db",
			want:      Identity{Kind: KindService, TrustDomain: td, Partition: "part1", Namespace: "ns1", Datacenter: "dc1", Service: "db"},
			canonical: "spiffe://" + td + "/ap/part1/ns/ns1/dc/dc1/svc/db",
		},
		{
			name:      "service explicit default partition",
			in:        "spiffe://" + td + "/ap/default/ns/default/dc/dc1/svc/web",
			want:      Identity{Kind: KindService, TrustDomain: td, Partition: "default", Namespace: "default", Datacenter: "dc1", Service: "web"},
			canonical: "spiffe://" + td + "/ns/default/dc/dc1/svc/web",
		},
		{
			name:      "service explicit DEFAULT partition",
			in:        "spiffe://" + td + "/ap/DEFAULT/ns/default/dc/dc1/svc/web",
			want:      Identity{Kind: KindService, TrustDomain: td, Partition: "default", Namespace: "default", Datacenter: "dc1", Service: "web"},
			canonical: "spiffe://" + td + "/ns/default/dc/dc1/svc/web",
		},
		{
			name: "service names keep their case",
			in:   "spiffe://" + td + "/ns/NS/dc/DC1/svc/Web",
			want: Identity{Kind: KindService, TrustDomain: td, Partition: "default", Namespace: "NS", Datacenter: "DC1", Service: "Web"},
		},
		{
			name: "agent",
			in:   "spiffe://" + td + "/agent/client/dc/dc1/id/adf4238a-882b-9ddc-4a9d-5b6758e4159e",
			want: Identity{Kind: KindAgent, TrustDomain: td, Partition: "default", Datacenter: "dc1", NodeID: "adf4238a-882b-9ddc-4a9d-5b6758e4159e"},
		},
		{
			name: "agent in a partition",
			in:   "spiffe://" + td + "/ap/p2/agent/client/dc/dc1/id/node-1",
			want: Identity{Kind: KindAgent, TrustDomain: td, Partition: "p2", Datacenter: "dc1", NodeID: "node-1"},
		},
		{
			name: "server",
			in:   "spiffe://" + td + "/agent/server/dc/dc1",
			want: Identity{Kind: KindServer, TrustDomain: td, Partition: "default", Datacenter: "dc1"},
		},
		{
			name: "mesh gateway",
			in:   "spiffe://" + td + "/gateway/mesh/dc/dc3",
			want: Identity{Kind: KindMeshGateway, TrustDomain: td, Partition: "default", Datacenter: "dc3"},
		},
		{
			name: "mesh gateway in a partition",
			in:   "spiffe://" + td + "/ap/east/gateway/mesh/dc/dc3",
			want: Identity{Kind: KindMeshGateway, TrustDomain: td, Partition: "east", Datacenter: "dc3"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got, err := ParseID(tc.in)
			if err != nil {
				t.Fatalf("ParseID(%q): %v", tc.in, err)
			}
			if got != tc.want {
				t.Fatalf("ParseID(%q)\n got %+v\nwant %+v", tc.in, got, tc.want)
			}
			if got.IsZero() {
				t.Fatalf("ParseID(%q) returned the zero identity", tc.in)
			}
			canonical := tc.canonical
			if canonical == "" {
				canonical = tc.in
			}
			if s := got.String(); s != canonical {
				t.Fatalf("String() = %q, want %q", s, canonical)
			}
			again, err := ParseID(got.String())
			if err != nil {
				t.Fatalf("re-parsing %q: %v", got.String(), err)
			}
			if again != got {
				t.Fatalf("round trip changed the identity:\n got %+v\nwant %+v", again, got)
			}
			// parseURI must agree with ParseID.
			u, err := url.Parse(tc.in)
			if err != nil {
				t.Fatal(err)
			}
			viaURI, err := parseURI(u)
			if err != nil || viaURI != got {
				t.Fatalf("parseURI(%q) = %+v, %v; want %+v", tc.in, viaURI, err, got)
			}
		})
	}
}

func TestParseIDRejects(t *testing.T) {
	t.Parallel()
	td := testTD
	tests := []struct {
		name string
		in   string
		want error
	}{
		{"empty", "", ErrNotSPIFFE},
		{"wrong scheme", "https://" + td + "/ns/default/dc/dc1/svc/web", ErrNotSPIFFE},
		{"spiffe without slashes", "spiffe:" + td + "/ns/default/dc/dc1/svc/web", ErrNotSPIFFE},
		{"no trust domain", "spiffe:///ns/default/dc/dc1/svc/web", ErrNotSPIFFE},
		{"upper-case trust domain", "spiffe://ABC.consul/ns/default/dc/dc1/svc/web", ErrNotSPIFFE},
		{"trust domain only", "spiffe://" + td, ErrUnknownForm},
		{"root path", "spiffe://" + td + "/", ErrNotSPIFFE},
		{"missing svc", "spiffe://" + td + "/ns/default/dc/dc1", ErrUnknownForm},
		{"missing svc name", "spiffe://" + td + "/ns/default/dc/dc1/svc", ErrUnknownForm},
		{"missing ns", "spiffe://" + td + "/dc/dc1/svc/web", ErrUnknownForm},
		{"extra segment after service", "spiffe://" + td + "/ns/default/dc/dc1/svc/web/extra", ErrUnknownForm},
		{"extra segment before ns", "spiffe://" + td + "/x/ns/default/dc/dc1/svc/web", ErrUnknownForm},
		{"misspelled svc", "spiffe://" + td + "/ns/default/dc/dc1/service/web", ErrUnknownForm},
		{"segments out of order", "spiffe://" + td + "/dc/dc1/ns/default/svc/web", ErrUnknownForm},
		{"ap without the rest", "spiffe://" + td + "/ap/p1", ErrUnknownForm},
		{"ap without name", "spiffe://" + td + "/ap", ErrUnknownForm},
		{"two ap segments", "spiffe://" + td + "/ap/p1/ap/p2/ns/default/dc/dc1/svc/web", ErrUnknownForm},
		{"ap with server form", "spiffe://" + td + "/ap/p1/agent/server/dc/dc1", ErrUnknownForm},
		{"ap default with server form", "spiffe://" + td + "/ap/default/agent/server/dc/dc1", ErrUnknownForm},
		{"server with extra", "spiffe://" + td + "/agent/server/dc/dc1/id/x", ErrUnknownForm},
		{"agent without id", "spiffe://" + td + "/agent/client/dc/dc1", ErrUnknownForm},
		{"unknown agent kind", "spiffe://" + td + "/agent/other/dc/dc1/id/x", ErrUnknownForm},
		{"terminating gateway", "spiffe://" + td + "/gateway/terminating/dc/dc1", ErrUnknownForm},
		{"empty segment", "spiffe://" + td + "/ns//dc/dc1/svc/web", ErrNotSPIFFE},
		{"empty service", "spiffe://" + td + "/ns/default/dc/dc1/svc/", ErrNotSPIFFE},
		{"double slash", "spiffe://" + td + "//ns/default/dc/dc1/svc/web", ErrNotSPIFFE},
		{"dot segment", "spiffe://" + td + "/ns/./dc/dc1/svc/web", ErrNotSPIFFE},
		{"dot-dot segment", "spiffe://" + td + "/ns/default/dc/dc1/svc/../web", ErrNotSPIFFE},
		{"query string", "spiffe://" + td + "/ns/default/dc/dc1/svc/web?x=1", ErrNotSPIFFE},
		{"fragment", "spiffe://" + td + "/ns/default/dc/dc1/svc/web#f", ErrNotSPIFFE},
		{"percent escape", "spiffe://" + td + "/ns/default/dc/dc1/svc/w%65b", ErrNotSPIFFE},
		{"percent escaped slash", "spiffe://" + td + "/ns/default/dc/dc1/svc/a%2Fb", ErrNotSPIFFE},
		{"userinfo", "spiffe://user@" + td + "/ns/default/dc/dc1/svc/web", ErrNotSPIFFE},
		{"port", "spiffe://" + td + ":8080/ns/default/dc/dc1/svc/web", ErrNotSPIFFE},
		{"space", "spiffe://" + td + "/ns/default/dc/dc1/svc/we b", ErrNotSPIFFE},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got, err := ParseID(tc.in)
			if err == nil {
				t.Fatalf("ParseID(%q) = %+v, want an error", tc.in, got)
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("ParseID(%q) error %v, want errors.Is %v", tc.in, err, tc.want)
			}
			if !got.IsZero() {
				t.Fatalf("ParseID(%q) returned %+v along with an error", tc.in, got)
			}
		})
	}
}

func TestParseURINil(t *testing.T) {
	t.Parallel()
	if _, err := parseURI(nil); !errors.Is(err, ErrNotSPIFFE) {
		t.Fatalf("parseURI(nil) error = %v, want ErrNotSPIFFE", err)
	}
}

func TestIdentityStringZero(t *testing.T) {
	t.Parallel()
	var id Identity
	if !id.IsZero() {
		t.Fatal("zero Identity is not IsZero")
	}
	if s := id.String(); s != "" {
		t.Fatalf("zero Identity String() = %q, want empty", s)
	}
}

func TestKindString(t *testing.T) {
	t.Parallel()
	want := map[Kind]string{
		KindService:     "service",
		KindAgent:       "agent",
		KindServer:      "server",
		KindMeshGateway: "mesh-gateway",
		0:               "unknown",
		99:              "unknown",
	}
	for k, s := range want {
		if got := k.String(); got != s {
			t.Errorf("Kind(%d).String() = %q, want %q", k, got, s)
		}
	}
}

func TestServiceID(t *testing.T) {
	t.Parallel()
	got := ServiceID(testTD, "", "", "dc1", "web")
	want := Identity{Kind: KindService, TrustDomain: testTD, Partition: "default", Namespace: "default", Datacenter: "dc1", Service: "web"}
	if got != want {
		t.Fatalf("ServiceID defaults: got %+v, want %+v", got, want)
	}
	parsed, err := ParseID("spiffe://" + testTD + "/ns/default/dc/dc1/svc/web")
	if err != nil || parsed != got {
		t.Fatalf("ServiceID differs from the parsed ID: %+v vs %+v (%v)", got, parsed, err)
	}

	got = ServiceID(testTD, "Part1", "ns1", "dc2", "db")
	if got.Partition != "part1" {
		t.Fatalf("ServiceID partition = %q, want lower-cased part1", got.Partition)
	}
	if s := got.String(); s != "spiffe://"+testTD+"/ap/part1/ns/ns1/dc/dc2/svc/db" {
		t.Fatalf("String() = %q", s)
	}
}

func TestServiceSNI(t *testing.T) {
	t.Parallel()
	td := testTD
	tests := []struct {
		svc, ns, ap, dc string
		want            string
	}{
		{"web", "default", "", "dc1", "web.default.dc1.internal." + td},
		{"web", "", "", "dc1", "web.default.dc1.internal." + td},
		{"web", "default", "default", "dc1", "web.default.dc1.internal." + td},
		{"web", "default", "Default", "dc1", "web.default.dc1.internal." + td},
		{"db", "team", "", "dc2", "db.team.dc2.internal." + td},
		{"db", "team", "part1", "dc2", "db.team.part1.dc2.internal-v1." + td},
		{"db", "", "Part1", "dc2", "db.default.part1.dc2.internal-v1." + td},
	}
	for _, tc := range tests {
		if got := ServiceSNI(tc.svc, tc.ns, tc.ap, tc.dc, td); got != tc.want {
			t.Errorf("ServiceSNI(%q, %q, %q, %q) = %q, want %q", tc.svc, tc.ns, tc.ap, tc.dc, got, tc.want)
		}
	}
}

// fuzzSeeds are valid and invalid IDs for FuzzParseID.
var fuzzSeeds = []string{
	"spiffe://" + testTD + "/ns/default/dc/dc1/svc/web",
	"spiffe://" + testTD + "/ap/Part1/ns/ns1/dc/dc1/svc/db",
	"spiffe://" + testTD + "/ap/default/ns/default/dc/dc1/svc/web",
	"spiffe://" + testTD + "/agent/client/dc/dc1/id/adf4238a-882b-9ddc-4a9d-5b6758e4159e",
	"spiffe://" + testTD + "/ap/p/agent/client/dc/dc1/id/n",
	"spiffe://" + testTD + "/agent/server/dc/dc1",
	"spiffe://" + testTD + "/gateway/mesh/dc/dc1",
	"spiffe://" + testTD + "/ap/x/gateway/mesh/dc/dc1",
	"spiffe://" + testTD,
	"spiffe://" + testTD + "/ap/p/agent/server/dc/dc1",
	"spiffe://" + testTD + "/ns//dc/dc1/svc/web",
	"spiffe://" + testTD + "/ns/default/dc/dc1/svc/w%65b",
	"spiffe://" + testTD + "/ns/default/dc/dc1/svc/web?x=1",
	"https://" + testTD + "/ns/default/dc/dc1/svc/web",
	"spiffe://a/ap/ap/ns/ns/dc/dc/svc/svc",
	"spiffe:///",
	"",
}

func FuzzParseID(f *testing.F) {
	for _, s := range fuzzSeeds {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		id, err := ParseID(s)
		if err != nil {
			if !id.IsZero() {
				t.Fatalf("ParseID(%q) returned %+v with error %v", s, id, err)
			}
			if !errors.Is(err, ErrNotSPIFFE) && !errors.Is(err, ErrUnknownForm) {
				t.Fatalf("ParseID(%q) error %v is neither ErrNotSPIFFE nor ErrUnknownForm", s, err)
			}
			return
		}
		switch id.Kind {
		case KindService, KindAgent, KindServer, KindMeshGateway:
		default:
			t.Fatalf("ParseID(%q) kind %d is not one of the four kinds", s, id.Kind)
		}
		if id.TrustDomain == "" || id.Datacenter == "" || id.Partition == "" {
			t.Fatalf("ParseID(%q) = %+v: empty trust domain, datacenter or partition", s, id)
		}
		if id.Partition != strings.ToLower(id.Partition) {
			t.Fatalf("ParseID(%q) partition %q is not lower case", s, id.Partition)
		}
		if id.Kind == KindService && (id.Namespace == "" || id.Service == "") {
			t.Fatalf("ParseID(%q) = %+v: service identity with empty namespace or service", s, id)
		}
		if id.Kind == KindAgent && id.NodeID == "" {
			t.Fatalf("ParseID(%q) = %+v: agent identity without node ID", s, id)
		}
		if id.Kind == KindServer && id.Partition != "default" {
			t.Fatalf("ParseID(%q) = %+v: server identity with a partition", s, id)
		}
		again, err := ParseID(id.String())
		if err != nil {
			t.Fatalf("ParseID(%q).String() = %q does not re-parse: %v", s, id.String(), err)
		}
		if again != id {
			t.Fatalf("round trip of %q via %q:\n got %+v\nwant %+v", s, id.String(), again, id)
		}
	})
}
