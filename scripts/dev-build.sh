#!/usr/bin/env bash
# Fast edit-build loop for developers: a debug (or --release) build of the extension
# copied into python/segproxy, for use with an editable install (`pip install -e .`).
set -euo pipefail
cd "$(dirname "$0")/.."
profile=debug; flag=""
if [ "${1:-}" = "--release" ]; then profile=release; flag="--release"; fi
PYO3_BUILD_EXTENSION_MODULE=1 cargo build --lib $flag
# A new file renamed over the old one: processes still running the old build keep their
# mapping (copying over it in place makes them crash).
cp "target/$profile/lib_engine.so" python/segproxy/_engine.abi3.so.new
mv -f python/segproxy/_engine.abi3.so.new python/segproxy/_engine.abi3.so
