#!/usr/bin/env bash
# Builds the pinned real Consul (scripts/consul/go.mod) into bin/consul.
# Uses a `consul` already on PATH when it is exactly the pinned version.
# Cold: ~5 minutes on 2 cores; afterwards the Go build cache makes it seconds.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
want=$(awk '/github.com\/hashicorp\/consul v/ && !/\/api|\/sdk|\/proto|\/envoy|\/troubleshoot/ {print $2; exit}' "$root/scripts/consul/go.mod")
want=${want#v}
out="$root/bin/consul"
mkdir -p "$root/bin"

have_version() { "$1" version 2>/dev/null | awk 'NR==1 {sub(/^v/, "", $2); print $2}'; }

if [ -x "$out" ] && [ "$(have_version "$out")" = "$want" ]; then
  exit 0
fi
if onpath=$(command -v consul 2>/dev/null) && [ "$onpath" != "$out" ] && [ "$(have_version "$onpath")" = "$want" ]; then
  ln -sf "$onpath" "$out"
  echo "using $onpath (consul $want)"
  exit 0
fi
echo "building consul $want into bin/consul (first time takes ~5 minutes)..." >&2
cd "$root/scripts/consul"
go build -trimpath -o "$out.tmp" github.com/hashicorp/consul
mv "$out.tmp" "$out"
echo "built $("$out" version | head -1)" >&2
