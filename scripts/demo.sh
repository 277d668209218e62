#!/usr/bin/env bash
# make demo: two services talking through two strait sidecars on a throwaway
# Consul dev agent, then a deny intention cutting them off and its removal
# letting them talk again. Exits non-zero when a stage does not show the
# expected outcome, so it doubles as an end-to-end smoke test.
#
#   STRAIT_DEMO_PROXY   proxy command (default bin/strait); e.g.
#                       STRAIT_DEMO_PROXY="bin/consul connect proxy" to run
#                       the same demo against Consul's built-in proxy
#   STRAIT_DEMO_KEEP=1  keep the temp dir (logs) instead of deleting it
#
# Every process it starts is stopped by PID on exit; nothing is killed by name.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

proxy_cmd_str=${STRAIT_DEMO_PROXY:-bin/strait}
read -r -a proxy_cmd <<<"$proxy_cmd_str"
proxy_label=strait
[ "$proxy_cmd_str" = bin/strait ] || proxy_label="'$proxy_cmd_str'"

say() { printf '%s\n' "$*"; }
header() { printf '\n== %s ==\n' "$*"; }
fail() {
  printf '\ndemo: FAIL: %s\n' "$*" >&2
  exit 1
}

# --- cleanup ----------------------------------------------------------------

tmp=""
pids=()      # long-running processes we started
dash_pid=""  # the dashboard run in progress, if any
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  if [ -n "$tmp" ] && [ -d "$tmp" ] && [ "$rc" -ne 0 ] && [ "$rc" -ne 130 ] && [ "$rc" -ne 143 ]; then
    local f
    for f in "$tmp"/*.log; do
      [ -s "$f" ] || continue
      printf '\n--- last lines of %s ---\n' "$(basename "$f")" >&2
      grep -v '\[DEBUG\]' "$f" | tail -n 25 >&2
    done
  fi
  local all=(${pids[@]+"${pids[@]}"})
  [ -n "$dash_pid" ] && all+=("$dash_pid")
  local p i
  for p in ${all[@]+"${all[@]}"}; do kill -TERM "$p" 2>/dev/null || true; done
  for p in ${all[@]+"${all[@]}"}; do
    for i in $(seq 50); do
      kill -0 "$p" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  if [ -n "$tmp" ] && [ -d "$tmp" ]; then
    if [ "${STRAIT_DEMO_KEEP:-}" = 1 ]; then
      say "logs kept in $tmp" >&2
    else
      rm -rf "$tmp"
    fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- build --------------------------------------------------------------------

if [ "$proxy_cmd_str" = bin/strait ]; then
  # Rebuild when missing or older than any Go source of the main module.
  if [ ! -x bin/strait ] || [ -n "$(find . -path ./scripts -prune -o -path ./bin -prune -o -path ./integration -prune \
    -o \( -name '*.go' -o -name go.mod -o -name go.sum \) -newer bin/strait -print -quit)" ]; then
    say "building bin/strait..."
    go build -o bin/strait ./cmd/strait
  fi
fi
scripts/build-consul.sh
[ -x "${proxy_cmd[0]}" ] || command -v "${proxy_cmd[0]}" >/dev/null || fail "proxy command not found: ${proxy_cmd[0]}"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/strait-demo.XXXXXX")
for prog in counting dashboard freeport; do
  go build -o "$tmp/$prog" "./scripts/demo/$prog"
done

# --- ports --------------------------------------------------------------------

mapfile -t ports < <("$tmp/freeport" -n 11)
[ "${#ports[@]}" -eq 11 ] || fail "could not find free ports"
http_port=${ports[0]} grpc_port=${ports[1]} grpc_tls_port=${ports[2]}
serf_lan_port=${ports[3]} serf_wan_port=${ports[4]} server_port=${ports[5]}
counting_port=${ports[6]} dashboard_port=${ports[7]}
counting_sidecar_port=${ports[8]} dashboard_sidecar_port=${ports[9]} upstream_port=${ports[10]}

http_addr=127.0.0.1:$http_port
api=http://$http_addr
export CONSUL_HTTP_ADDR=$http_addr
curl_() { curl --noproxy '*' -sS --max-time 5 "$@"; }

# Fails unless every PID given is still running.
alive() {
  local p
  for p in "$@"; do kill -0 "$p" 2>/dev/null || return 1; done
}

# --- consul -------------------------------------------------------------------

header "0. setting up: consul dev agent, counting + dashboard, two sidecars"
say "proxy:  ${proxy_cmd_str}"
say "consul: $(bin/consul version | head -1), HTTP API on $api"
(
  cd "$tmp"
  exec "$root/bin/consul" agent -dev -log-level=info -node=strait-demo \
    -bind=127.0.0.1 -client=127.0.0.1 \
    -http-port="$http_port" -grpc-port="$grpc_port" -grpc-tls-port="$grpc_tls_port" \
    -dns-port=-1 -serf-lan-port="$serf_lan_port" -serf-wan-port="$serf_wan_port" \
    -server-port="$server_port"
) >"$tmp/consul.log" 2>&1 &
consul_pid=$!
pids+=("$consul_pid")

deadline=$((SECONDS + 30))
until leader=$(curl_ -f "$api/v1/status/leader" 2>/dev/null) && [ -n "$leader" ] && [ "$leader" != '""' ] &&
  curl_ -f "$api/v1/agent/connect/ca/roots" 2>/dev/null | grep -q '"RootCert"'; do
  alive "$consul_pid" || fail "consul agent exited (see consul.log below)"
  [ "$SECONDS" -lt "$deadline" ] || fail "consul agent has no leader and Connect CA roots after 30s"
  sleep 0.2
done
say "consul agent up: leader $leader, Connect CA ready"

# --- services -----------------------------------------------------------------

"$tmp/counting" -listen "127.0.0.1:$counting_port" >"$tmp/counting.log" 2>&1 &
counting_pid=$!
pids+=("$counting_pid")

# counting's sidecar gets a 1s TCP check instead of the default 10s one (whose
# random initial stagger could keep it out of discovery for up to 10s).
# dashboard's sidecar receives no traffic; it gets no TCP check, whose probes
# would only make its sidecar dial the (absent) local dashboard app.
cat >"$tmp/counting.json" <<EOF
{
  "ID": "counting", "Name": "counting",
  "Address": "127.0.0.1", "Port": $counting_port,
  "Connect": {"SidecarService": {
    "Port": $counting_sidecar_port,
    "Checks": [
      {"Name": "Connect Sidecar Listening", "TCP": "127.0.0.1:$counting_sidecar_port", "Interval": "1s"},
      {"Name": "Connect Sidecar Aliasing counting", "AliasService": "counting"}
    ]
  }}
}
EOF
# dashboard serves nothing; its Port only gives the sidecar a local address.
cat >"$tmp/dashboard.json" <<EOF
{
  "ID": "dashboard", "Name": "dashboard",
  "Address": "127.0.0.1", "Port": $dashboard_port,
  "Connect": {"SidecarService": {
    "Port": $dashboard_sidecar_port,
    "Checks": [{"Name": "Connect Sidecar Aliasing dashboard", "AliasService": "dashboard"}],
    "Proxy": {"Upstreams": [
      {"DestinationName": "counting", "LocalBindAddress": "127.0.0.1", "LocalBindPort": $upstream_port}
    ]}
  }}
}
EOF
for svc in counting dashboard; do
  out=$(curl_ -X PUT --data-binary "@$tmp/$svc.json" -w '\n%{http_code}' "$api/v1/agent/service/register") ||
    fail "registering $svc: curl failed"
  [ "${out##*$'\n'}" = 200 ] || fail "registering $svc: ${out%$'\n'*}"
done
say "registered counting (127.0.0.1:$counting_port, sidecar :$counting_sidecar_port)"
say "registered dashboard (sidecar :$dashboard_sidecar_port, upstream counting on 127.0.0.1:$upstream_port)"

# --- sidecars -----------------------------------------------------------------

start_proxy() {
  "${proxy_cmd[@]}" -sidecar-for "$1" -http-addr "$http_addr" >"$tmp/proxy-$1.log" 2>&1 &
  pids+=("$!")
  eval "proxy_${1}_pid=\$!"
}
start_proxy counting
start_proxy dashboard
# strait logs "proxy ready"; Consul's built-in proxy "... ready to serve".
for svc in counting dashboard; do
  pid_var=proxy_${svc}_pid
  deadline=$((SECONDS + 30))
  until grep -Eq 'proxy ready|ready to serve' "$tmp/proxy-$svc.log"; do
    alive "${!pid_var}" || fail "sidecar for $svc exited (see proxy-$svc.log below)"
    [ "$SECONDS" -lt "$deadline" ] || fail "sidecar for $svc not ready after 30s"
    sleep 0.1
  done
  say "sidecar for $svc ready (pid ${!pid_var})"
done
# The dashboard's sidecar only dials counting instances whose checks pass.
deadline=$((SECONDS + 20))
until curl_ -f "$api/v1/health/connect/counting?passing=1" 2>/dev/null | grep -q '"ServiceID"'; do
  alive "$proxy_counting_pid" || fail "sidecar for counting exited (see proxy-counting.log below)"
  [ "$SECONDS" -lt "$deadline" ] || fail "counting's sidecar not passing its health checks after 20s"
  sleep 0.2
done
say "counting's sidecar passes its health checks"
say
say "  dashboard --HTTP--> 127.0.0.1:$upstream_port [sidecar for dashboard] ==mTLS==>"
say "    127.0.0.1:$counting_sidecar_port [sidecar for counting] --HTTP--> 127.0.0.1:$counting_port counting"

# Runs the dashboard in the background (so INT/TERM are handled at once) and
# waits for it; returns its exit status.
dashboard() {
  local rc=0
  "$tmp/dashboard" -upstream "http://127.0.0.1:$upstream_port/" -interval 500ms "$@" &
  dash_pid=$!
  wait "$dash_pid" || rc=$?
  dash_pid=""
  return "$rc"
}
check_sidecars() {
  alive "$proxy_counting_pid" "$proxy_dashboard_pid" "$counting_pid" "$consul_pid" ||
    fail "a process of the demo exited unexpectedly"
}

# --- 1 ------------------------------------------------------------------------

header "1. traffic flows through two $proxy_label proxies"
rc=0
dashboard -wait-for ok -wait-timeout 15s -n 4 -expect ok || rc=$?
check_sidecars
case $rc in
  0) ;;
  2) fail "stage 1: no successful request through the sidecars within 15s" ;;
  *) fail "stage 1: a request failed after traffic had started flowing" ;;
esac

# --- 2 ------------------------------------------------------------------------

header "2. deny intention dashboard => counting: new connections are refused"
say "\$ consul intention create -deny dashboard counting"
bin/consul intention create -deny dashboard counting || fail "could not create the intention"
rc=0
dashboard -wait-for refused -wait-timeout 10s -n 4 -expect refused || rc=$?
check_sidecars
case $rc in
  0) ;;
  2) fail "stage 2: requests still succeed 10s after the deny intention was written" ;;
  *) fail "stage 2: a request succeeded after the deny intention had taken effect" ;;
esac
# Show the counting sidecar's side of it (strait: "inbound connection denied").
if denied=$(grep -E 'denied' "$tmp/proxy-counting.log" | tail -n 1) && [ -n "$denied" ]; then
  say "sidecar for counting logged:"
  say "  ${denied#"${denied%%[![:space:]]*}"}"
fi

# --- 3 ------------------------------------------------------------------------

header "3. intention deleted: traffic flows again"
say "\$ consul intention delete dashboard counting"
bin/consul intention delete dashboard counting || fail "could not delete the intention"
rc=0
dashboard -wait-for ok -wait-timeout 10s -n 4 -expect ok || rc=$?
check_sidecars
case $rc in
  0) ;;
  2) fail "stage 3: no successful request within 10s of deleting the intention" ;;
  *) fail "stage 3: a request failed after traffic had resumed" ;;
esac

header "demo OK: allow -> deny -> allow, all through $proxy_label"
