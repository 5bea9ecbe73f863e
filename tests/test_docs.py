"""The docs say what the program does: the CLI reference is generated from the parser and
must be current, and every flag `--help` lists is documented."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_generator():
    spec = importlib.util.spec_from_file_location(
        "gen_cli_doc", ROOT / "scripts" / "gen-cli-doc.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_current() -> None:
    expected = load_generator().render()
    actual = (ROOT / "docs" / "cli.md").read_text()
    assert actual == expected, "docs/cli.md is stale: run python scripts/gen-cli-doc.py"


def test_every_flag_in_help_is_documented() -> None:
    help_text = subprocess.run(
        [sys.executable, "-m", "segproxy", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    flags = {word.strip("[],:;.()") for word in help_text.split() if word.startswith("--")}
    flags = {f.split("=")[0] for f in flags if len(f) > 2}
    doc = (ROOT / "docs" / "cli.md").read_text()
    missing = sorted(f for f in flags if f"`{f}`" not in doc)
    assert not missing, f"flags missing from docs/cli.md: {missing}"
    assert "--segment-rule" in flags and "--ca-dir" in flags


def test_readme_names_the_test_command_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in readme
    assert "scripts/test.sh" in ci
