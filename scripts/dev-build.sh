#!/usr/bin/env bash
# Fast edit-build loop for developers: a debug (or --release) build of the extension
# copied into python/segproxy, for use with an editable install (`pip install -e .`).
set -euo pipefail
cd "$(dirname "$0")/.."
profile=debug; flag=""
if [ "${1:-}" = "--release" ]; then profile=release; flag="--release"; fi
PYO3_BUILD_EXTENSION_MODULE=1 cargo build --lib $flag
cp "target/$profile/lib_engine.so" python/segproxy/_engine.abi3.so
