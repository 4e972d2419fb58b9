#!/usr/bin/env bash
# Builds a flashable Debian disk image with the edge-agent .deb installed and enabled:
#   images/build.sh --arch amd64|arm64 --out edge.img [--deb PATH] [--kernel generic|cloud]
#                   [--include PKG,PKG] [--suite bookworm]
# Run as root (debootstrap, chroot). Missing host tools are installed with apt-get first. The
# Debian mirror is the one this machine's apt sources name.
#
# The disk (MBR):
#   1  FAT32 "EDGEBOOT", 256 MiB, mounted at /boot/firmware: syslinux (amd64), vmlinuz,
#      initrd.img, and edge-agent/ where `fleetctl image configure` writes the device's config
#   2  ext4 "edge-root": the Debian root file system (minbase + systemd, networkd with DHCP,
#      resolved, timesyncd, the kernel, the agent)
# amd64 images boot on a BIOS PC or under qemu-system-x86_64. arm64 images carry the arm64
# kernel and initrd on the boot partition but no boot loader: that is board-specific
# (images/test-boot.sh --arch arm64 hands them to qemu's virt board directly).
# Also writes <out>.bmap for bmaptool. Prints the image's path and sizes.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
target="${CARGO_TARGET_DIR:-$root/target}"

usage() {
  echo "usage: images/build.sh --arch amd64|arm64 --out edge.img [--deb PATH] [--kernel generic|cloud] [--include PKG,PKG] [--suite SUITE]" >&2
  exit 2
}
arch="" out="" deb="" kernel=generic extra="" suite=bookworm
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) arch="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --deb) deb="$2"; shift 2 ;;
    --kernel) kernel="$2"; shift 2 ;;
    --include) extra=",$2"; shift 2 ;;
    --suite) suite="$2"; shift 2 ;;
    *) usage ;;
  esac
done
[ -n "$out" ] || usage
case "$arch" in amd64|arm64) ;; *) usage ;; esac
case "$kernel" in
  generic) kernel_pkg="linux-image-$arch" ;;
  cloud) kernel_pkg="linux-image-cloud-$arch" ;;
  *) usage ;;
esac
[ "$(id -u)" -eq 0 ] || { echo "images/build.sh: run as root (debootstrap and chroot need it)" >&2; exit 1; }
version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$root/Cargo.toml")
deb="${deb:-$target/deb/edge-agent_${version}_${arch}.deb}"
[ -f "$deb" ] || { echo "images/build.sh: no package at $deb; build it with packaging/build-deb.sh --arch $arch (docs/FLASHING.md)" >&2; exit 1; }

