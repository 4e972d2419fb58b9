#!/usr/bin/env bash
# Boots the amd64 image under qemu-system-x86_64 (software emulation, no KVM) against a real
# fleet-server on this machine and checks that the device enrolls, heartbeats, installs a model
# and answers an inference, then powers it off and checks the agent stopped cleanly:
#   images/test-boot.sh [--arch amd64|arm64] [--image PATH] [--timeout SECONDS]
# amd64 boots the whole disk: BIOS, the image's MBR and syslinux. arm64 images have no boot
# loader (it is board-specific), so qemu's "virt" board boots the kernel and initrd taken from
# the image's boot partition directly, with the image as its disk: everything after the boot
# loader is the image's own (kernel, initrd, root file system, systemd, the agent).
#
# The guest reaches the host only through qemu's user-mode networking: its 10.0.2.2 is this
# machine's 127.0.0.1, where fleet-server listens. To the agent 10.0.2.2 is another host, so
# plain http:// would need allow_insecure; the test uses TLS instead, as a real fleet does: a CA
# from `fleetctl pki init`, a server certificate for 10.0.2.2, the CA pinned on the device with
# `fleetctl image configure --ca`. The guest's local API (0.0.0.0:8686 in this test's config) is
# forwarded to a port on 127.0.0.1.
#
# The image is not changed: a sparse copy is configured and booted. Prints the time from
# power-on to enrolled, to the first heartbeat, to the model active and to the first answer.
# Needs: images/build.sh --arch amd64 done, and the release fleet-server and fleetctl.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
target="${CARGO_TARGET_DIR:-$root/target}"
arch=amd64 image="" timeout=900
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) arch="$2"; shift 2 ;;
    --image) image="$2"; shift 2 ;;
    --timeout) timeout="$2"; shift 2 ;;
    *) echo "usage: images/test-boot.sh [--arch amd64|arm64] [--image PATH] [--timeout SECONDS]" >&2; exit 2 ;;
  esac
done
case "$arch" in
  amd64) image="${image:-$target/images/edge.img}" qemu=qemu-system-x86_64 qemu_pkgs="qemu-system-x86 seabios" ;;
  arm64) image="${image:-$target/images/edge-arm64.img}" qemu=qemu-system-aarch64 qemu_pkgs="qemu-system-arm" ;;
  *) echo "images/test-boot.sh: --arch must be amd64 or arm64" >&2; exit 2 ;;
esac
[ -f "$image" ] || { echo "images/test-boot.sh: no image at $image: run images/build.sh --arch $arch --out $image" >&2; exit 1; }
for b in fleet-server fleetctl; do
  [ -x "$target/release/$b" ] || { echo "images/test-boot.sh: $target/release/$b is missing: cargo build --release --locked -p fleet-server -p fleetctl" >&2; exit 1; }
