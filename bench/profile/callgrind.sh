#!/usr/bin/env bash
# Instructions per request through the bare hyper proxy (the reference) and
# the gateway, pass-through and metered, counted by callgrind (repeatable on a
# noisy machine: it counts instructions, not time); each printed as a ratio
# to the bare proxy. Needs valgrind, curl, python3 and a release build:
#   cargo build --release -j2 -p creditgate -p creditgate-bench --bin creditgate --bin creditgate-bare-proxy
#   bench/profile/callgrind.sh [REQUESTS]        # default 2000 per mode
#   SCHEDULER=thread-per-core bench/profile/callgrind.sh 1000   # the gateway's [server] scheduler
# Then the cost of one SSE event in each mode: streams of 5 and of 45 content
# deltas (STREAMS of each, default 200), whose difference over the 40 extra
# events leaves out what a request costs whatever its length.
# The floors under the two routes run too (the bare proxy's `--floor auth|meter`).
# Leaves callgrind.{hyper-proxy,auth-floor,meter-floor,passthrough,metered}.out (and .sse-5.out,
# .sse-45.out) in $OUT (default target/callgrind) for
# `callgrind_annotate --inclusive=yes FILE`.
# valgrind runs one thread at a time; `--fair-sched=yes` hands the turn
# round fairly, so a thread spinning on a lock (sled's lazy thread pool at
# start) cannot keep out the thread that holds it.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
bin="$root/target/release/creditgate"
bare="$root/target/release/creditgate-bare-proxy"
requests=${1:-2000}
streams=${STREAMS:-200}
short_events=5 long_events=45
out=${OUT:-$root/target/callgrind}
work=$(mktemp -d)
mkdir -p "$out"
port_proxy=${PORT_PROXY:-18080} port_admin=${PORT_ADMIN:-18081} port_mock=${PORT_MOCK:-18090}
port_bare=${PORT_BARE:-18082}
gateway="" proxy=""
cleanup() { kill $gateway $proxy "$mock" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

# The example config, on these ports, with caps out of the way and an
# unmetered route for the same endpoints under Host: passthrough.test
# (through an origin of its own, the same mock named `localhost`: a
# host-bound pass-through route never takes a path a metered route of its
# origin claims).
sed -e "s#127.0.0.1:8090#127.0.0.1:$port_mock#; s#127.0.0.1:8080#127.0.0.1:$port_proxy#" \
    -e "s#127.0.0.1:8081#127.0.0.1:$port_admin#; s#file = \"prices.toml\"#file = \"$root/config/prices.toml\"#" \
    -e 's#^requests_per_minute = 600#requests_per_minute = 100000000#; s#^max_in_flight = 32#max_in_flight = 100000#' \
    -e 's#^level = "info"#level = "warn"#' "$root/config/gateway.toml" > "$work/gateway.toml"
if [ -n "${SCHEDULER:-}" ]; then
  sed -i "s#^\[server\]#[server]\nscheduler = \"$SCHEDULER\"#" "$work/gateway.toml"
fi
printf '\n[upstreams.mock-direct]\nbase_url = "http://localhost:%s"\npool_max_idle_per_host = 256\n' "$port_mock" >> "$work/gateway.toml"
printf '\n[[routes]]\nprefix = "/v1"\nhost = "passthrough.test"\nupstream = "mock-direct"\npassthrough = true\nmethods = ["POST"]\n' >> "$work/gateway.toml"

"$bin" mock-upstream --listen "127.0.0.1:$port_mock" > "$work/mock.log" 2>&1 & mock=$!
export CREDITGATE_ADMIN_TOKEN=callgrind-token
valgrind --tool=callgrind --fair-sched=yes --callgrind-out-file="$work/cg.out" \
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
# One dump per measured run, numbered in this order.
measure() { # TARGET-PID MODE N [EVENTS] [PORT]
  callgrind_control -z "$1" > /dev/null 2>&1
  python3 "$root/bench/profile/drive.py" "$2" "$3" "$key" "${5:-$port_proxy}" ${4:+"$4"}
  callgrind_control -d "$1" > /dev/null 2>&1
}
for mode in metered pass; do
  measure "$gateway" "$mode" "$requests"
done
for mode in metered pass; do
  for events in $short_events $long_events; do measure "$gateway" "$mode" "$streams" "$events"; done
done
kill "$gateway"; wait "$gateway" 2>/dev/null || true
mv "$work/cg.out.1" "$out/callgrind.metered.out"; mv "$work/cg.out.2" "$out/callgrind.passthrough.out"
mv "$work/cg.out.3" "$out/callgrind.metered.sse-$short_events.out"; mv "$work/cg.out.4" "$out/callgrind.metered.sse-$long_events.out"
mv "$work/cg.out.5" "$out/callgrind.passthrough.sse-$short_events.out"; mv "$work/cg.out.6" "$out/callgrind.passthrough.sse-$long_events.out"

# The bare proxy: the same requests (the key is forwarded and ignored), as
# many worker threads as the gateway's runtime (one per core); then the same
# binary as the floors under the pass-through and the metered routes
# (`--floor auth|meter`: the least work those routes must add).
echo "$key" > "$work/keys"
for name in hyper-proxy auth-floor meter-floor; do
  case $name in
    hyper-proxy) floor=() ;;
    auth-floor) floor=(--floor auth --keys "$work/keys") ;;
    meter-floor) floor=(--floor meter --keys "$work/keys" --models gpt-4o-mini --data-dir "$work/floor-data") ;;
  esac
  valgrind --tool=callgrind --fair-sched=yes --callgrind-out-file="$work/$name.out" \
    "$bare" --listen "127.0.0.1:$port_bare" --upstream "127.0.0.1:$port_mock" --workers "$(nproc)" "${floor[@]}" \
    > "$work/$name.log" 2>&1 & proxy=$!
  for _ in $(seq 1 120); do grep -q "^listening on" "$work/$name.log" && break; sleep 0.5; done
  drive bare 300 "$port_bare"
  measure "$proxy" bare "$requests" "" "$port_bare"
  for events in $short_events $long_events; do measure "$proxy" bare "$streams" "$events" "$port_bare"; done
  kill "$proxy"; wait "$proxy" 2>/dev/null || true
  mv "$work/$name.out.1" "$out/callgrind.$name.out"
  mv "$work/$name.out.2" "$out/callgrind.$name.sse-$short_events.out"; mv "$work/$name.out.3" "$out/callgrind.$name.sse-$long_events.out"
