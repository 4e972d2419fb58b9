#!/usr/bin/env bash
# Installs the amd64 edge-agent .deb into a throw-away Debian root (debootstrap minbase + systemd,
# entered with chroot: no container, no boot) and checks what the package promises:
#   packaging/test-deb.sh [--binary PATH] [--lint]
# The .deb is built here by packaging/build-deb.sh from --binary (default: the release build),
# twice (versions V and V+upgrade) to test an upgrade. Checks, in order: files, modes and owners;
# the system user; the unit's directives and `systemd-analyze verify`; the unit enabled; the
# agent run as its user refusing the shipped (incomplete) config with status 78; an upgrade that
# keeps the state directory and the edited conffile; remove keeps state and config; purge
# deletes both. --lint also runs lintian on the package. Needs root; installs debootstrap,
# dpkg-dev and binutils (and lintian) with apt-get when missing. The root is cached in
# $EDGE_IMAGE_CACHE (default /var/cache/edge-image).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
target="${CARGO_TARGET_DIR:-$root/target}"
binary="$target/release/edge-agent" lint=false
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary="$2"; shift 2 ;;
    --lint) lint=true; shift ;;
    *) echo "usage: packaging/test-deb.sh [--binary PATH] [--lint]" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" -eq 0 ] || { echo "packaging/test-deb.sh: needs root (chroot)" >&2; exit 1; }
