"""The options of `start_proxy_server` are one table, seen the same way everywhere: the
defaults of `ENGINE_OPTIONS`, the keys of `ProxyOptions`, the engine's `start_server`
(compiled signature and `_engine.pyi`), the command line's flags and the options table in
docs/quickstart.md. An option added in one place and not the others fails here."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path
from typing import Any

import pytest
from segproxy import _engine, cli
from segproxy._server import ENGINE_OPTIONS, ProxyOptions

ROOT = Path(__file__).resolve().parent.parent

#: Options handled in Python before the engine starts (not `start_server` keywords).
PYTHON_ONLY = {"shutdown_timeout"}

#: Options that the command line gives under another name, or builds from other flags.
CLI_NAMES = {
    "allow_domains": "allow_domain",
    "deny_domains": "deny_domain",
    "flows_file": "record_flows",
    "rules": "segment_rule",
}
#: Options the command line does not offer, and why.
NOT_ON_CLI = {
    "access_records": "the CLI keeps no records in memory (it has no Python reader)",
    "record_flows": "the CLI writes flows to a file (--record-flows FILE: flows_file)",
    "flows_capacity": "in-memory flows only",
    "hook_timeout": "the CLI runs no Python hooks",
    "pool_idle_timeout": "a library tuning knob",
    "max_header_bytes": "a library tuning knob",
}
#: Command-line defaults that differ on purpose: None means "the engine's default".
CLI_DEFAULT_IS_NONE = {"dns_port", "dns_transport", "record_flows"}


def engine_signature() -> inspect.Signature:
    return inspect.signature(_engine.start_server)


def stub_defaults() -> dict[str, str]:
    """`start_server`'s keyword defaults in `_engine.pyi`, as source text."""
    tree = ast.parse((ROOT / "python/segproxy/_engine.pyi").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "start_server":
            args = node.args
            return {
                a.arg: ast.unparse(d) if d is not None else "<required>"
                for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True)
            }
    raise AssertionError("start_server not in _engine.pyi")


def same(python_default: Any, text: str) -> bool:
    """A Python default and its spelling in a signature (`...` stands for a list)."""
    if text == "...":
        return isinstance(python_default, (tuple, list)) and not python_default
    if text in ("()", "[]"):
        return python_default in ((), [])
    return repr(python_default) == text or (
        isinstance(python_default, str) and text == f'"{python_default}"'
    )


def test_proxy_options_names_every_option() -> None:
    assert set(ProxyOptions.__annotations__) == set(ENGINE_OPTIONS)


@pytest.mark.parametrize("name", sorted(set(ENGINE_OPTIONS) - PYTHON_ONLY))
def test_engine_signature_has_the_same_default(name: str) -> None:
    params = engine_signature().parameters
    assert name in params, f"_engine.start_server has no {name}="
    default = params[name].default
    text = "..." if default is Ellipsis else repr(default)
    if name == "rules":
        assert default is None and ENGINE_OPTIONS[name] is None
        return
    assert same(ENGINE_OPTIONS[name], text) or default == ENGINE_OPTIONS[name], (
        name,
        default,
        ENGINE_OPTIONS[name],
    )


@pytest.mark.parametrize("name", sorted(set(ENGINE_OPTIONS) - PYTHON_ONLY))
def test_stub_has_the_same_default(name: str) -> None:
    stub = stub_defaults()
    assert name in stub, f"_engine.pyi start_server has no {name}="
    assert stub[name] == "..." or same(ENGINE_OPTIONS[name], stub[name]), (
        name,
        stub[name],
        ENGINE_OPTIONS[name],
    )


def test_engine_and_stub_take_the_same_keywords() -> None:
    compiled = {n for n, p in engine_signature().parameters.items() if p.kind is p.KEYWORD_ONLY}
    assert compiled == set(stub_defaults())


@pytest.mark.parametrize("name", sorted(ENGINE_OPTIONS))
def test_the_command_line_offers_it_or_says_why_not(name: str) -> None:
    flags = {a.dest: a for a in cli.build_parser()._actions}
    if name in NOT_ON_CLI:
        assert CLI_NAMES.get(name, name) not in flags or name == "record_flows", name
        return
    dest = CLI_NAMES.get(name, name)
    assert dest in flags, f"no --{dest.replace('_', '-')} for option {name}"
    if name in CLI_NAMES or name in CLI_DEFAULT_IS_NONE:
        return
    default = flags[dest].default
    want = ENGINE_OPTIONS[name]
    assert default == want or (default == [] and want == ()), (name, default, want)


def test_the_docs_table_lists_every_option() -> None:
    text = (ROOT / "docs/quickstart.md").read_text()
    section = text.split("## Options", 1)[1]
    table = "\n".join(line for line in section.splitlines() if line.startswith("| `"))
    listed = set(re.findall(r"`(\w+)`", table))
    assert set(ENGINE_OPTIONS) <= listed, sorted(set(ENGINE_OPTIONS) - listed)
