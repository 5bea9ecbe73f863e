"""Types are checked, not trusted: mypy --strict passes on the package, the examples and the
code of every notebook (its cells run as the body of one async function, as Jupyter runs
them with top-level await)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(300)


def notebook_as_module(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    code = "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    return "async def notebook() -> None:\n" + textwrap.indent(code, "    ") + "\n"


def test_mypy_strict(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        (tmp_path / f"nb_{nb.stem.replace('-', '_')}.py").write_text(notebook_as_module(nb))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-incremental",
            "--ignore-missing-imports",
            str(ROOT / "python" / "segproxy"),
            str(ROOT / "examples"),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_stubs_match_the_extension() -> None:
    """`_engine.pyi` describes what the compiled module really exports (mypy.stubtest)."""
    pytest.importorskip("mypy")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python")}
    result = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "segproxy._engine"],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
