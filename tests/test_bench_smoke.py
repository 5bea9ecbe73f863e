"""The benchmark harness itself still runs (a tiny run, a few seconds)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(120)
def test_bench_quick_smoke(tmp_path):
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            pytest.skip(f"{tool} is not installed")
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "run.py"),
            "--quick",
            "--rounds",
            "1",
            "--bulk-size",
            "4MiB",
            "--wrk-duration",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| CONNECT tunnel upload |" in proc.stdout
    data = json.loads(out.read_text())
    direct = data["metrics"]["tunnel_up"]["median"]["direct"]
    assert direct > 0
    assert data["metrics"]["ka_rate"]["median"]["direct"] > 0
    # The floor relay (bench/floor_relay.c) relayed real requests and its CPU was counted.
    assert data["metrics"]["ka_rate"]["median"]["floor"] > 0
    assert data["metrics"]["ka_cpu"]["median"]["floor"] > 0
    if "segproxy" in data["meta"]["contenders"]:
        for key in ("rules_norules_up", "rules_none_up", "rules_fixed1k_down", "decide_py"):
            assert data["metrics"][key]["median"]["segproxy"] > 0, key
        assert "strategy=none rule vs no rules" in proc.stdout
