#!/usr/bin/env bash
# A bundle download over a 16 kbit/s link that also drops every connection after a quarter of the
# bundle: runs the ignored test of tests/tests/deployments_end.rs inside a network namespace whose
# loopback is throttled with tbf (this kernel has no netem). Needs root. Record the printed line
# in docs/DELIVERY.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
NS=fleet-slow
cargo test --locked -p fleet-tests --test deployments_end --no-run
ip netns del "$NS" 2>/dev/null || true
ip netns add "$NS"
trap 'ip netns del "$NS"' EXIT
ip netns exec "$NS" ip link set lo mtu 1500
ip netns exec "$NS" ip link set lo up
ip netns exec "$NS" tc qdisc add dev lo root tbf rate 16kbit burst 3000 latency 2s
ip netns exec "$NS" cargo test --locked -p fleet-tests --test deployments_end -- --ignored --nocapture 2>&1 \
  | grep -E "arrived in|test result|panicked"