need=(debootstrap dpkg-dev binutils)
$lint && need+=(lintian)
for p in "${need[@]}"; do
  if [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" != installed ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$p"
  fi
done

work=$(mktemp -d "${TMPDIR:-/var/tmp}/edge-deb-test.XXXXXX")
chroot_dir="$work/root"
cleanup() {
  mountpoint -q "$chroot_dir/proc" 2>/dev/null && umount -l "$chroot_dir/proc"
  rm -rf "$work"
}
trap cleanup EXIT
failures=0 checks=0
check() { # check "what" command...
  local what=$1; shift
  checks=$((checks + 1))
  if "$@" >/dev/null 2>&1; then echo "ok   $what"; else echo "FAIL $what"; failures=$((failures + 1)); fi
}
in_root() { chroot "$chroot_dir" "$@"; }

# A debug build (CI passes target/debug/edge-agent) carries ~0.5 GB of debug info: drop it first.
cp "$binary" "$work/edge-agent"
strip --strip-debug "$work/edge-agent"
binary="$work/edge-agent"
version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$root/Cargo.toml")
deb1=$("$root/packaging/build-deb.sh" --arch amd64 --binary "$binary" --version "$version" --out "$work/debs" --fast)
deb2=$("$root/packaging/build-deb.sh" --arch amd64 --binary "$binary" --version "$version+upgrade" --out "$work/debs" --fast)

# The throw-away root: debootstrap once, then unpacked from the cache on each run.
cache="${EDGE_IMAGE_CACHE:-/var/cache/edge-image}"
tarball="$cache/deb-test-root-bookworm-amd64.tar"
if [ ! -f "$tarball" ]; then
  mkdir -p "$cache/bookworm-amd64"
  mirror=$(awk '/^URIs:/ { uri = $2 } /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == "bookworm" && uri != "") { print uri; exit } }
                /^deb / { for (i = 2; i <= NF; i++) if ($i ~ /:\/\//) { if ($(i + 1) == "bookworm") { print $i; exit } } }' \
           /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | head -1)
  echo "debootstrap of the test root from $mirror (cached in $tarball afterwards)"
  debootstrap --variant=minbase --include=adduser,systemd --cache-dir="$cache/bookworm-amd64" bookworm "$work/fresh" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
  tar -C "$work/fresh" -cf "$tarball.part" . && mv "$tarball.part" "$tarball"
  rm -rf "$work/fresh"
fi
mkdir -p "$chroot_dir"
tar -C "$chroot_dir" -xf "$tarball"
mount -t proc proc "$chroot_dir/proc"
cp "$deb1" "$deb2" "$chroot_dir/tmp/"

echo "== install $(basename "$deb1")"
in_root dpkg -i "/tmp/$(basename "$deb1")" >/dev/null
check "the binary is /usr/bin/edge-agent and runs" in_root /usr/bin/edge-agent --version
check "the unit is in /lib/systemd/system" test -f "$chroot_dir/lib/systemd/system/edge-agent.service"
unit="$chroot_dir/lib/systemd/system/edge-agent.service"
for directive in "User=edge-agent" "Restart=always" "StateDirectory=edge-agent" "ConfigurationDirectory=edge-agent" \
                 "ProtectSystem=strict" "NoNewPrivileges=yes" "PrivateTmp=yes" "StandardOutput=journal" \
                 "ExecReload=/bin/sh -c 'kill -HUP \$MAINPID'" "ExecStart=/usr/bin/edge-agent --config /etc/edge-agent/agent.toml"; do
  check "the unit says $directive" grep -qxF "$directive" "$unit"
done
check "systemd-analyze verify accepts the unit" in_root systemd-analyze verify --man=no /lib/systemd/system/edge-agent.service
check "the unit is enabled (multi-user.target.wants)" test -L "$chroot_dir/etc/systemd/system/multi-user.target.wants/edge-agent.service"
check "the man page is installed" test -f "$chroot_dir/usr/share/man/man8/edge-agent.8.gz"
check "the example config is installed" test -f "$chroot_dir/usr/share/doc/edge-agent/examples/edge-agent.example.toml"
passwd_line=$(in_root getent passwd edge-agent || true)
uid=$(echo "$passwd_line" | cut -d: -f3)
check "edge-agent is a system user ($passwd_line)" test -n "$uid" -a "${uid:-1000}" -lt 1000
check "its home is /var/lib/edge-agent and it has no login shell" \
  bash -c "[ \"$(echo "$passwd_line" | cut -d: -f6,7)\" = /var/lib/edge-agent:/usr/sbin/nologin ]"
check "the group edge-agent exists" in_root getent group edge-agent
check "agent.toml is root:edge-agent 0640 (it will hold the enrollment token)" \
  bash -c "[ \"$(in_root stat -c %U:%G:%a /etc/edge-agent/agent.toml)\" = root:edge-agent:640 ]"
check "agent.toml is a conffile" bash -c "chroot '$chroot_dir' dpkg-query -W -f='\${Conffiles}' edge-agent | grep -q /etc/edge-agent/agent.toml"
check "/var/lib/edge-agent is edge-agent's, 0750" \
  bash -c "[ \"$(in_root stat -c %U:%G:%a /var/lib/edge-agent)\" = edge-agent:edge-agent:750 ]"
set +e
refusal=$(chroot --userspec=edge-agent:edge-agent "$chroot_dir" /usr/bin/edge-agent --config /etc/edge-agent/agent.toml 2>&1)
status=$?
set -e
check "the agent, as its user, refuses the shipped config with status 78 (got $status)" test "$status" -eq 78
check "and says what is missing" bash -c "grep -q 'neither root_file nor trusted_keys' <<<\"\$1\"" _ "$refusal"
check "its log lines carry no colour codes when not on a terminal" bash -c "! grep -q $'\x1b' <<<\"\$1\"" _ "$refusal"

echo "== upgrade to $(basename "$deb2") with an edited conffile and state on disk"
echo "# edited by the operator" >> "$chroot_dir/etc/edge-agent/agent.toml"
echo "identity" > "$chroot_dir/var/lib/edge-agent/agent.db"
in_root dpkg -i --force-confold "/tmp/$(basename "$deb2")" >/dev/null
check "the new version is installed" bash -c "[ \"$(in_root dpkg-query -W -f='${Version}' edge-agent)\" = '$version+upgrade' ]"
check "the state directory is kept on upgrade" grep -qx identity "$chroot_dir/var/lib/edge-agent/agent.db"
check "the edited conffile is kept on upgrade" grep -q "edited by the operator" "$chroot_dir/etc/edge-agent/agent.toml"
check "agent.toml is still root:edge-agent 0640" \
  bash -c "[ \"$(in_root stat -c %U:%G:%a /etc/edge-agent/agent.toml)\" = root:edge-agent:640 ]"

echo "== remove"
in_root dpkg -r edge-agent >/dev/null
check "the binary is gone" test ! -e "$chroot_dir/usr/bin/edge-agent"
check "the state directory is kept on remove" grep -qx identity "$chroot_dir/var/lib/edge-agent/agent.db"
check "the config is kept on remove" test -f "$chroot_dir/etc/edge-agent/agent.toml"

echo "== purge"
in_root dpkg -P edge-agent >/dev/null
check "the state directory is deleted on purge" test ! -e "$chroot_dir/var/lib/edge-agent"
check "the config is deleted on purge" test ! -e "$chroot_dir/etc/edge-agent"
check "the statoverride is gone" bash -c "! chroot '$chroot_dir' dpkg-statoverride --list /etc/edge-agent/agent.toml"
check "the unit's enablement is gone" test ! -e "$chroot_dir/etc/systemd/system/multi-user.target.wants/edge-agent.service"

if $lint; then
  echo "== lintian $(basename "$deb1")"
  lintian --info --display-info "$deb1" | tee "$work/lintian.txt" || true
  check "lintian reports no errors or warnings" bash -c "! grep -qE '^(E|W):' '$work/lintian.txt'"
fi

echo "$((checks - failures)) passed, $failures failed"
[ "$failures" -eq 0 ]
