package metrics

import (
	"fmt"
	"net"
	"sort"
	"strconv"
	"strings"
)

// Telemetry is the subset of Consul's telemetry block that strait honours,
// with Consul's key names. It comes from the registration's
// Proxy.Config["telemetry"] (agent mode, as the built-in proxy reads it)
// and from flags, which win field by field (Overlay).
type Telemetry struct {
	// StatsdAddr (statsd_address) is a statsd server's host:port (UDP).
	StatsdAddr string `json:"statsd_address,omitempty"`
	// StatsiteAddr (statsite_address) is a statsite server's host:port
	// (TCP).
	StatsiteAddr string `json:"statsite_address,omitempty"`
	// DogstatsdAddr (dogstatsd_addr) is a DogStatsD agent's host:port
	// (UDP) or unix:///path/to/dsd.socket (unixgram).
	DogstatsdAddr string `json:"dogstatsd_addr,omitempty"`
	// DogstatsdTags (dogstatsd_tags) are added to every DogStatsD metric,
	// "key:value" each.
	DogstatsdTags []string `json:"dogstatsd_tags,omitempty"`
	// MetricsPrefix (metrics_prefix) is prepended to every name. The
	// built-in proxy's default is none ("inbound.conns"), and so is ours.
	MetricsPrefix string `json:"metrics_prefix,omitempty"`
	// DisableHostname (disable_hostname) keeps the hostname out of gauge
	// names sent to statsd/statsite/dogstatsd. Prometheus names never
	// carry it. Nil means false.
	DisableHostname *bool `json:"disable_hostname,omitempty"`
	// FilterDefault (filter_default) says whether a metric matching no
	// prefix rule is sent; nil means true, the agent's default.
	FilterDefault *bool `json:"filter_default,omitempty"`
	// AllowedPrefixes and BlockedPrefixes (allowed_prefixes,
	// blocked_prefixes) filter metrics by dotted name prefix, metrics
	// prefix included, for every sink.
	AllowedPrefixes []string `json:"allowed_prefixes,omitempty"`
	BlockedPrefixes []string `json:"blocked_prefixes,omitempty"`
}

// Overlay returns t with every field that o sets replaced by o's.
func (t Telemetry) Overlay(o Telemetry) Telemetry {
	set := func(dst *string, v string) {
		if v != "" {
			*dst = v
		}
	}
	set(&t.StatsdAddr, o.StatsdAddr)
	set(&t.StatsiteAddr, o.StatsiteAddr)
	set(&t.DogstatsdAddr, o.DogstatsdAddr)
	set(&t.MetricsPrefix, o.MetricsPrefix)
	if o.DogstatsdTags != nil {
		t.DogstatsdTags = o.DogstatsdTags
	}
	if o.DisableHostname != nil {
		t.DisableHostname = o.DisableHostname
	}
	if o.FilterDefault != nil {
		t.FilterDefault = o.FilterDefault
	}
	if o.AllowedPrefixes != nil {
		t.AllowedPrefixes = o.AllowedPrefixes
	}
	if o.BlockedPrefixes != nil {
		t.BlockedPrefixes = o.BlockedPrefixes
	}
	return t
}

// Validate checks the sink addresses.
func (t Telemetry) Validate() error {
	if err := ValidateAddr("statsd_address", t.StatsdAddr, false); err != nil {
		return err
	}
	if err := ValidateAddr("statsite_address", t.StatsiteAddr, false); err != nil {
		return err
	}
	return ValidateAddr("dogstatsd_addr", t.DogstatsdAddr, true)
}

// ValidateAddr checks a sink address: empty (no sink), host:port, or, when
// unix is allowed, unix:///absolute/path.
func ValidateAddr(key, addr string, unix bool) error {
	if addr == "" {
		return nil
	}
	if p, ok := strings.CutPrefix(addr, "unix://"); ok {
		if !unix {
			return fmt.Errorf("%s %q: unix sockets are only supported for dogstatsd", key, addr)
		}
		if !strings.HasPrefix(p, "/") {
			return fmt.Errorf("%s %q: want unix:///absolute/path", key, addr)
		}
		return nil
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%s %q: want host:port", key, addr)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 || host == "" {
		return fmt.Errorf("%s %q: want host:port with a port in 1-65535", key, addr)
	}
	return nil
}

