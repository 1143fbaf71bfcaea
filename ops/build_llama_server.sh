#!/usr/bin/env bash
# Build the C++ llama.cpp `llama-server` binary from source, offline-friendly,
# cached and idempotent.
#
# Why this exists: Debian has no llama.cpp package and the only places we may
# download from are PyPI, Debian apt and npm. PyPI's llama-cpp-python sdist
# vendors the complete llama.cpp source tree, so we take llama.cpp from there
# and build only the `llama-server` target.
#
# Usage:
#   ops/build_llama_server.sh [--prefix DIR] [--version VER] [--force] [PREFIX [VERSION]]
#   LLAMA_SERVER=$(ops/build_llama_server.sh | tail -n1)
#
# Everything except the final binary path goes to stderr, so stdout is exactly
# one line: the absolute path of <prefix>/bin/llama-server.
#
# Environment:
#   GENQ_CACHE_DIR          cache root (default ~/.cache/genq)
#   GENQ_LLAMA_CPP_VERSION  llama-cpp-python version to take llama.cpp from
#   GENQ_LLAMA_NATIVE=1     build with -march=native (faster on this CPU, but
#                           the binary may crash with SIGILL on another CPU)
#   GENQ_BUILD_JOBS         parallel compile jobs (default: number of CPUs)
#   PYTHON                  interpreter whose pip downloads the sdist (python3)
#
# Needs: python3 + pip, a C/C++ compiler, cmake >= 3.21; ninja is used if found.
set -euo pipefail

# Pinned: newest llama-cpp-python on PyPI when this was written, and the one
# the measurements in shared/notes/backends.md were taken with.
DEFAULT_VERSION=0.3.36
MIN_CMAKE=3.21

log() { printf '[build_llama_server] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
    sed -n '2,/^set -euo pipefail/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
}

# --- arguments ---------------------------------------------------------------
prefix=""
version="${GENQ_LLAMA_CPP_VERSION:-$DEFAULT_VERSION}"
force=0
positional=()
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) [ $# -ge 2 ] || die "--prefix needs a value"; prefix="$2"; shift 2 ;;
        --prefix=*) prefix="${1#*=}"; shift ;;
        --version) [ $# -ge 2 ] || die "--version needs a value"; version="$2"; shift 2 ;;
        --version=*) version="${1#*=}"; shift ;;
        --force) force=1; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) die "unknown option: $1 (see --help)" ;;
        *) positional+=("$1"); shift ;;
    esac
