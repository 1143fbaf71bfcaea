#!/usr/bin/env bash
# Set up a genq checkout on a fresh machine (Linux with apt as root, or macOS with Homebrew).
# Safe to run again: each step does only what is not done yet.
#
#   ops/bootstrap.sh system demo|test   the programs genq runs beside Python:
#                                         demo: redis-server
#                                         test: redis-server, redis-sentinel, prometheus (+ promtool)
#   ops/bootstrap.sh python EXTRAS      a virtualenv ($VENV, default .venv) with genq and EXTRAS
#                                         (a comma list: tinymodel,mlx for the demo; the test set adds
#                                         dev,llamacpp,gateway), into the same venv either way
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

say() { echo "bootstrap: $*" >&2; }

system() {
  local wanted=(redis-server)
  [ "$1" = test ] && wanted+=(redis-sentinel promtool)
  local missing=()
  for program in "${wanted[@]}"; do
    command -v "$program" >/dev/null 2>&1 || missing+=("$program")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  say "installing ${missing[*]}"
  if [ "$(uname -s)" = Darwin ] && command -v brew >/dev/null 2>&1; then
    local formulas=()  # redis brings redis-sentinel; prometheus brings promtool
    for program in "${missing[@]}"; do
      case $program in redis-*) formulas+=(redis) ;; promtool) formulas+=(prometheus) ;; esac
    done
    brew install $(printf '%s\n' "${formulas[@]}" | sort -u)  # Homebrew starts no service by itself
  elif command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    local packages=()
    for program in "${missing[@]}"; do
      case $program in promtool) packages+=(prometheus) ;; *) packages+=("$program") ;; esac
    done
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null
    # Debian starts the services of what it installs; the tests start their own Prometheus and
    # Sentinels on free ports, so the ones just installed are stopped and kept from starting at boot.
    # (redis-server's own service is left alone: it may be a Redis someone uses.)
    for service in "${packages[@]}"; do
      case $service in prometheus | redis-sentinel) ;; *) continue ;; esac
      systemctl disable --now "$service" >/dev/null 2>&1 || true
      service "$service" stop >/dev/null 2>&1 || true
      update-rc.d "$service" disable >/dev/null 2>&1 || true
    done
  else
    say "please install: ${missing[*]} (as root: apt-get install redis-server redis-sentinel prometheus;"
    say "on macOS: brew install redis prometheus), then run this again"
    exit 1
  fi
}

python_env() {
  local extras=$1
  "$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"genq needs Python 3.11 or newer; {sys.executable} is {sys.version.split()[0]}")
PY
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  # The venv's own pip (Python 3.11 ships pip 23+) installs editable hatchling projects: upgrading it
  # first cost the demo ~10 s. --no-compile: byte-compiling every installed file (transformers has
  # thousands) is CPU the first run does not need; Python compiles what it imports, once.
  # llama-cpp-python (the llamacpp extra, tests only) compiles llama.cpp for minutes; pip keeps the
  # built wheel in its cache for next time.
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || sysctl -n hw.ncpu)} \
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-compile -e ".[$extras]"
}

case ${1:-} in
  system) system "${2:?demo or test}" ;;
  python) python_env "${2:?extras, e.g. tinymodel,mlx}" ;;
  *)
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