// ParseTelemetry decodes a telemetry block as the agent returns it inside
// Proxy.Config: a JSON object (or the one-element list of objects an HCL
// block can decode to). Strings must be strings; booleans may also be
// "true"/"false" or the numbers 0 and 1 (JSON decodes every number as a
// float64); lists may be lists of strings or one comma-separated string.
// A value of the wrong type is an error naming the key. Keys strait does
// not implement (circonus_*, prometheus_retention_time, ...) are returned
// as warnings and otherwise ignored, as the built-in proxy ignores them.
func ParseTelemetry(raw any) (Telemetry, []string, error) {
	var t Telemetry
	if raw == nil {
		return t, nil, nil
	}
	if l, ok := raw.([]any); ok && len(l) == 1 {
		raw = l[0]
	}
	m, ok := raw.(map[string]any)
	if !ok {
		return t, nil, fmt.Errorf("telemetry: want an object, got %s", describe(raw))
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var warnings []string
	for _, k := range keys {
		v := m[k]
		var err error
		switch k {
		case "statsd_address":
			t.StatsdAddr, err = str(k, v)
		case "statsite_address":
			t.StatsiteAddr, err = str(k, v)
		case "dogstatsd_addr":
			t.DogstatsdAddr, err = str(k, v)
		case "metrics_prefix":
			t.MetricsPrefix, err = str(k, v)
		case "dogstatsd_tags":
			t.DogstatsdTags, err = strList(k, v)
		case "allowed_prefixes":
			t.AllowedPrefixes, err = strList(k, v)
		case "blocked_prefixes":
			t.BlockedPrefixes, err = strList(k, v)
		case "disable_hostname":
			t.DisableHostname, err = boolean(k, v)
		case "filter_default":
			t.FilterDefault, err = boolean(k, v)
		default:
			warnings = append(warnings, fmt.Sprintf("telemetry.%s is not supported by strait; ignored", k))
		}
		if err != nil {
			return Telemetry{}, nil, err
		}
	}
	if err := t.Validate(); err != nil {
		return Telemetry{}, nil, fmt.Errorf("telemetry.%w", err)
	}
	return t, warnings, nil
}

func str(k string, v any) (string, error) {
	switch x := v.(type) {
	case nil:
		return "", nil
	case string:
		return strings.TrimSpace(x), nil
	}
	return "", fmt.Errorf("telemetry.%s: want a string, got %s", k, describe(v))
}

func strList(k string, v any) ([]string, error) {
	switch x := v.(type) {
	case nil:
		return nil, nil
	case string:
		var out []string
		for _, s := range strings.Split(x, ",") {
			if s = strings.TrimSpace(s); s != "" {
				out = append(out, s)
			}
		}
		return out, nil
	case []string:
		return x, nil
	case []any:
		out := make([]string, 0, len(x))
		for i, e := range x {
			s, ok := e.(string)
			if !ok {
				return nil, fmt.Errorf("telemetry.%s[%d]: want a string, got %s", k, i, describe(e))
			}
			out = append(out, s)
		}
		return out, nil
	}
	return nil, fmt.Errorf("telemetry.%s: want a list of strings, got %s", k, describe(v))
}

func boolean(k string, v any) (*bool, error) {
	var b bool
	switch x := v.(type) {
	case nil:
		return nil, nil
	case bool:
		b = x
	case string:
		p, err := strconv.ParseBool(strings.TrimSpace(x))
		if err != nil {
			return nil, fmt.Errorf("telemetry.%s: %q is not a boolean", k, x)
		}
		b = p
	case float64, int, int64:
		f := toFloat(x)
		if f != 0 && f != 1 {
			return nil, fmt.Errorf("telemetry.%s: want a boolean, got number %v", k, x)
		}
		b = f == 1
	default:
		return nil, fmt.Errorf("telemetry.%s: want a boolean, got %s", k, describe(v))
	}
	return &b, nil
}

func toFloat(v any) float64 {
	switch x := v.(type) {
	case float64:
		return x
	case int:
		return float64(x)
	case int64:
		return float64(x)
	}
	return -1
}

// describe names a decoded JSON value's type the way a user wrote it.
func describe(v any) string {
	switch x := v.(type) {
	case nil:
		return "null"
	case bool:
		return "boolean " + strconv.FormatBool(x)
	case float64, int, int64:
		return fmt.Sprintf("number %v", x)
	case string:
		return strconv.Quote(x)
	case []any:
		return "a list"
	case map[string]any:
		return "an object"
	}
	return fmt.Sprintf("%T", v)
}
