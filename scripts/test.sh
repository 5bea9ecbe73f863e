#!/usr/bin/env bash
# The whole test suite: what CI runs (.ci/run) and what a developer runs.
#
#   bash scripts/test.sh            install deps, build, run every stage
#   SKIP_INSTALL=1 bash scripts/test.sh   reuse the current environment
#   extra arguments are passed to the pytest stage (e.g. -k tunnel -x)
#
# Every stage runs even if an earlier one failed; the exit status is non-zero
# if any stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
failed=()
stage() { printf '\n=== %s ===\n' "$*" >&2; }

if [[ -z "${SKIP_INSTALL:-}" ]]; then
    stage "install test dependencies and build"
    if ! bash scripts/install-test-deps.sh; then
        echo "install-test-deps.sh failed; not running tests" >&2
        exit 1
    fi
fi

stage "lint (rustfmt, clippy with and without the python feature, ruff)"
# mypy --strict and stubtest run in the pytest stage (tests/test_typing.py).
cargo fmt --check || failed+=("cargo fmt --check")
cargo clippy --all-targets --no-default-features -- -D warnings || failed+=("clippy (engine)")
cargo clippy --all-targets -- -D warnings || failed+=("clippy (python feature)")
"$PYTHON" -m ruff check python tests bench || failed+=("ruff check")
"$PYTHON" -m ruff format --check python tests bench || failed+=("ruff format --check")

stage "cargo test (engine, no Python)"
cargo test --no-default-features || failed+=("cargo test")

# pytest exits 5 when it collects nothing. That is only acceptable when there
# is genuinely no test file; with test files present it means something is
# broken (import error hidden by a filter, wrong path...) and counts as failure.
test_files=$(find tests -name 'test_*.py' -o -name '*_test.py' 2>/dev/null | head -1)
if [[ -n "$test_files" ]]; then
    stage "pytest tests"
    "$PYTHON" -m pytest tests -q -ra --timeout=300 "$@" || failed+=("pytest tests (exit $?)")
else
    stage "pytest tests: no test files, skipped"
fi

notebooks=$(find notebooks -name '*.ipynb' -not -path '*/.ipynb_checkpoints/*' 2>/dev/null | head -1)
if [[ -n "$notebooks" ]]; then
    stage "notebooks (nbmake)"
    "$PYTHON" -m pytest --nbmake notebooks -q --nbmake-timeout=300 -p no:cacheprovider \
        || failed+=("notebooks (exit $?)")
else
    stage "notebooks: none, skipped"
fi

if [[ ${#failed[@]} -gt 0 ]]; then
    printf '\nFAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi
printf '\nall stages passed\n' >&2
