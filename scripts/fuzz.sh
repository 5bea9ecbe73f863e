#!/usr/bin/env bash
# Runs each cargo-fuzz target for a given time or number of executions, from the seed corpus
# in fuzz/corpus/TARGET (kept in the repository); inputs that cover more are kept in
# fuzz/corpus-run/TARGET (not committed), crashes go to fuzz/artifacts/TARGET and become
# regression tests.
#
#   bash scripts/fuzz.sh                      # every target, 60 s each
#   bash scripts/fuzz.sh 300 http_request     # 300 s for one target
#   RUNS=10000000 bash scripts/fuzz.sh 0      # every target to 10 million executions
#
# Needs the nightly toolchain (`cargo +nightly`; where it is missing, RUSTC_BOOTSTRAP=1 with
# stable accepts cargo-fuzz's flags) and cargo-fuzz (`cargo install cargo-fuzz`).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${1:-60}
shift || true
targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
    targets=(http_request http_response chunked_body rules dns_message ca_pem)
fi
toolchain=(+nightly)
if ! cargo +nightly --version >/dev/null 2>&1; then
    toolchain=()
    export RUSTC_BOOTSTRAP=1
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
for target in "${targets[@]}"; do
    args=(-print_final_stats=1)
    if [[ "$seconds" != 0 ]]; then args+=("-max_total_time=$seconds"); fi
    if [[ -n "${RUNS:-}" ]]; then args+=("-runs=$RUNS"); fi
    echo "=== $target" >&2
    mkdir -p "corpus-run/$target"
    cargo "${toolchain[@]}" fuzz run --release "$target" "corpus-run/$target" "corpus/$target" -- "${args[@]}"
done