done
missing=""
for p in $qemu_pkgs mtools fdisk; do
  [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" = installed ] || missing="$missing $p"
done
if [ -n "$missing" ]; then
  [ "$(id -u)" -eq 0 ] || { echo "images/test-boot.sh: install$missing (as root)" >&2; exit 1; }
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
fi
fleetctl="$target/release/fleetctl"
measure="python3 $root/cross/measure.py"
deadline=$(( $(date +%s) + timeout ))

work=$(mktemp -d "${TMPDIR:-/var/tmp}/edge-boot-test.XXXXXX")
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
fail() { echo "images/test-boot.sh: $*" >&2; echo "--- last console lines ($work/console.log):" >&2; tail -40 "$work/console.log" >&2 || true; exit 1; }
left() { echo $(( deadline - $(date +%s) )); }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
http_port=$(free_port) mqtt_port=$(free_port) api_port=$(free_port)

# The fleet: TLS with a private CA, a release key, the tabular bundle.
"$fleetctl" pki init --out "$work/pki/ca" >/dev/null
"$fleetctl" pki issue --ca "$work/pki/ca" --out "$work/pki/server" --host 10.0.2.2 --host 127.0.0.1 >/dev/null
"$fleetctl" keygen --out "$work/keys" --name release >/dev/null
export FLEET_SERVER="https://127.0.0.1:$http_port" FLEET_CA_FILE="$work/pki/ca/ca.pem" FLEET_TOKEN=op-boot-test
"$target/release/fleet-server" --data-dir "$work/server" --listen "127.0.0.1:$http_port" --mqtt-listen "127.0.0.1:$mqtt_port" \
  --tls-cert "$work/pki/server/server.pem" --tls-key "$work/pki/server/server.key" \
  --trusted-key "$work/keys/release.pub" --operator-token "$FLEET_TOKEN" >"$work/server.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -fs --cacert "$FLEET_CA_FILE" "$FLEET_SERVER/healthz" >/dev/null && break; sleep 0.1; done
"$fleetctl" bundle build --model "$root/tests/fixtures/models/mlp.onnx" --metadata "$root/tests/fixtures/bundles/tabular.toml" --out "$work/m.bundle" >/dev/null
"$fleetctl" bundle sign "$work/m.bundle" --key "$work/keys/release.key" >/dev/null
"$fleetctl" publish "$work/m.bundle" >/dev/null
token=$("$fleetctl" tokens create --count 1)

# The device: a copy of the image, configured as an operator would at flash time.
cp --sparse=always "$image" "$work/device.img"
"$fleetctl" image configure "$work/device.img" --server "https://10.0.2.2:$http_port" --mqtt "mqtts://10.0.2.2:$mqtt_port" \
  --enrollment-token "$token" --trusted-key "$work/keys/release.pub" --ca "$work/pki/ca/ca.pem" \
  --label site=qemu --api-listen 0.0.0.0:8686
# Test only: the journal on the serial console too, so a failure shows the agent's own lines.
boot_offset=$(( $(sfdisk --json "$work/device.img" | python3 -c 'import json, sys; print(json.load(sys.stdin)["partitiontable"]["partitions"][0]["start"])') * 512 ))
export MTOOLS_SKIP_CHECK=1
common=(-accel tcg -m 1024 -smp 2 -display none -no-reboot
  -serial "file:$work/console.log" -monitor "unix:$work/monitor.sock,server,nowait"
  -drive "file=$work/device.img,format=raw,if=virtio"
  -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$api_port-:8686" -device virtio-net-pci,netdev=n0,romfile=)
if [ "$arch" = amd64 ]; then
  mcopy -n -i "$work/device.img@@$boot_offset" ::/syslinux.cfg "$work/syslinux.cfg"
  sed -i 's/^\(  APPEND .*\)$/\1 systemd.journald.forward_to_console=1/' "$work/syslinux.cfg"
  mcopy -o -i "$work/device.img@@$boot_offset" "$work/syslinux.cfg" ::/syslinux.cfg
  boot=(qemu-system-x86_64 -machine pc "${common[@]}")
else
  mcopy -n -i "$work/device.img@@$boot_offset" ::/vmlinuz ::/initrd.img "$work/"
  boot=(qemu-system-aarch64 -machine virt -cpu cortex-a72 "${common[@]}" -kernel "$work/vmlinuz" -initrd "$work/initrd.img"
    -append "root=LABEL=edge-root ro rootwait console=ttyAMA0 systemd.journald.forward_to_console=1")
fi

powered_on=$(date +%s.%N)
"${boot[@]}" &
qemu_pid=$!
pids+=("$qemu_pid")
since() { python3 -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.1f}')" "$powered_on"; }
devices_json() { "$fleetctl" devices --json 2>/dev/null || echo '[]'; }
field() { python3 -c "import json, sys; d = [x for x in json.load(sys.stdin) if x['labels'].get('site') == 'qemu']; print(eval(sys.argv[1]) if d else '')" "$1"; }

id=""
while [ -z "$id" ]; do
  [ "$(left)" -gt 0 ] || fail "the device did not enroll within $timeout s"
  kill -0 "$qemu_pid" 2>/dev/null || fail "qemu exited before the device enrolled"
  id=$(devices_json | field 'd[0]["id"]')
  [ -n "$id" ] || sleep 1
done
enrolled=$(since)
name=$(devices_json | field 'd[0]["name"]')
echo "enrolled as $id ($name) ${enrolled} s after power-on"
case "$name" in edge-unconfigured|"") fail "the device kept the image's host name ($name)" ;; edge-*) ;; *) fail "unexpected device name $name" ;; esac

