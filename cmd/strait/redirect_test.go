package main

import (
	"bytes"
	"strings"
	"testing"
)

// TestRedirectTrafficInput: bad input is one line on stderr and exit 2,
// nothing applied; -h documents every flag with examples; -dry-run
// without -proxy-id needs no agent and prints Consul's rules.
func TestRedirectTrafficInput(t *testing.T) {
	t.Parallel()
	for _, args := range [][]string{
		{"-proxy-inbound-port", "20000"},
		{"-proxy-uid", "1"},
		{"-proxy-uid", "1", "-proxy-id", "p", "-proxy-inbound-port", "2"},
		{"-proxy-uid", "1", "-proxy-inbound-port", "x"},
		{"-proxy-uid", "1", "-proxy-inbound-port", "2", "-exclude-inbound-port", "ssh"},
		{"-proxy-uid", "1", "-proxy-inbound-port", "2", "extra"},
		{"-nope"},
	} {
		var stdout, stderr bytes.Buffer
		code := run(append([]string{"redirect-traffic"}, args...), &stdout, &stderr)
		if code != 2 || stdout.Len() != 0 || strings.Count(stderr.String(), "\n") != 1 || !strings.HasPrefix(stderr.String(), "strait redirect-traffic: ") {
			t.Errorf("%v: exit %d, stdout %q, stderr %q; want exit 2 and one line", args, code, stdout.String(), stderr.String())
		}
	}

	var stdout, stderr bytes.Buffer
	if code := run([]string{"redirect-traffic", "-h"}, &stdout, &stderr); code != 0 || stderr.Len() != 0 {
		t.Fatalf("-h: exit %d, stderr %q", code, stderr.String())
	}
	fs := newRedirectFlagSet(&redirectOptions{})
	for _, name := range []string{"proxy-uid", "proxy-id", "exclude-inbound-port", "exclude-outbound-port", "exclude-outbound-cidr", "exclude-uid", "netns", "http-addr"} {
		if fs.Lookup(name) == nil || !strings.Contains(stdout.String(), "-"+name+" ") {
			t.Errorf("-h lacks -%s", name)
		}
	}
	if !strings.Contains(stdout.String(), "-node-name") || !strings.Contains(stdout.String(), "On a VM") || !strings.Contains(stdout.String(), "Kubernetes init container") {
		t.Error("-h lacks the VM and Kubernetes examples")
	}

	stdout.Reset()
	stderr.Reset()
	code := run([]string{"redirect-traffic", "-proxy-uid", "5995", "-proxy-inbound-port", "20000", "-exclude-inbound-port", "22", "-dry-run", "-http-addr", "127.0.0.1:1"}, &stdout, &stderr)
	if code != 0 || !strings.Contains(stdout.String(), "REDIRECT --to-port 20000") || !strings.Contains(stdout.String(), "--dport 22 -j RETURN") {
		t.Errorf("dry run: exit %d, stdout %q, stderr %q", code, stdout.String(), stderr.String())
	}
}