done

total() { callgrind_annotate "$out/callgrind.$1.out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}'; }
per_request() { echo $(( $(total "$1") / requests )); }
reference=$(per_request hyper-proxy)
for mode in hyper-proxy auth-floor passthrough meter-floor metered; do
  count=$(per_request "$mode")
  ratio=$(awk -v a="$count" -v b="$reference" 'BEGIN { printf "%.2f", a / b }')
  echo "$mode: $count instructions per request (${ratio}x hyper-proxy, over $requests requests)"
done
# Each route against the floor under it.
for pair in passthrough:auth-floor metered:meter-floor; do
  mode=${pair%%:*} floor=${pair##*:}
  ratio=$(awk -v a="$(per_request "$mode")" -v b="$(per_request "$floor")" 'BEGIN { printf "%.2f", a / b }')
  echo "$mode / $floor: ${ratio}x instructions per request"
done

# One event: (long run - short run) / (the long run's extra events).
extra=$(( streams * (long_events - short_events) ))
bare_event=$(( ($(total hyper-proxy.sse-$long_events) - $(total hyper-proxy.sse-$short_events)) / extra ))
for mode in hyper-proxy auth-floor passthrough meter-floor metered; do
  per_event=$(( ($(total "$mode.sse-$long_events") - $(total "$mode.sse-$short_events")) / extra ))
  ratio=$(awk -v a="$per_event" -v b="$bare_event" 'BEGIN { printf "%.2f", a / b }')
  echo "$mode: $per_event instructions per SSE event (${ratio}x hyper-proxy; $streams streams of $short_events and of $long_events deltas)"
done