while [ -z "$(devices_json | field 'd[0]["health"] or ""')" ]; do
  [ "$(left)" -gt 0 ] || fail "no heartbeat from $id within $timeout s"
  sleep 1
done
heartbeat=$(since)
echo "first heartbeat stored ${heartbeat} s after power-on"

"$fleetctl" deploy --model tabular --version 1.0.0 --devices "$id" --wait --timeout-secs "$(left)" || fail "the model did not become active"
active=$(since)
echo "tabular 1.0.0 active ${active} s after power-on"
url="http://127.0.0.1:$api_port/v1/infer"
$measure wait "$url" --since "$powered_on" --timeout "$(left)" >/dev/null || fail "no answer through the forwarded port $api_port"
answered=$(since)
golden_inputs=$(python3 -c 'import json, sys; print(json.dumps([c["input"] for c in json.load(open(sys.argv[1]))["cases"]]))' "$root/tests/fixtures/models/mlp.golden.json")
golden=$(python3 -c 'import json, sys; print(json.dumps([c["expected"] for c in json.load(open(sys.argv[1]))["cases"]]))' "$root/tests/fixtures/models/mlp.golden.json")
tolerance=$(sed -n 's/^tolerance *= *//p' "$root/tests/fixtures/bundles/tabular.toml")
answer=$($measure answer "$url" "$golden_inputs") || fail "the inference request failed"
echo -n "the device's answers to the golden inputs: "
$measure compare "$answer" "$golden" "$tolerance" || fail "the device's answers differ from the golden outputs"

# Power off through ACPI: systemd stops the agent with SIGTERM.
# The monitor reads a command only after it has greeted: wait for its prompt, then for the echo.
python3 -c '
import socket, sys
s = socket.socket(socket.AF_UNIX); s.settimeout(30); s.connect(sys.argv[1])
seen = b""
while b"(qemu)" not in seen: seen += s.recv(4096)
s.sendall(b"system_powerdown\n")
seen = b""
while b"(qemu)" not in seen: seen += s.recv(4096)' "$work/monitor.sock"
stopping=$(date +%s)
while kill -0 "$qemu_pid" 2>/dev/null; do
  [ $(( $(date +%s) - stopping )) -lt 180 ] || fail "the guest did not power off within 180 s"
  sleep 1
done
# The serial console ends its lines with \r\n.
tr -d '\r' < "$work/console.log" > "$work/console.txt"
grep -q "edge-agent\[[0-9]*\]: .* stopped$" "$work/console.txt" || fail "the agent did not log its clean stop on power-off"
grep -q "edge-agent.service: Deactivated successfully" "$work/console.txt" || fail "edge-agent.service did not end with status 0 on power-off"
echo "powered off in $(( $(date +%s) - stopping )) s; the agent logged its clean stop and its unit ended with status 0"
echo
echo "| $arch image under $qemu, TCG, 2 vCPUs, 1 GiB ($(date -u +%F)) | seconds after power-on |"
echo "|---|---|"
echo "| enrolled | $enrolled |"
echo "| first heartbeat stored | $heartbeat |"
echo "| tabular 1.0.0 active (deployed once enrolled and heartbeating) | $active |"
echo "| first inference answered through the forwarded port | $answered |"
