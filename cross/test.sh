#!/usr/bin/env bash
# The cross-built agent on an emulated CPU against a real fleet-server on this machine:
#   cross/test.sh aarch64|armv7 [--requests N]
# Starts fleet-server on 127.0.0.1 (embedded broker, plain text on loopback), signs and publishes
# the tabular fixture bundle, then runs two agents side by side: the x86_64 build natively and
# the cross build under qemu-user (`qemu-<arch>-static -L /`, the multiarch libc6:<arch>). Each
# enrolls with its own token, gets the bundle deployed, and must answer the bundle's golden
# inputs; the two answers must agree within the bundle's golden tolerance. Then each is stopped
# with SIGTERM (must exit 0) and started again from its installed model.
#
# Prints, per agent: binary size, time from start to the first inference (first start: enroll,
# deploy, download, verify, self-test; restart: the installed model from disk) and the p50/p95 of
# N one-row MLP requests, with the qemu/native ratios, as Markdown rows for docs/BENCHMARKS.md.
#
# Needs: cross/build.sh <arch> and `cargo build --release --locked -p edge-agent -p fleet-server
# -p fleetctl` done (binaries under $CARGO_TARGET_DIR or target/), python3.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
target="${CARGO_TARGET_DIR:-$root/target}"
case "${1:-}" in
  aarch64) triple=aarch64-unknown-linux-gnu qemu=qemu-aarch64-static ;;
  armv7) triple=armv7-unknown-linux-gnueabihf qemu=qemu-arm-static ;;
  *) echo "usage: cross/test.sh aarch64|armv7 [--requests N]" >&2; exit 2 ;;
esac
arch=$1; shift
requests=1000
[ "${1:-}" = "--requests" ] && requests=$2
cross_bin="$target/$triple/release/edge-agent"
native_bin="$target/release/edge-agent"
for b in "$cross_bin" "$native_bin" "$target/release/fleet-server" "$target/release/fleetctl"; do
  [ -x "$b" ] || { echo "cross/test.sh: $b is missing: run cross/build.sh $arch and cargo build --release --locked -p edge-agent -p fleet-server -p fleetctl" >&2; exit 1; }
done
command -v "$qemu" >/dev/null || { echo "cross/test.sh: $qemu is missing: cross/build.sh $arch installs it" >&2; exit 1; }
fleetctl="$target/release/fleetctl"
measure="python3 $root/cross/measure.py"

work=$(mktemp -d "${TMPDIR:-/tmp}/edge-cross-test.XXXXXX")
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

http_port=$(free_port) mqtt_port=$(free_port)
export FLEET_SERVER="http://127.0.0.1:$http_port" FLEET_TOKEN=op-cross-test
"$fleetctl" keygen --out "$work/keys" --name release >/dev/null
"$target/release/fleet-server" --data-dir "$work/server" --listen "127.0.0.1:$http_port" --mqtt-listen "127.0.0.1:$mqtt_port" \
  --trusted-key "$work/keys/release.pub" --operator-token "$FLEET_TOKEN" >"$work/server.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -fs "$FLEET_SERVER/healthz" >/dev/null && break; sleep 0.1; done
"$fleetctl" bundle build --model "$root/tests/fixtures/models/mlp.onnx" --metadata "$root/tests/fixtures/bundles/tabular.toml" --out "$work/m.bundle" >/dev/null
"$fleetctl" bundle sign "$work/m.bundle" --key "$work/keys/release.key" >/dev/null
"$fleetctl" publish "$work/m.bundle" >/dev/null
tolerance=$(sed -n 's/^tolerance *= *//p' "$root/tests/fixtures/bundles/tabular.toml")
golden_inputs=$(python3 -c 'import json, sys; print(json.dumps([c["input"] for c in json.load(open(sys.argv[1]))["cases"]]))' "$root/tests/fixtures/models/mlp.golden.json")

