#!/usr/bin/env bash
# The long kill -9 run: the harness of tests/tests/kill9_harness.rs with 1,000 cycles (CI runs
# 200). Prints the harness's summary line; record it in docs/DELIVERY.md with the date and commit.
set -euo pipefail
cd "$(dirname "$0")/../.."
KILL9_CYCLES="${KILL9_CYCLES:-1000}" cargo test --locked -p fleet-tests --test kill9_harness -- --nocapture 2>&1 \
  | grep -E "kill -9 cycles|test result|panicked"
