#!/usr/bin/env bash
# Instructions per request through the bare hyper proxy (the reference) and
# the gateway, pass-through and metered, counted by callgrind (repeatable on a
# noisy machine: it counts instructions, not time); each printed as a ratio
# to the bare proxy. Needs valgrind, curl, python3 and a release build:
#   cargo build --release -j2 -p creditgate -p creditgate-bench --bin creditgate --bin creditgate-bare-proxy
#   bench/profile/callgrind.sh [REQUESTS]        # default 2000 per mode
#   SCHEDULER=thread-per-core bench/profile/callgrind.sh 1000   # the gateway's [server] scheduler
# Leaves callgrind.{hyper-proxy,passthrough,metered}.out in $OUT (default
# target/callgrind) for `callgrind_annotate --inclusive=yes FILE`.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
bin="$root/target/release/creditgate"
bare="$root/target/release/creditgate-bare-proxy"
requests=${1:-2000}
out=${OUT:-$root/target/callgrind}
work=$(mktemp -d)
mkdir -p "$out"
port_proxy=${PORT_PROXY:-18080} port_admin=${PORT_ADMIN:-18081} port_mock=${PORT_MOCK:-18090}
port_bare=${PORT_BARE:-18082}
gateway="" proxy=""
cleanup() { kill $gateway $proxy "$mock" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

# The example config, on these ports, with caps out of the way and an
# unmetered route for the same endpoints under Host: passthrough.test.
sed -e "s#127.0.0.1:8090#127.0.0.1:$port_mock#; s#127.0.0.1:8080#127.0.0.1:$port_proxy#" \
    -e "s#127.0.0.1:8081#127.0.0.1:$port_admin#; s#file = \"prices.toml\"#file = \"$root/config/prices.toml\"#" \
    -e 's#^requests_per_minute = 600#requests_per_minute = 100000000#; s#^max_in_flight = 32#max_in_flight = 100000#' \
    -e 's#^level = "info"#level = "warn"#' "$root/config/gateway.toml" > "$work/gateway.toml"
if [ -n "${SCHEDULER:-}" ]; then
  sed -i "s#^\[server\]#[server]\nscheduler = \"$SCHEDULER\"#" "$work/gateway.toml"
fi
printf '\n[[routes]]\nprefix = "/v1"\nhost = "passthrough.test"\nupstream = "mock"\npassthrough = true\n' >> "$work/gateway.toml"

"$bin" mock-upstream --listen "127.0.0.1:$port_mock" > "$work/mock.log" 2>&1 & mock=$!
export CREDITGATE_ADMIN_TOKEN=callgrind-token
valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" \
  "$bin" serve --config "$work/gateway.toml" --data-dir "$work/data" > "$work/gateway.log" 2>&1 & gateway=$!
for _ in $(seq 1 120); do curl -sf -o /dev/null "127.0.0.1:$port_admin/healthz" && break; sleep 0.5; done

admin() { curl -sf -H "authorization: Bearer $CREDITGATE_ADMIN_TOKEN" -H "content-type: application/json" "$@"; }
field() { python3 -c "import json,sys; print(json.load(sys.stdin)[\"$1\"])"; }
org=$(admin -H "idempotency-key: callgrind-org" -d '{"name":"callgrind","contract":{"start":"'"$(date -u +%Y-%m-01)"'","years":1,"platform_allocation_per_year":"1000000"}}' \
  "127.0.0.1:$port_admin/admin/v1/orgs" | field id)
user=$(admin -d '{"name":"p","plan":"pro"}' "127.0.0.1:$port_admin/admin/v1/orgs/$org/users" | field id)
key=$(admin -d "{\"user\":$user}" "127.0.0.1:$port_admin/admin/v1/orgs/$org/keys" | field secret)

drive() { python3 "$root/bench/profile/drive.py" "$1" "$2" "$key" "${3:-$port_proxy}"; }
drive metered 300 && drive pass 300          # warm up pools, caches, the price table
for mode in metered pass; do
  callgrind_control -z "$gateway" > /dev/null 2>&1
  drive "$mode" "$requests"
  callgrind_control -d "$gateway" > /dev/null 2>&1
done
kill "$gateway"; wait "$gateway" 2>/dev/null || true
mv "$work/cg.out.1" "$out/callgrind.metered.out"; mv "$work/cg.out.2" "$out/callgrind.passthrough.out"

# The bare proxy: the same requests (the key is forwarded and ignored), as
# many worker threads as the gateway's runtime (one per core).
valgrind --tool=callgrind --callgrind-out-file="$work/bare.out" \
  "$bare" --listen "127.0.0.1:$port_bare" --upstream "127.0.0.1:$port_mock" --workers "$(nproc)" \
  > "$work/bare.log" 2>&1 & proxy=$!
for _ in $(seq 1 120); do grep -q "^listening on" "$work/bare.log" && break; sleep 0.5; done
drive bare 300 "$port_bare"
callgrind_control -z "$proxy" > /dev/null 2>&1
drive bare "$requests" "$port_bare"
callgrind_control -d "$proxy" > /dev/null 2>&1
kill "$proxy"; wait "$proxy" 2>/dev/null || true
mv "$work/bare.out.1" "$out/callgrind.hyper-proxy.out"

per_request() {
  total=$(callgrind_annotate "$out/callgrind.$1.out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
  echo $((total / requests))
}
reference=$(per_request hyper-proxy)
for mode in hyper-proxy passthrough metered; do
  count=$(per_request "$mode")
  ratio=$(awk -v a="$count" -v b="$reference" 'BEGIN { printf "%.2f", a / b }')
  echo "$mode: $count instructions per request (${ratio}x hyper-proxy, over $requests requests)"
done
