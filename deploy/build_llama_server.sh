#!/usr/bin/env bash
# Build llama.cpp's C++ HTTP server (llama-server) from the llama.cpp sources
# vendored in PyPI's llama-cpp-python sdist, so the version matches the
# llama-cpp-python the kit pins and no git clone is needed.
#
#   deploy/build_llama_server.sh [DEST]        # default DEST: .llama/bin/llama-server
#
# Environment:
#   LLAMA_CPP_PYTHON_VERSION  sdist version to build from      (default 0.3.36)
#   LLAMA_SDIST               an already downloaded sdist .tar.gz (skips pip download)
#   LLAMA_NATIVE=ON           -march=native: faster, but the binary only runs on
#                             CPUs like this one (default OFF: a portable binary)
#   LLAMA_BUILD_DIR           where to build (default: a temporary folder, removed)
#   JOBS                      parallel compile jobs (default: all cores)
#   PYTHON                    python with pip (default .venv/bin/python, then python3)
#
# Does nothing when DEST already exists (delete it to rebuild). Needs cmake and
# a C++17 compiler; no network beyond PyPI (the web UI is not downloaded).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$ROOT/.llama/bin/llama-server}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
NATIVE="${LLAMA_NATIVE:-OFF}"
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"

if [ -x "$DEST" ]; then
    echo "llama-server already at $DEST (delete it to rebuild)"
    exit 0
fi
for tool in cmake c++ tar; do
    command -v "$tool" >/dev/null || { echo "build_llama_server: $tool not found" >&2; exit 1; }
done
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
SDIST="${LLAMA_SDIST:-}"
if [ -z "$SDIST" ]; then
    echo "downloading the llama-cpp-python $VERSION sdist from PyPI ..."
    "$PYTHON" -m pip download "llama-cpp-python==$VERSION" --no-binary :all: --no-deps -d "$WORK/sdist" -q
    SDIST="$(ls "$WORK"/sdist/llama_cpp_python-*.tar.gz | head -n 1)"
fi
echo "extracting $SDIST ..."
tar xzf "$SDIST" -C "$WORK"
SRC="$(ls -d "$WORK"/llama_cpp_python-*/vendor/llama.cpp | head -n 1)"
BUILD="${LLAMA_BUILD_DIR:-$WORK/build}"

# LLAMA_BUILD_TOOLS: the server lives under tools/. The UI options keep the
# build offline (the default downloads a prebuilt web UI from Hugging Face).
cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE="$NATIVE" -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF
cmake --build "$BUILD" --target llama-server -j "$JOBS"

mkdir -p "$(dirname "$DEST")"
install -m 755 "$BUILD/bin/llama-server" "$DEST"
echo "installed $DEST"
"$DEST" --version 2>&1 | head -n 2 || true
