#!/usr/bin/env bash
# Set up a fresh machine for this project: system packages (Redis, Chromium), a virtualenv in .venv with the
# CPU build of torch, and the project with its test extras. Safe to run again: it skips what exists.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
# redis-server: the scale-out tests; promtool (Debian's prometheus) and kubectl: the deployment tests;
# chromium and its chromedriver: the playground's browser tests (selenium drives the system browser)
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v kubectl >/dev/null 2>&1 || missing+=(kubectl)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts the services it installs; the project starts its own on free ports when it needs them
  for unit in redis-server prometheus; do
    $SUDO systemctl disable --now "$unit" >/dev/null 2>&1 || $SUDO service "$unit" stop >/dev/null 2>&1 || true
  done
fi

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $PYTHON" >&2
  "$PYTHON" -m venv .venv
fi
STAMP=.venv/.fastcache-setup
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  echo "setup: installing torch==2.13.0 (CPU) and the project" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  # the CPU build first: a bare 'torch' requirement would pull a multi-GB CUDA build
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -e ".[test]"
  touch "$STAMP"
fi
