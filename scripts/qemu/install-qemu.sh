#!/usr/bin/env bash
# Installs what the QEMU driver and its tests need: qemu-system-x86 >= 9, qemu-utils,
# busybox-static and cpio (the test guest is built from those). Idempotent: does nothing when
# everything is already there.
#
# Why >= 9: Debian 12's QEMU 7.2 loses guest memory writes during live migration under TCG
# (fixed in QEMU 9.0). Debian 12 gets QEMU 9 from bookworm-backports; the suite is added by
# reusing the URI the machine's own Debian sources already name (no host names here).
# Debian 13 (trixie) has QEMU >= 9 in its main suite.
set -euo pipefail

MIN_MAJOR=9
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
log() { echo "install-qemu: $*" >&2; }

qemu_major() {
  command -v qemu-system-x86_64 >/dev/null 2>&1 || { echo 0; return; }
  qemu-system-x86_64 --version | sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p' | head -1
}

have_all() {
  [ "$(qemu_major)" -ge "$MIN_MAJOR" ] 2>/dev/null &&
    command -v qemu-img >/dev/null 2>&1 &&
    [ -x /bin/busybox ] &&
    command -v cpio >/dev/null 2>&1
}

if have_all; then
  log "already installed: $(qemu-system-x86_64 --version | head -1)"
  exit 0
fi

[ -r /etc/debian_version ] || { log "not a Debian system (no /etc/debian_version); install QEMU >= ${MIN_MAJOR} yourself"; exit 1; }
debver="$(cut -d. -f1 /etc/debian_version)"
export DEBIAN_FRONTEND=noninteractive

# The Debian archive URI this machine already uses: the one serving "<codename>" (not -security).
debian_uri() {
  local codename="$1" f uri=""
  # deb822 sources: a stanza's URIs line whose Suites contain the bare codename.
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -r "$f" ] || continue
    uri="$(awk -v cn="$codename" '
      BEGIN { RS=""; FS="\n" }
      {
        u=""; s=""; en=1
        for (i = 1; i <= NF; i++) {
          if ($i ~ /^URIs:/)    { u = $i; sub(/^URIs:[ \t]*/, "", u); split(u, a, /[ \t]+/); u = a[1] }
          if ($i ~ /^Suites:/)  { s = " " $i " " }
          if ($i ~ /^Enabled:[ \t]*no/) { en = 0 }
        }
        if (en && u != "" && s ~ (" " cn " ")) { print u; exit }
      }' "$f")"
    [ -n "$uri" ] && { echo "$uri"; return; }
  done
  # One-line sources.
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -r "$f" ] || continue
    uri="$(awk -v cn="$codename" '$1 == "deb" { i = 2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ } if ($(i+1) == cn) { print $i; exit } }' "$f")"
    [ -n "$uri" ] && { echo "$uri"; return; }
  done
}

case "$debver" in
  12)
    list=/etc/apt/sources.list.d/vmferry-bookworm-backports.sources
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
      uri="$(debian_uri bookworm)"
      [ -n "$uri" ] || { log "cannot find the Debian archive URI for bookworm in /etc/apt/sources*"; exit 1; }
      log "adding bookworm-backports from ${uri}"
      keyring=/usr/share/keyrings/debian-archive-keyring.gpg
      {
        echo "Types: deb"
        echo "URIs: ${uri}"
        echo "Suites: bookworm-backports"
        echo "Components: main"
        [ -r "$keyring" ] && echo "Signed-By: ${keyring}"
      } | $SUDO tee "$list" >/dev/null
    fi
    $SUDO apt-get update -q >&2
    $SUDO apt-get install -y -q --no-install-recommends -t bookworm-backports qemu-system-x86 qemu-utils >&2
    $SUDO apt-get install -y -q --no-install-recommends busybox-static cpio >&2
    ;;
  13|14|15)
    $SUDO apt-get update -q >&2
    $SUDO apt-get install -y -q --no-install-recommends qemu-system-x86 qemu-utils busybox-static cpio >&2
    ;;
  *)
    # Testing/unstable report "trixie/sid" and the like: the main suite is new enough.
    if [[ "$debver" =~ ^[0-9]+$ ]] && [ "$debver" -lt 12 ]; then
      log "Debian ${debver} is too old: QEMU >= ${MIN_MAJOR} is not packaged for it"; exit 1
    fi
    $SUDO apt-get update -q >&2
    $SUDO apt-get install -y -q --no-install-recommends qemu-system-x86 qemu-utils busybox-static cpio >&2
    ;;
esac

if ! have_all; then
  log "installation finished but QEMU is $(qemu-system-x86_64 --version 2>/dev/null | head -1 || echo missing); need >= ${MIN_MAJOR}"
  exit 1
fi
log "installed: $(qemu-system-x86_64 --version | head -1)"