# agent NAME [wrapper...]: writes its config, starts it, sets AGENT_PID and API.
agent_config() {
  local name=$1 port=$2 token=$3
  cat > "$work/$name.toml" <<CONFIG
server_url = "$FLEET_SERVER"
mqtt_url = "mqtt://127.0.0.1:$mqtt_port"
enrollment_token = "$token"
name = "$name"
data_dir = "$work/$name-data"
trusted_keys = ["$(cat "$work/keys/release.pub")"]
api_listen = "127.0.0.1:$port"
[intervals]
checkin_secs = 2.0
heartbeat_secs = 2.0
CONFIG
}
start_agent() { # start_agent NAME CMD...
  local name=$1; shift
  STARTED=$(date +%s.%N)
  "$@" --config "$work/$name.toml" >>"$work/$name.log" 2>&1 &
  AGENT_PID=$!
  pids+=("$AGENT_PID")
}
device_id() { # device_id NAME: waits until a device of that name has enrolled
  for _ in $(seq 600); do
    id=$("$fleetctl" devices --json | python3 -c 'import json, sys; print(next((d["id"] for d in json.load(sys.stdin) if d["name"] == sys.argv[1]), ""))' "$1")
    [ -n "$id" ] && { echo "$id"; return 0; }
    sleep 0.1
  done
  echo "cross/test.sh: $1 did not enroll; see $work/$1.log" >&2; return 1
}

declare -A first restart p50 p95 size
run_one() { # run_one NAME SIZE-OF CMD...
  local name=$1 bin=$2; shift 2
  local port token id
  port=$(free_port)
  token=$("$fleetctl" tokens create --count 1)
  agent_config "$name" "$port" "$token"
  local url="http://127.0.0.1:$port/v1/infer"
  start_agent "$name" "$@"
  id=$(device_id "$name")
  "$fleetctl" deploy --model tabular --version 1.0.0 --devices "$id" >/dev/null
  first[$name]=$($measure wait "$url" --since "$STARTED" --timeout 600)
  $measure answer "$url" "$golden_inputs" > "$work/$name.answer"
  read -r p50[$name] p95[$name] < <($measure latency "$url" "$requests")
  kill -TERM "$AGENT_PID"
  local status=0
  wait "$AGENT_PID" || status=$?
  [ "$status" -eq 0 ] || { echo "cross/test.sh: $name exited $status on SIGTERM, not 0; see $work/$name.log" >&2; exit 1; }
  start_agent "$name" "$@"
  restart[$name]=$($measure wait "$url" --since "$STARTED" --timeout 600)
  kill -TERM "$AGENT_PID"; wait "$AGENT_PID" || true
  size[$name]=$(stat -c %s "$bin")
  echo "$name: enrolled as $id; first inference ${first[$name]} s after start, ${restart[$name]} s after a restart; p50 ${p50[$name]} us"
}

run_one native "$native_bin" "$native_bin"
run_one "$arch" "$cross_bin" "$qemu" -L / "$cross_bin"

golden=$(python3 -c 'import json, sys; print(json.dumps([c["expected"] for c in json.load(open(sys.argv[1]))["cases"]]))' "$root/tests/fixtures/models/mlp.golden.json")
echo -n "x86_64 agent vs the golden outputs: "; $measure compare "$(cat "$work/native.answer")" "$golden" "$tolerance"
echo -n "$arch agent under qemu vs the x86_64 agent: "; $measure compare "$(cat "$work/$arch.answer")" "$(cat "$work/native.answer")" "$tolerance"

ratio() { python3 -c "import sys; print(f'{float(sys.argv[1]) / float(sys.argv[2]):.2f}x')" "$1" "$2"; }
mb() { python3 -c "import sys; print(f'{int(sys.argv[1]) / 1e6:.1f} MB')" "$1"; }
echo
echo "| $triple ($(date -u +%F), $qemu $($qemu --version | head -1 | awk '{print $3}')) | $arch under qemu-user | x86_64 native (same run) | ratio |"
echo "|---|---|---|---|"
echo "| stripped release edge-agent | $(mb "${size[$arch]}") | $(mb "${size[native]}") | $(ratio "${size[$arch]}" "${size[native]}") |"
echo "| start to first inference, first start (enroll, deploy, download, verify, self-test) | ${first[$arch]} s | ${first[native]} s | $(ratio "${first[$arch]}" "${first[native]}") |"
echo "| start to first inference, restart (installed model from disk) | ${restart[$arch]} s | ${restart[native]} s | $(ratio "${restart[$arch]}" "${restart[native]}") |"
echo "| MLP one-row request p50 ($requests sequential, keep-alive) | ${p50[$arch]} µs | ${p50[native]} µs | $(ratio "${p50[$arch]}" "${p50[native]}") |"
echo "| MLP one-row request p95 | ${p95[$arch]} µs | ${p95[native]} µs | $(ratio "${p95[$arch]}" "${p95[native]}") |"
