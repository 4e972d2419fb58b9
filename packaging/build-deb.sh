#!/usr/bin/env bash
# Builds the edge-agent .deb from an already built binary:
#   packaging/build-deb.sh --arch amd64|arm64|armhf [--binary PATH] [--version V] [--out DIR] [--fast]
# Default binary: the release build for that architecture (cargo build --release for amd64,
# cross/build.sh aarch64|armv7 for arm64|armhf), under $CARGO_TARGET_DIR or target/. Default
# output: <target>/deb/edge-agent_<version>_<arch>.deb. Prints the path of the package.
#
# Contents: /usr/bin/edge-agent, the systemd unit, /etc/edge-agent/agent.toml (a conffile), the
# man page, the annotated example config, and maintainer scripts that create the edge-agent user,
# keep /var/lib/edge-agent on upgrade and remove it only on purge.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
target="${CARGO_TARGET_DIR:-$root/target}"

arch="" binary="" version="" out="" compress=(-Zxz)
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) arch="$2"; shift 2 ;;
    --binary) binary="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --fast) compress=(-Zgzip -z1); shift ;;  # for tests: seconds instead of a minute for big binaries
    *) echo "usage: packaging/build-deb.sh --arch amd64|arm64|armhf [--binary PATH] [--version V] [--out DIR] [--fast]" >&2; exit 2 ;;
  esac
done
case "$arch" in
  amd64) default_binary="$target/release/edge-agent" ;;
  arm64) default_binary="$target/aarch64-unknown-linux-gnu/release/edge-agent" ;;
  armhf) default_binary="$target/armv7-unknown-linux-gnueabihf/release/edge-agent" ;;
  *) echo "packaging/build-deb.sh: --arch must be amd64, arm64 or armhf" >&2; exit 2 ;;
esac
binary="${binary:-$default_binary}"
[ -x "$binary" ] || { echo "packaging/build-deb.sh: no executable at $binary; build it first (README: cross/, docs/FLASHING.md)" >&2; exit 1; }
if [ -z "$version" ]; then
  version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$root/Cargo.toml")
fi
out="${out:-$target/deb}"
mkdir -p "$out"

# Reproducible: every timestamp is the last commit's.
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git -C "$root" log -1 --format=%ct 2>/dev/null || date +%s)}"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
pkg="$stage/pkg"
install -d "$pkg/DEBIAN" "$pkg/usr/bin" "$pkg/lib/systemd/system" "$pkg/etc/edge-agent" \
  "$pkg/usr/share/doc/edge-agent/examples" "$pkg/usr/share/man/man8"
install -m 0755 "$binary" "$pkg/usr/bin/edge-agent"
install -m 0644 "$root/packaging/edge-agent.service" "$pkg/lib/systemd/system/edge-agent.service"
# 0644 in the archive (it ships no secret); postinst makes it root:edge-agent 0640 with a
# statoverride before any token is written into it.
install -m 0644 "$root/packaging/agent.toml" "$pkg/etc/edge-agent/agent.toml"
install -m 0644 "$root/agent/edge-agent.example.toml" "$pkg/usr/share/doc/edge-agent/examples/edge-agent.example.toml"
install -m 0644 "$root/packaging/debian/copyright" "$pkg/usr/share/doc/edge-agent/copyright"
gzip -9n < "$root/packaging/edge-agent.8" > "$pkg/usr/share/man/man8/edge-agent.8.gz"
commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
cat > "$stage/changelog" <<CHANGES
edge-agent ($version) unstable; urgency=medium

  * Built from edge-ml-fleet commit $commit.

 -- edge-ml-fleet maintainers <maintainers@example.org>  $(date -u -R -d "@$SOURCE_DATE_EPOCH")
CHANGES
gzip -9n < "$stage/changelog" > "$pkg/usr/share/doc/edge-agent/changelog.gz"
chmod 0644 "$pkg/usr/share/man/man8/edge-agent.8.gz" "$pkg/usr/share/doc/edge-agent/changelog.gz"
install -m 0755 "$root/packaging/debian/postinst" "$root/packaging/debian/prerm" "$root/packaging/debian/postrm" "$pkg/DEBIAN/"
echo /etc/edge-agent/agent.toml > "$pkg/DEBIAN/conffiles"

# Shared libraries the binary needs, as Debian dependencies (dpkg-shlibdeps wants a debian/ tree;
# a foreign architecture's libraries are found through multiarch, e.g. libc6:arm64).
mkdir -p "$stage/src/debian"
printf 'Source: edge-agent\n\nPackage: edge-agent\nArchitecture: any\n' > "$stage/src/debian/control"
shlibs=$(cd "$stage/src" && dpkg-shlibdeps -O -e"$pkg/usr/bin/edge-agent" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
[ -n "$shlibs" ] || { echo "packaging/build-deb.sh: dpkg-shlibdeps found no libraries for $binary (is libc6:$arch installed?)" >&2; exit 1; }

cat > "$pkg/DEBIAN/control" <<CONTROL
Package: edge-agent
Version: $version
Architecture: $arch
Maintainer: edge-ml-fleet maintainers <maintainers@example.org>
Installed-Size: $(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
Depends: $shlibs, adduser
Section: misc
Priority: optional
Description: edge ML agent: signed model bundles, local inference, fleet telemetry
 edge-agent runs on an edge device. It enrolls with a fleet server, downloads
 the signed model bundles assigned to the device, verifies them (signature,
 digests, model contract, golden inputs) before switching to them atomically
 with the previous version kept for rollback, serves inference on a local HTTP
 API, buffers telemetry in SQLite and reports drift and health over MQTT.
CONTROL
(cd "$pkg" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) > "$pkg/DEBIAN/md5sums"
chmod 0644 "$pkg/DEBIAN/control" "$pkg/DEBIAN/conffiles" "$pkg/DEBIAN/md5sums"
find "$pkg" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
deb="$out/edge-agent_${version}_${arch}.deb"
dpkg-deb --root-owner-group "${compress[@]}" --build "$pkg" "$deb" >/dev/null
echo "$deb"
