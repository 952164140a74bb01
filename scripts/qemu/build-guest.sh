#!/usr/bin/env bash
# Builds (once, then cached) the QEMU test guest: a Debian cloud kernel and a busybox initramfs
# whose /init keeps rewriting memory and disk blocks, re-reads them, and prints
#   tick N mem=ok disk=ok
# on ttyS0. The kernel comes from `apt-get download` of linux-image-*-cloud-amd64, unpacked with
# `dpkg -x` (never installed). Needs busybox-static and cpio (scripts/qemu/install-qemu.sh).
#
#   scripts/qemu/build-guest.sh [OUT_DIR]     prints OUT_DIR (default .cache/qemu-guest)
#
# OUT_DIR gets vmlinuz, initramfs.gz and guest.json. The cache key is this script's own hash:
# edit the script (e.g. the /init below) and the next run rebuilds. FORCE=1 rebuilds anyway.
#
# Guest kernel command line knobs (the driver passes them through):
#   ferry.memblocks=N   256 KiB tmpfs blocks cycled through (default 32)
#   ferry.diskblocks=N  4 KiB blocks at the start of /dev/vda cycled through (default 16)
#   ferry.sleepms=N     pause between ticks (default 200)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="$(realpath -m "${1:-${VMFERRY_QEMU_GUEST_DIR:-.cache/qemu-guest}}")"
SELF="scripts/qemu/build-guest.sh"
KEY="$(sha256sum "$SELF" | cut -c1-16)"
log() { echo "build-guest: $*" >&2; }