# Host tools, installed once.
tools=(debootstrap dosfstools mtools fdisk e2fsprogs bmap-tools)
[ "$arch" = amd64 ] && tools+=(syslinux syslinux-common)
[ "$arch" = arm64 ] && tools+=(qemu-user-static)
missing=()
for p in "${tools[@]}"; do
  [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" = installed ] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The mirror: the first URI of this machine's apt sources that serves $suite (deb822 or one-line).
mirror=$(awk -v suite="$suite" '
  /^URIs:/ { uri = $2 }
  /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite && uri != "") { print uri; exit } }
  /^deb / { for (i = 2; i <= NF; i++) if ($i ~ /:\/\//) { if ($(i + 1) == suite) { print $i; exit } } }
' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | head -1)
[ -n "$mirror" ] || { echo "images/build.sh: no apt source for $suite in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/var/tmp}/edge-image.XXXXXX")
rootfs="$work/rootfs"
cleanup() {
  for m in proc sys dev; do mountpoint -q "$rootfs/$m" 2>/dev/null && umount -l "$rootfs/$m"; done
  rm -rf "$work"
}
trap cleanup EXIT
cache="${EDGE_IMAGE_CACHE:-/var/cache/edge-image}/$suite-$arch"
mkdir -p "$cache"
start=$(date +%s)

packages="systemd-sysv,udev,dbus,systemd-resolved,systemd-timesyncd,e2fsprogs,kmod,adduser,ca-certificates,iproute2,$kernel_pkg$extra"
echo "debootstrap $suite $arch (minbase + $packages) from $mirror"
if [ "$arch" = amd64 ]; then
  debootstrap --variant=minbase --arch=amd64 --cache-dir="$cache" --include="$packages" "$suite" "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
else
  # The second stage runs arm64 programs: through qemu-user-static, registered with binfmt_misc
  # ("F": the interpreter is opened now, so it works inside the chroot).
  [ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || cat /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register
  debootstrap --foreign --variant=minbase --arch=arm64 --cache-dir="$cache" --include="$packages" "$suite" "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
  chroot "$rootfs" /debootstrap/debootstrap --second-stage >>"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
fi
echo "rootfs in $(( $(date +%s) - start )) s"

# The agent, the image's own units and hooks, and what makes each flashed device unique.
mount -t proc proc "$rootfs/proc"
cp "$deb" "$rootfs/tmp/edge-agent.deb"
chroot "$rootfs" dpkg -i /tmp/edge-agent.deb
rm "$rootfs/tmp/edge-agent.deb"
cp -a "$root/images/rootfs/." "$rootfs/"
install -d "$rootfs/usr/share/doc/edge-agent"
install -m 0644 "$root/docs/FLASHING.md" "$rootfs/usr/share/doc/edge-agent/FLASHING.md"
install -d "$rootfs/boot/firmware"
cat > "$rootfs/etc/fstab" <<'FSTAB'
LABEL=edge-root  /               ext4  errors=remount-ro,noatime   0 1
LABEL=EDGEBOOT   /boot/firmware  vfat  umask=0077,noatime,nofail   0 0
FSTAB
echo edge-unconfigured > "$rootfs/etc/hostname"
systemctl --root="$rootfs" enable systemd-networkd.service systemd-resolved.service systemd-timesyncd.service \
  edge-agent-image-config.service edge-agent.service >/dev/null 2>&1
ln -sf ../run/systemd/resolve/stub-resolv.conf "$rootfs/etc/resolv.conf"
# A machine id, random seed and apt lists of their own on every device, not the image's.
printf 'uninitialized\n' > "$rootfs/etc/machine-id"
rm -f "$rootfs/var/lib/dbus/machine-id" "$rootfs/var/lib/systemd/random-seed"
chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*.log "$rootfs"/tmp/* "$rootfs/debootstrap"
umount "$rootfs/proc"

kver=$(ls "$rootfs/boot" | sed -n 's/^vmlinuz-//p' | sort -V | tail -1)
[ -n "$kver" ] || { echo "images/build.sh: no kernel in the rootfs" >&2; exit 1; }

# Boot partition: FAT32 made in a file (no loop device, no mount), syslinux installed into it
# through mtools; "hidden sectors" = its offset, which syslinux's boot sector reads.
boot_mib=256
boot="$work/boot.vfat"
mkfs.vfat -F 32 -n EDGEBOOT -h 2048 -C "$boot" $((boot_mib * 1024)) >/dev/null
export MTOOLS_SKIP_CHECK=1
mcopy -i "$boot" "$rootfs/boot/vmlinuz-$kver" ::/vmlinuz
mcopy -i "$boot" "$rootfs/boot/initrd.img-$kver" ::/initrd.img
mcopy -i "$boot" "$root/images/boot/README.txt" ::/README.txt
mmd -i "$boot" ::/edge-agent
if [ "$arch" = amd64 ]; then
  syslinux --install "$boot"
  mcopy -i "$boot" "$root/images/boot/syslinux.cfg" ::/syslinux.cfg
fi

# Root partition: ext4 made from the directory (mke2fs -d), with room to grow.
used_mib=$(du -sm "$rootfs" | cut -f1)
root_mib=$(( used_mib + used_mib / 4 + 256 ))
rootimg="$work/root.ext4"
mke2fs -q -t ext4 -L edge-root -d "$rootfs" "$rootimg" "${root_mib}M"

# The disk: MBR, partition 1 (boot, active) at 1 MiB, partition 2 after it.
mkdir -p "$(dirname "$out")"
rm -f "$out"
truncate -s $(( (1 + boot_mib + root_mib) * 1024 * 1024 )) "$out"
sfdisk --quiet "$out" <<TABLE
label: dos
start=2048, size=$((boot_mib * 2048)), type=c, bootable
start=$(( (1 + boot_mib) * 2048 )), size=$((root_mib * 2048)), type=83
TABLE
dd if="$boot" of="$out" bs=1M seek=1 conv=notrunc,sparse status=none
dd if="$rootimg" of="$out" bs=1M seek=$((1 + boot_mib)) conv=notrunc,sparse status=none
if [ "$arch" = amd64 ]; then
  dd if=/usr/lib/syslinux/mbr/mbr.bin of="$out" bs=440 count=1 conv=notrunc status=none
fi
bmaptool create -o "$out.bmap" "$out" 2>/dev/null
echo "$out: $arch, kernel $kver, agent $(dpkg-deb -f "$deb" Version), $(( $(stat -c %s "$out") / 1048576 )) MiB ($(du -m "$out" | cut -f1) MiB allocated), rootfs ${used_mib} MiB, built in $(( $(date +%s) - start )) s"
