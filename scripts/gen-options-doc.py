"""Writes the options table of docs/quickstart.md from the engine's table of options
(src/engine/options.rs), so the docs cannot drift from the options.

    python scripts/gen-options-doc.py        (tests/test_options.py checks the result is current)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "python"))
    from segproxy.options import docs_with_table

    path = ROOT / "docs" / "quickstart.md"
    path.write_text(docs_with_table(path.read_text()))
