#!/usr/bin/env bash
# Install everything the test suite and the benchmark use, then build and
# install segproxy itself. Idempotent: a second run installs nothing new and
# only rebuilds what changed.
#
#   SEGPROXY_PROFILE=release|dev   cargo profile for the extension (default release)
#   SKIP_APT=1 / SKIP_PIP=1 / SKIP_BUILD=1   skip a step
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
export PIP_ROOT_USER_ACTION=ignore
log() { printf '==> %s\n' "$*" >&2; }

# --- Debian packages --------------------------------------------------------
# gcc and libc6-dev build bench/floor_relay.c (the keep-alive benchmark's floor).
APT_PACKAGES=(squid tinyproxy dnsmasq-base nginx wrk chromium libnss3-tools curl nghttp2-server nghttp2-client socat gcc libc6-dev)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done

if [[ -n "${SKIP_APT:-}" ]]; then
    log "apt: skipped (SKIP_APT set)"
elif [[ ${#missing[@]} -eq 0 ]]; then
    log "apt: all present (${APT_PACKAGES[*]})"
else
    SUDO=()
    if [[ $(id -u) -ne 0 ]]; then SUDO=(sudo); fi
    log "apt: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get update
    # Install the full list so versions stay consistent; apt skips what is there.
    "${SUDO[@]}" apt-get install -y --no-install-recommends "${APT_PACKAGES[@]}"
fi

# --- Python test dependencies -------------------------------------------------
PIP_PACKAGES=("httpx[socks]" h2 pytest pytest-asyncio pytest-timeout nbmake nbclient ipykernel
              matplotlib pandas tqdm ipywidgets urllib3 mypy ruff==0.17.6 cryptography websockets maturin haralyzer)
if [[ -n "${SKIP_PIP:-}" ]]; then
    log "pip: skipped (SKIP_PIP set)"
else
    log "pip: ${PIP_PACKAGES[*]}"
    # Already-satisfied requirements are not downloaded again.
    "$PYTHON" -m pip install --disable-pip-version-check -q "${PIP_PACKAGES[@]}"
fi

# --- Rust lint components ------------------------------------------------------
for component in rustfmt clippy; do
    cmd=${component/rustfmt/fmt}
    if ! cargo "$cmd" --version >/dev/null 2>&1 && command -v rustup >/dev/null; then
        log "rustup: adding $component"
        rustup component add "$component" || log "rustup: could not add $component"
    fi
done

# --- segproxy itself ------------------------------------------------------------
# An editable install (python/segproxy on sys.path, the compiled
# segproxy/_engine*.so placed next to it) built by maturin through pip.
# Release profile by default: the tests move real bulk data through the proxy
# and the benchmark measures it, and an unoptimised tokio/rustls build is
# several times slower; cargo reuses target/ so later runs are incremental.
if [[ -n "${SKIP_BUILD:-}" ]]; then
    log "build: skipped (SKIP_BUILD set)"
elif [[ ! -f pyproject.toml ]]; then
    log "build: no pyproject.toml yet; segproxy Python package not built"
else
    profile=${SEGPROXY_PROFILE:-release}
    log "build: pip install -e . (cargo profile $profile)"
    MATURIN_NO_INSTALL_RUST=1 MATURIN_PEP517_ARGS="--profile $profile" \
        "$PYTHON" -m pip install --disable-pip-version-check -q --no-build-isolation -e .
    # The package under test must be this checkout's, not another copy on sys.path.
    "$PYTHON" - <<'PY'
import os, sys
import segproxy, segproxy._engine
here = os.path.realpath("python")
where = os.path.realpath(segproxy.__file__)
print("segproxy importable from", where)
if not where.startswith(here + os.sep):
    sys.exit(f"segproxy is imported from {where}, not from this checkout ({here}): remove the other copy")
PY
fi
