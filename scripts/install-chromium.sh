#!/usr/bin/env bash
# Headless Chromium for the browser test (test/ui.test.ts): the Debian package `chromium`,
# driven by playwright-core (no browser download by Playwright). Idempotent: does nothing when
# /usr/bin/chromium is already there. Needs root (or sudo) and apt.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
SUDO=
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO=sudo; else
    echo "install-chromium: not root and no sudo; install the Debian package 'chromium' by hand" >&2
    exit 1
  fi
fi
echo "install-chromium: installing the Debian package chromium…" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y chromium
/usr/bin/chromium --version >&2
