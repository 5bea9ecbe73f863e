"""Writes docs/cli.md from the `segproxy` argument parser, so the reference cannot drift.

    python scripts/gen-cli-doc.py        (tests/test_docs.py checks the result is current)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def render() -> str:
    os.environ["COLUMNS"] = "100"
    sys.path.insert(0, str(ROOT / "python"))
    from segproxy.cli import build_parser

    parser = build_parser()
    lines = [
        "# Command line reference",
        "",
        "Generated from `segproxy --help` by `python scripts/gen-cli-doc.py`; a test keeps it current.",
        "`segproxy` and `python -m segproxy` are the same program. A bad flag prints usage and exits 2.",
        "",
    ]
    for group in parser._action_groups:  # argparse keeps its groups here; read-only use
        actions = [a for a in group._group_actions if a.option_strings]
        if not actions:
            continue
        title = group.title or "options"
        lines += [f"## {title[0].upper()}{title[1:]}", "", "| flag | meaning |", "|---|---|"]
        for action in actions:
            flags = ", ".join(f"`{o}`" for o in action.option_strings)
            if action.metavar or (action.nargs != 0 and action.choices is None):
                flags += f" `{action.metavar or action.dest.upper()}`"
            if action.choices is not None:
                flags += " `{" + ",".join(map(str, action.choices)) + "}`"
            meaning = (action.help or "").replace("|", "\\|")
            if "%(prog)s" in meaning:
                meaning = meaning.replace("%(prog)s", "segproxy")
            lines.append(f"| {flags} | {meaning} |")
        lines.append("")
    lines += ["## Full help text", "", "```", parser.format_help().rstrip(), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    (ROOT / "docs" / "cli.md").write_text(render())
