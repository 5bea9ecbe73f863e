"""The soak in its short mode (bench/soak.py --short): about 45 s of mixed load with faults.

Asserts what the soak checks, from its JSON summary: no body altered or lost, no good
operation failed, every fault ended in its expected class (none hung), the proxy answered the
probe throughout, and its descriptors and RSS came back to the idle level. No speed is
asserted: the machine may be loaded (the soak's waits are bounded and event-driven).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import MissingBinary, find_binary

ROOT = Path(__file__).resolve().parent.parent

#: RSS the proxy may keep after the load, over its idle level before it (MiB). What it keeps
#: on purpose: the access-record ring (10,000 records), the last 1,000 flow records, the DNS,
#: certificate and TLS-session caches, and memory glibc holds free (the soak reports how
#: much malloc_trim gives back).
RSS_TOLERANCE_MIB = 48
#: Descriptors over the idle level (the settle already waited for the pool to empty).
FDS_TOLERANCE = 2


@pytest.mark.timeout(900)
def test_short_soak(tmp_path):
    try:
        find_binary("nginx")
    except MissingBinary as e:
        pytest.skip(str(e))
    out = tmp_path / "soak.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "python"), env.get("PYTHONPATH", "")) if p
    )
    argv = [
        sys.executable,
        str(ROOT / "bench" / "soak.py"),
        "--short",
        "--rss-tolerance-mib",
        str(RSS_TOLERANCE_MIB),
        "--json",
        str(out),
    ]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        stdout, stderr = proc.communicate(timeout=850)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the soak stops every process it started
        stdout, stderr = proc.communicate(timeout=120)
        pytest.fail(f"the short soak did not finish in 850 s:\n{stderr[-4000:]}")
    assert out.exists(), f"no summary (exit {proc.returncode}):\n{stderr[-4000:]}"
    s = json.loads(out.read_text())
    report = stdout[-6000:]

    assert s["ops_total"] > 0, report
    assert s["bodies_checked"] > 0, report
    assert s["mismatches"] == 0, report
    assert sum(s["good_failures"].values()) == 0, report
    assert sum(s["fault_failures"].values()) == 0, report
    kinds = set(s["ops_by_kind"])
    for kind in ("http_keepalive", "tunnel", "intercept", "segment_http", "hook", "fault_reset"):
        assert kind in kinds, (kind, report)

    probe = s["probe"]
    assert probe["count"] > 0 and probe["failures"] == 0, report
    assert probe["served_after_settle"], report

    proxy = s["proxy"]
    assert proxy["settled"], report
    assert proxy["idle_after"]["fds"] <= proxy["idle_before"]["fds"] + FDS_TOLERANCE, report
    grown_mib = (proxy["idle_after"]["rss_kib"] - proxy["idle_before"]["rss_kib"]) / 1024
    assert grown_mib <= RSS_TOLERANCE_MIB, report

    assert s["passed"], report
    assert proc.returncode == 0, report
