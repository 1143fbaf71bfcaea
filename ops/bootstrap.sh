#!/usr/bin/env bash
# Set up a genq checkout on a fresh machine: redis-server if it is missing, then a virtualenv with
# genq and the extras asked for. Safe to run again: it only does what is not done yet.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-dev,tinymodel,mlx,llamacpp,gateway}
PYTHON=${PYTHON:-python3}

if ! command -v redis-server >/dev/null 2>&1; then
  echo "bootstrap: installing redis-server" >&2
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  elif command -v brew >/dev/null 2>&1; then
    brew install redis
  else
    echo "bootstrap: please install redis-server (apt-get install redis-server, or brew install redis)" >&2
    exit 1
  fi
fi

"$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"genq needs Python 3.11 or newer; {sys.executable} is {sys.version.split()[0]}")
PY

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# llama-cpp-python compiles llama.cpp (minutes); pip keeps the built wheel in its cache for next time.
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || sysctl -n hw.ncpu)} \
  "$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
