#!/usr/bin/env bash
# Instructions per request through the gateway, metered vs pass-through,
# counted by callgrind (repeatable on a noisy machine: it counts
# instructions, not time). Needs valgrind, curl, python3 and a release build:
#   cargo build --release -j2 --bin creditgate
#   bench/profile/callgrind.sh [REQUESTS]        # default 2000 per mode
# Leaves callgrind.metered.out and callgrind.passthrough.out in $OUT (default
# target/callgrind) for `callgrind_annotate --inclusive=yes FILE`.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
bin="$root/target/release/creditgate"
requests=${1:-2000}
out=${OUT:-$root/target/callgrind}
work=$(mktemp -d)
mkdir -p "$out"
port_proxy=${PORT_PROXY:-18080} port_admin=${PORT_ADMIN:-18081} port_mock=${PORT_MOCK:-18090}
cleanup() { kill "$gateway" "$mock" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

# The example config, on these ports, with caps out of the way and an
# unmetered route for the same endpoints under Host: passthrough.test.
sed -e "s#127.0.0.1:8090#127.0.0.1:$port_mock#; s#127.0.0.1:8080#127.0.0.1:$port_proxy#" \
    -e "s#127.0.0.1:8081#127.0.0.1:$port_admin#; s#file = \"prices.toml\"#file = \"$root/config/prices.toml\"#" \
    -e 's#^requests_per_minute = 600#requests_per_minute = 100000000#; s#^max_in_flight = 32#max_in_flight = 100000#' \
    -e 's#^level = "info"#level = "warn"#' "$root/config/gateway.toml" > "$work/gateway.toml"
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

drive() { python3 "$root/bench/profile/drive.py" "$1" "$2" "$key" "$port_proxy"; }
drive metered 300 && drive pass 300          # warm up pools, caches, the price table
for mode in metered pass; do
  callgrind_control -z "$gateway" > /dev/null 2>&1
  drive "$mode" "$requests"
  callgrind_control -d "$gateway" > /dev/null 2>&1
done
kill "$gateway"; wait "$gateway" 2>/dev/null || true
mv "$work/cg.out.1" "$out/callgrind.metered.out"; mv "$work/cg.out.2" "$out/callgrind.passthrough.out"
for mode in metered passthrough; do
  total=$(callgrind_annotate "$out/callgrind.$mode.out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
  echo "$mode: $((total / requests)) instructions per request (${total} over $requests requests)"
done
