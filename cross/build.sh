#!/usr/bin/env bash
# Builds the release, stripped edge-agent for a device target on this x86_64 Debian machine:
#   cross/build.sh aarch64   -> target/aarch64-unknown-linux-gnu/release/edge-agent
#   cross/build.sh armv7     -> target/armv7-unknown-linux-gnueabihf/release/edge-agent
# (under $CARGO_TARGET_DIR instead of target/ when that is set).
#
# `rustup target add` cannot fetch targets here, so the compiler and the target's standard
# library come from Debian (rustc-web, libstd-rust-web-dev:<arch>) with Debian's cross gcc as the
# linker. What is missing is installed first with apt-get (root only); a second run installs
# nothing. qemu-user-static and the target's libc6 are installed too, for cross/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { echo "usage: cross/build.sh aarch64|armv7 [--install-only]" >&2; exit 2; }
[ $# -ge 1 ] || usage
case "$1" in
  aarch64) triple=aarch64-unknown-linux-gnu debarch=arm64 gnu=aarch64-linux-gnu ;;
  armv7) triple=armv7-unknown-linux-gnueabihf debarch=armhf gnu=arm-linux-gnueabihf ;;
  *) usage ;;
esac
install_only=false
[ "${2:-}" = "--install-only" ] && install_only=true

packages=(rustc-web "libstd-rust-web-dev:$debarch" "gcc-$gnu" "libc6-dev-$debarch-cross" "libc6:$debarch" qemu-user-static)

missing=()
for p in "${packages[@]}"; do
  if [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" != installed ]; then missing+=("$p"); fi
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "cross/build.sh: missing packages ${missing[*]}; run this script as root once to install them" >&2
    exit 1
  fi
  echo "installing: ${missing[*]}"
  if ! dpkg --print-foreign-architectures | grep -qx "$debarch"; then
    dpkg --add-architecture "$debarch"
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
$install_only && exit 0

rustc=/usr/bin/rustc
if [ ! -d "$("$rustc" --print sysroot)/lib/rustlib/$triple/lib" ]; then
  echo "cross/build.sh: $rustc has no standard library for $triple (libstd-rust-web-dev:$debarch is not usable)" >&2
  exit 1
fi
echo "compiler: $("$rustc" --version) for $triple"

upper=$(echo "$triple" | tr '[:lower:]-' '[:upper:]_')
under=$(echo "$triple" | tr '-' '_')
export RUSTC="$rustc"
export "CARGO_TARGET_${upper}_LINKER=$gnu-gcc"
export "CC_${under}=$gnu-gcc" "AR_${under}=$gnu-ar"
start=$(date +%s)
cargo build --release --locked --target "$triple" -p edge-agent
out="${CARGO_TARGET_DIR:-target}/$triple/release/edge-agent"
echo "built $out in $(( $(date +%s) - start )) s: $(stat -c %s "$out") bytes"
file "$out" 2>/dev/null || true