if [ -z "${FORCE:-}" ] && [ -f "$OUT/guest.json" ] && grep -q "\"key\": \"$KEY\"" "$OUT/guest.json" && [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/initramfs.gz" ]; then
  echo "$OUT"
  exit 0
fi

BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] && "$BUSYBOX" --list | grep -qx sh || { log "needs busybox-static (run scripts/qemu/install-qemu.sh)"; exit 1; }
file_is_static() { ! "$BUSYBOX" strings "$1" | grep -q '^/lib64/ld-linux'; }
file_is_static "$BUSYBOX" || { log "$BUSYBOX is not static: install busybox-static"; exit 1; }
command -v cpio >/dev/null || { log "needs cpio (run scripts/qemu/install-qemu.sh)"; exit 1; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/vmferry-guest.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# --- kernel -----------------------------------------------------------------------------------
PKG="${VMFERRY_GUEST_KERNEL_PKG:-}"
if [ -z "$PKG" ]; then
  PKG="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9].*-cloud-amd64\)$/\1/p' | head -1)"
fi
[ -n "$PKG" ] || { log "cannot resolve linux-image-cloud-amd64 (apt-get update first?)"; exit 1; }
log "downloading $PKG"
(cd "$WORK" && apt-get download -q "$PKG" >&2 2>/dev/null) || (cd "$WORK" && apt-get download "$PKG" >&2)
dpkg -x "$WORK"/linux-image-*.deb "$WORK/kernel"
KVER="$(ls "$WORK/kernel/lib/modules" | head -1)"
MODDIR="$WORK/kernel/lib/modules/$KVER"

# --- initramfs ----------------------------------------------------------------------------------
ROOT="$WORK/root"
mkdir -p "$ROOT"/{bin,dev,proc,sys,mem,tmp,modules}
cp "$BUSYBOX" "$ROOT/bin/busybox"
ln -s busybox "$ROOT/bin/sh"

# Virtio modules, dependencies first (read from each module's own "depends=" field).
ORDER=()
add_module() {
  local name="$1" ko dep
  for dep in "${ORDER[@]}"; do [ "$dep" = "$name" ] && return 0; done
  ko="$(find "$MODDIR" -name "$name.ko" -o -name "${name//_/-}.ko" | head -1)"
  [ -n "$ko" ] || { log "module $name not found in $KVER"; exit 1; }
  for dep in $("$BUSYBOX" strings "$ko" | sed -n 's/^depends=//p' | tr ',' ' '); do add_module "$dep"; done
  cp "$ko" "$ROOT/modules/$name.ko"
  ORDER+=("$name")
}
for m in virtio_pci virtio_blk; do add_module "$m"; done
printf '%s\n' "${ORDER[@]}" > "$ROOT/modules/order"

cat > "$ROOT/init" <<'INIT'
#!/bin/sh
# vmferry test guest. Every tick: rewrite one 256 KiB memory block (tmpfs) and one 4 KiB disk
# block (O_DIRECT), after checking the content each had from its previous round, and re-read
# what was just written. Any mismatch prints BAD instead of ok.
export PATH=/bin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
for m in $(cat /modules/order); do insmod "/modules/$m.ko" 2>/dev/null; done

arg() { v=$(tr ' ' '\n' < /proc/cmdline | sed -n "s/^ferry\.$1=//p" | tail -1); echo "${v:-$2}"; }
MB=$(arg memblocks 32)
DB=$(arg diskblocks 16)
SLEEPMS=$(arg sleepms 200)
mount -t tmpfs -o size=$((MB / 4 + 4))m mem /mem

for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/vda ] && break; usleep 100000; done
DISK=none
if [ -b /dev/vda ]; then
  DISK=/dev/vda
  size=$(blockdev --getsize64 /dev/vda)
  [ $((size / 4096)) -lt "$DB" ] && DB=$((size / 4096))
fi
BOOT=$(cat /proc/sys/kernel/random/uuid)
echo "ferry-guest boot=$BOOT memblocks=$MB diskblocks=$DB disk=$DISK"

# pattern TAG N BYTES: deterministic content for round N
pattern() { yes "$1$2" | head -c "$3"; }
memcheck() { # block round
  pattern m "$2" 262144 | cmp -s - "/mem/b$1"
}
diskcheck() { # block round
  pattern d "$2" 4096 > /tmp/want
  dd if="$DISK" bs=4096 skip="$1" count=1 iflag=direct status=none 2>/dev/null | cmp -s - /tmp/want
}

N=0
MBAD=0
DBAD=0
while :; do
  N=$((N + 1))
  ms=ok
  ds=ok
  k=$((N % MB))
  eval "prev=\${mw$k:-}"
  if [ -n "$prev" ] && ! memcheck "$k" "$prev"; then ms="BAD(block=$k round=$prev)"; fi
  # In place (same page-cache pages every round, long-lived mappings): the writes dirty
  # tracking must not miss.
  pattern m "$N" 262144 | dd of="/mem/b$k" bs=65536 conv=notrunc status=none 2>/dev/null
  eval "mw$k=$N"
  memcheck "$k" "$N" || ms="BAD(block=$k round=$N reread)"
  if [ "$DISK" = none ]; then
    ds=none
  else
    j=$((N % DB))
    eval "prev=\${dw$j:-}"
    if [ -n "$prev" ] && ! diskcheck "$j" "$prev"; then ds="BAD(block=$j round=$prev)"; fi
    pattern d "$N" 4096 | dd of="$DISK" bs=4096 seek="$j" count=1 oflag=direct conv=notrunc,fsync status=none 2>/dev/null
    eval "dw$j=$N"
    diskcheck "$j" "$N" || ds="BAD(block=$j round=$N reread)"
  fi
  echo "tick $N mem=$ms disk=$ds"
  usleep $((SLEEPMS * 1000))
done
INIT
chmod +x "$ROOT/init"

mkdir -p "$OUT"
(cd "$ROOT" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) | gzip -9 > "$WORK/initramfs.gz"
cp "$WORK/kernel/boot/vmlinuz-$KVER" "$WORK/vmlinuz"
mv "$WORK/vmlinuz" "$OUT/vmlinuz"
mv "$WORK/initramfs.gz" "$OUT/initramfs.gz"
cat > "$OUT/guest.json" <<JSON
{
  "key": "$KEY",
  "kernelPackage": "$PKG",
  "kernelVersion": "$KVER",
  "modules": "$(echo "${ORDER[*]}")",
  "builtAt": "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
}
JSON
log "built guest ($PKG) in $OUT"
echo "$OUT"
