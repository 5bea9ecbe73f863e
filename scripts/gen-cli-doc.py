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
    lines += [
        "## Why segproxy refuses to be an open proxy",
        "",
        "A proxy that listens on a reachable address and asks no credentials is an open relay:",
        "anyone who can reach the port can send traffic through it under your address, and reach",
        "what only your machine can (services on loopback or a private network behind it).",
        "So `segproxy` listens on 127.0.0.1 by default, and refuses to start on any other address",
        "(`--listen-host 0.0.0.0`, a LAN address, `::`) unless clients must authenticate",
        "(`--proxy-auth USER:PASS`, repeatable, or `--proxy-auth-file FILE` with one `USER:PASS` a",
        "line) or you say the network is trusted with `--allow-open-proxy`. From Python the same",
        "rule applies: `start_proxy_server(host=..., proxy_auth=[(\"user\", \"pass\")])` or",
        "`allow_open_proxy=True`.",
        "",
        "With credentials set, every request and CONNECT needs `Proxy-Authorization: Basic ...`",
        "(curl: `-x http://user:pass@host:port`); without it, or with a wrong one, the answer is",
        "`407 Proxy Authentication Required` with `Proxy-Authenticate: Basic realm=\"segproxy\"`.",
        "Credentials are compared in constant time, never logged, and the header is never",
        "forwarded to the destination. Basic sends the password in clear text: use it on networks",
        "where that is acceptable, or put the proxy behind an SSH tunnel or a VPN.",
        "",
    ]
    lines += ["## Full help text", "", "```", parser.format_help().rstrip(), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    (ROOT / "docs" / "cli.md").write_text(render())
