#!/usr/bin/env bash
# Runs every fuzz target for RUNS executions (default 1,000,000) with AddressSanitizer, on the
# stable toolchain (RUSTC_BOOTSTRAP lets cargo-fuzz use the nightly-only flags it needs).
# Installs cargo-fuzz first if missing. Findings land in fuzz/artifacts/<target>/.
# Usage: fuzz/run.sh [RUNS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")"
runs="${1:-1000000}"
shift || true
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(RUSTC_BOOTSTRAP=1 cargo fuzz list)
fi
for target in "${targets[@]}"; do
  mkdir -p "corpus/$target"
  if [ -d "seeds/$target" ]; then cp -n seeds/"$target"/* "corpus/$target/"; fi
  echo "== $target: $runs runs"
  start=$(date +%s)
  status=0
  RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" "corpus/$target" -- -runs="$runs" -max_len=65536 -print_final_stats=1 \
    > "corpus/$target.log" 2>&1 || status=$?
  grep -E "^(stat::number_of_executed_units|stat::peak_rss_mb|SUMMARY)|panicked" "corpus/$target.log" || true
  echo "   exit $status, $(( $(date +%s) - start )) s (log: fuzz/corpus/$target.log)"
done
