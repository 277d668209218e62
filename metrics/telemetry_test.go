package metrics

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
)

func decode(t *testing.T, s string) any {
	t.Helper()
	var v any
	if err := json.Unmarshal([]byte(s), &v); err != nil {
		t.Fatal(err)
	}
	return v
}

func ptr(b bool) *bool { return &b }

func TestParseTelemetry(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		want     Telemetry
		warnings []string
	}{
		{"consul keys", `{"statsd_address": "127.0.0.1:8125", "dogstatsd_addr": "unix:///var/run/dsd.socket",
			"dogstatsd_tags": ["env:prod", "team:a"], "metrics_prefix": "consul.proxy", "disable_hostname": true,
			"statsite_address": "stats:8125", "filter_default": false, "allowed_prefixes": ["upstream"], "blocked_prefixes": "inbound.denied, runtime"}`,
			Telemetry{StatsdAddr: "127.0.0.1:8125", DogstatsdAddr: "unix:///var/run/dsd.socket", DogstatsdTags: []string{"env:prod", "team:a"},
				MetricsPrefix: "consul.proxy", DisableHostname: ptr(true), StatsiteAddr: "stats:8125", FilterDefault: ptr(false),
				AllowedPrefixes: []string{"upstream"}, BlockedPrefixes: []string{"inbound.denied", "runtime"}}, nil},
		{"booleans as JSON numbers and strings", `{"disable_hostname": 1.0, "filter_default": "true"}`,
			Telemetry{DisableHostname: ptr(true), FilterDefault: ptr(true)}, nil},
		{"zero is false", `{"disable_hostname": 0}`, Telemetry{DisableHostname: ptr(false)}, nil},
		{"HCL block form", `[{"statsd_address": "localhost:8125"}]`, Telemetry{StatsdAddr: "localhost:8125"}, nil},
		{"nulls", `{"statsd_address": null, "disable_hostname": null}`, Telemetry{}, nil},
		{"unsupported keys warn", `{"circonus_api_token": "x", "prometheus_retention_time": "60s", "dogstatsd_addr": "127.0.0.1:8125"}`,
			Telemetry{DogstatsdAddr: "127.0.0.1:8125"},
			[]string{"telemetry.circonus_api_token is not supported by strait; ignored", "telemetry.prometheus_retention_time is not supported by strait; ignored"}},
		{"null block", `null`, Telemetry{}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, warnings, err := ParseTelemetry(decode(t, tc.in))
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("got %+v\nwant %+v", got, tc.want)
			}
			if !reflect.DeepEqual(warnings, tc.warnings) {
				t.Errorf("warnings %q, want %q", warnings, tc.warnings)
			}
		})
	}
}

func TestParseTelemetryErrors(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{`{"statsd_address": 8125.0}`, "telemetry.statsd_address: want a string, got number 8125"},
		{`{"metrics_prefix": true}`, "telemetry.metrics_prefix: want a string, got boolean true"},
		{`{"disable_hostname": 2.5}`, "telemetry.disable_hostname: want a boolean, got number 2.5"},
		{`{"disable_hostname": "yes please"}`, `telemetry.disable_hostname: "yes please" is not a boolean`},
		{`{"filter_default": []}`, "telemetry.filter_default: want a boolean, got a list"},
		{`{"dogstatsd_tags": ["a:b", 1]}`, "telemetry.dogstatsd_tags[1]: want a string, got number 1"},
		{`{"dogstatsd_tags": {"a": "b"}}`, "telemetry.dogstatsd_tags: want a list of strings, got an object"},
		{`{"statsd_address": "localhost"}`, `telemetry.statsd_address "localhost": want host:port`},
		{`{"statsd_address": "localhost:99999"}`, `port in 1-65535`},
		{`{"statsd_address": "unix:///run/s.sock"}`, "only supported for dogstatsd"},
		{`{"dogstatsd_addr": "unix://relative.sock"}`, "want unix:///absolute/path"},
		{`"statsd:8125"`, `telemetry: want an object, got "statsd:8125"`},
		{`[{"a": 1}, {"b": 2}]`, "telemetry: want an object, got a list"},
	} {
		_, _, err := ParseTelemetry(decode(t, tc.in))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("ParseTelemetry(%s) = %v, want an error containing %q", tc.in, err, tc.want)
		}
	}
}

func TestOverlay(t *testing.T) {
	block := Telemetry{StatsdAddr: "a:1", MetricsPrefix: "consul", DisableHostname: ptr(false), DogstatsdTags: []string{"x:y"}}
	flags := Telemetry{StatsdAddr: "b:2", DisableHostname: ptr(true)}
	want := Telemetry{StatsdAddr: "b:2", MetricsPrefix: "consul", DisableHostname: ptr(true), DogstatsdTags: []string{"x:y"}}
	if got := block.Overlay(flags); !reflect.DeepEqual(got, want) {
		t.Fatalf("got %+v, want %+v", got, want)
	}
}
