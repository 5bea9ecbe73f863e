#!/usr/bin/env python3
"""Executes notebooks in place with a real kernel and keeps their outputs (figures
included), so a reader browsing the repository sees them:

    python scripts/run-notebooks.py                       # every notebook
    python scripts/run-notebooks.py notebooks/06-*.ipynb  # some

The test command runs them again from the top (pytest --nbmake); this only refreshes what
is committed."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def main(paths: list[str]) -> int:
    root = Path(__file__).resolve().parent.parent / "notebooks"
    notebooks = [Path(p) for p in paths] or sorted(root.glob("*.ipynb"))
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        NotebookClient(
            nb,
            timeout=300,
            kernel_name="python3",
            resources={"metadata": {"path": str(path.parent)}},
        ).execute()
        nbformat.write(nb, path)
        print(f"executed {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