done
# Positional form: [PREFIX [VERSION]]. ${arr[@]+...} keeps `set -u` happy on
# bash 3.2 (macOS), where an empty array counts as unset.
set -- ${positional[@]+"${positional[@]}"}
[ $# -le 2 ] || die "too many arguments (see --help)"
[ $# -ge 1 ] && prefix="$1"
[ $# -ge 2 ] && version="$2"
case "$version" in
    *[!0-9A-Za-z.+-]*|"") die "bad version: '$version'" ;;
esac

native="${GENQ_LLAMA_NATIVE:-0}"
if [ -z "$prefix" ]; then
    # The version is part of the cache key; so is a native build, because a
    # -march=native binary must never be picked up by a portable-build caller.
    suffix=""
    [ "$native" = 1 ] && suffix="-native"
    prefix="${GENQ_CACHE_DIR:-$HOME/.cache/genq}/llama-server/${version}${suffix}"
fi
# Absolute, so the printed path works from any directory. (Not created yet: a
# failed build should leave nothing behind in the cache.)
case "$prefix" in /*) ;; *) prefix="$PWD/$prefix" ;; esac
target="$prefix/bin/llama-server"

# --- cache hit: an existing binary that runs is good enough -----------------
# `--version` also catches a binary that no longer runs here (missing shared
# library, copied from another OS); we then rebuild over it.
if [ "$force" = 0 ] && [ -x "$target" ] && "$target" --version >/dev/null 2>&1; then
    log "cached: $target"
    printf '%s\n' "$target"
    exit 0
fi

# --- tools -------------------------------------------------------------------
command -v cmake >/dev/null 2>&1 || die "cmake not found (apt-get install cmake / brew install cmake)"
cmake_version="$(cmake --version | awk 'NR==1 {print $3}')"
# Compare MAJOR.MINOR numerically without GNU `sort -V`.
if ! awk -v have="$cmake_version" -v need="$MIN_CMAKE" 'BEGIN {
        split(have, h, "."); split(need, n, ".");
        exit !((h[1] + 0 > n[1] + 0) || (h[1] + 0 == n[1] + 0 && h[2] + 0 >= n[2] + 0)) }'; then
    die "cmake >= $MIN_CMAKE needed, found $cmake_version (a newer one: pip install cmake)"
fi

PYTHON="${PYTHON:-python3}"
"$PYTHON" -m pip --version >/dev/null 2>&1 || die "'$PYTHON -m pip' does not work (set PYTHON=...)"

# Ninja when present (faster no-op checks, cleaner output); otherwise cmake's
# default generator (Makefiles), which needs nothing more to be installed and
# is therefore the most robust fallback. `cmake --build -j` works with both.
generator_args=()
if command -v ninja >/dev/null 2>&1; then
    generator_args=(-G Ninja)
else
    log "ninja not found; using cmake's default generator"
fi

jobs="${GENQ_BUILD_JOBS:-}"
if [ -z "$jobs" ]; then
    jobs="$(nproc 2>/dev/null || sysctl -n hw.ncpu 2>/dev/null || echo 2)"
fi

# --- CPU flags ---------------------------------------------------------------
# The binary lives in a cache that CI may restore onto a different runner, so
# by default we build WITHOUT -march=native (GGML_NATIVE=OFF): a native build
# from an AVX-512 host dies with SIGILL on a host without it, and `--version`
# would not notice. On x86_64 we instead pin the x86-64-v3 feature set
# (AVX2/FMA/F16C/BMI2), which every x86 CI runner and developer machine from
# the last decade has and which is where ggml's fast CPU kernels are; on a
# host without AVX-512 that is what -march=native gives anyway. The flags are
# explicit because ggml only turns them on by itself when GGML_NATIVE's default
# is ON, and that default flips to OFF when SOURCE_DATE_EPOCH is set (common
# in CI), which would silently give a much slower SSE2-only build.
# arm64 (Apple silicon, Linux aarch64) uses the compiler's default target.
host_has_avx2() {
    if [ -r /proc/cpuinfo ]; then
        grep -qw avx2 /proc/cpuinfo
    else
        sysctl -n machdep.cpu.leaf7_features 2>/dev/null | grep -qw AVX2
    fi
}
cpu_args=()
if [ "$native" = 1 ]; then
    cpu_args=(-DGGML_NATIVE=ON)
else
    cpu_args=(-DGGML_NATIVE=OFF)
    case "$(uname -m)" in
        x86_64|amd64)
            if host_has_avx2; then
                cpu_args+=(-DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON
                           -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON)
            else
                # An old CPU: a v3 binary would not run here at all.
                log "host has no AVX2; building for the baseline x86-64 (slow)"
            fi
            ;;
    esac
fi

# --- download + unpack ---------------------------------------------------------
work="$(mktemp -d "${TMPDIR:-/tmp}/genq-llama-server.XXXXXX")"
staged=""
cleanup() {
    rm -rf "$work"
    [ -z "$staged" ] || rm -f "$staged"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start=$(date +%s)
log "downloading llama-cpp-python==$version sdist from PyPI"
# --no-binary for this one package only: with `:all:` pip also builds the
# sdist's own build dependencies (scikit-build-core, ...) from source while it
# prepares metadata, which took ~100 s instead of ~13 s here.
"$PYTHON" -m pip download --quiet --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==$version" -d "$work/dl" >&2

sdist=""
for f in "$work"/dl/*.tar.gz; do
    [ -e "$f" ] && sdist="$f"
done
[ -n "$sdist" ] || die "pip did not produce an sdist (.tar.gz) in $work/dl"

mkdir "$work/src"
tar -xzf "$sdist" -C "$work/src"   # plain -xzf: GNU tar and bsdtar both accept it
src=""
for d in "$work"/src/*/vendor/llama.cpp; do
    [ -f "$d/CMakeLists.txt" ] && src="$d"
done
[ -n "$src" ] || die "no vendor/llama.cpp/CMakeLists.txt inside $(basename "$sdist")"

# --- configure + build ---------------------------------------------------------
# BUILD_SHARED_LIBS=OFF  one self-contained binary (no libllama/libggml .so to ship)
# LLAMA_CURL/OPENSSL=OFF no download-from-URL support: we only serve local files
# LLAMA_USE_PREBUILT_UI=OFF  otherwise configure fetches the web UI from the net
# LLAMA_BUILD_TESTS/EXAMPLES=OFF  and `--target llama-server` keep the build short
log "configuring llama.cpp from $(basename "$sdist") (${cpu_args[*]})"
cmake -S "$src" -B "$work/build" ${generator_args[@]+"${generator_args[@]}"} \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    "${cpu_args[@]}" >&2

log "building llama-server with $jobs jobs (about 5 minutes on 2 cores)"
cmake --build "$work/build" --target llama-server -j "$jobs" >&2

built="$work/build/bin/llama-server"
[ -x "$built" ] || die "build finished but $built is missing"
# Refuse to install something that does not even start.
"$built" --version >&2 || die "the freshly built llama-server does not run"

# --- install atomically ----------------------------------------------------------
# Copy next to the target first (same directory => same filesystem), then
# rename: a concurrent caller sees either the old binary or the new one, never
# a half-written file. Two concurrent builds are merely wasted work.
mkdir -p "$prefix/bin"
staged="$(mktemp "$prefix/bin/.llama-server.XXXXXX")"
cp "$built" "$staged"
chmod 755 "$staged"
mv -f "$staged" "$target"
staged=""

log "built llama-server from llama-cpp-python $version in $(( $(date +%s) - start )) s"
printf '%s\n' "$target"
