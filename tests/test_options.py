"""The options of `start_proxy_server` are one table, in the engine (src/engine/options.rs,
`_engine.option_table()`), and everything else is made from it or checked against it here:
`ENGINE_OPTIONS`, the `ProxyOptions` type that names them, the command line's flags (whose
names, defaults and checks are frozen), the options table of docs/quickstart.md, and the
engine's one parser of their values (`_engine.start_server(**options)`)."""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import segproxy
from segproxy import _engine, cli
from segproxy._server import ProxyOptions
from segproxy.options import ENGINE_OPTIONS, OPTIONS, docs_with_table, markdown_table

ROOT = Path(__file__).resolve().parent.parent
BY_NAME = {o["name"]: o for o in OPTIONS}

#: Every option's command-line flag, as users type it today (frozen: the table must keep
#: them), or None when it has none.
CLI_FLAGS = {
    "proxy_auth": "--proxy-auth",
    "allow_open_proxy": "--allow-open-proxy",
    "connect_timeout": "--connect-timeout",
    "idle_timeout": "--idle-timeout",
    "header_timeout": "--header-timeout",
    "response_timeout": "--response-timeout",
    "shutdown_timeout": "--shutdown-timeout",
    "max_connections": "--max-connections",
    "max_header_bytes": None,
    "hook_timeout": "--hook-timeout",
    "pool_idle_timeout": None,
    "rules": "--segment-rule",
    "flows_file": "--record-flows",
    "record_flows": None,
    "capture_bodies": "--capture-bodies",
    "flows_capacity": None,
    "dns_server": "--dns-server",
    "dns_port": "--dns-port",
    "dns_transport": "--dns-transport",
    "dns_cache_size": "--dns-cache-size",
    "allow_domains": "--allow-domain",
    "deny_domains": "--deny-domain",
    "deny_private": "--deny-private",
    "upstream_ca": "--upstream-ca",
    "upstream_insecure": "--upstream-insecure",
    "access_log": "--access-log",
    "access_log_format": "--access-log-format",
    "access_records": None,
    "stats_port": "--stats-port",
    "socks_port": "--socks-port",
}

#: The `ProxyOptions` annotation each kind of option needs.
ANNOTATIONS = {
    "seconds": "float",
    "seconds_or_zero": "float",
    "count": "int",
    "positive_count": "int",
    "port": "int",
    "bool": "bool",
    "path": "StrPath",
    "ip_address": "str",
    "strings": "str | Iterable[str]",
    "paths": "StrPath | Iterable[StrPath]",
    "credentials": "Iterable[str | tuple[str, str]]",
    "rules": "Rules | str",
}


def flags() -> dict[str, argparse.Action]:
    return {s: a for a in cli.build_parser()._actions for s in a.option_strings}


def test_engine_options_are_the_table() -> None:
    assert list(ENGINE_OPTIONS) == [o["name"] for o in OPTIONS]
    assert ENGINE_OPTIONS == {o["name"]: o["default"] for o in _engine.option_table()}
    assert len(OPTIONS) == len(set(ENGINE_OPTIONS))
    for o in OPTIONS:
        assert o["help"] and "\n" not in o["help"], o["name"]
        assert o["optional"] == (o["default"] is None), o["name"]
        assert (o["choices"] is not None) == (o["kind"] == "choice"), o["name"]
        if o["kind"] == "choice":
            assert o["default"] in o["choices"], o["name"]


def test_proxy_options_names_every_option() -> None:
    assert set(ProxyOptions.__annotations__) == set(ENGINE_OPTIONS)


@pytest.mark.parametrize("name", list(ENGINE_OPTIONS))
def test_proxy_options_types_it_as_its_kind(name: str) -> None:
    option = BY_NAME[name]
    hint = ProxyOptions.__annotations__[name]
    annotation = getattr(hint, "__forward_arg__", hint).replace("'", '"')
    if option["kind"] == "choice":
        want = "Literal[" + ", ".join(f'"{c}"' for c in option["choices"] or []) + "]"
    else:
        want = ANNOTATIONS[option["kind"]]
    if option["optional"]:
        want += " | None"
    assert annotation == want, (name, option["kind"])


def test_start_server_takes_options_generically() -> None:
    """The binding names only what is not an option; a new option needs no change there."""
    params = inspect.signature(_engine.start_server).parameters
    assert [p for p in params if params[p].kind is not inspect.Parameter.VAR_KEYWORD] == [
        "host",
        "port",
        "handler",
        "rules",
        "ca",
    ]
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


@pytest.mark.parametrize("name", list(ENGINE_OPTIONS))
def test_the_command_line_offers_it_or_says_why_not(name: str) -> None:
    option = BY_NAME[name]
    assert option["cli"] == CLI_FLAGS[name], name
    parser_flags = flags()
    if option["cli"] is None:
        assert option["cli_note"], f"{name}: no flag and no reason"
        assert f"--{name.replace('_', '-')}" not in parser_flags or name == "record_flows"
        return
    action = parser_flags[option["cli"]]
    if option["cli_by_hand"]:
        assert option["cli_note"], f"{name}: shaped by hand, but how?"
        return
    assert option["help"] in (action.help or ""), name
    # Made from the table: its value is the option's, and not giving it leaves the engine's
    # default (so the two cannot differ).
    assert action.dest == name and action.default is None, (name, action.default)
    if option["choices"]:
        assert list(action.choices or []) == option["choices"]


def test_a_flag_not_given_leaves_the_engine_default() -> None:
    args = cli.build_parser().parse_args([])
    assert cli.engine_options(args) == {}


@pytest.mark.parametrize(
    "name",
    [o["name"] for o in cli.option_flags() if o["default"] not in (None, False, ())],
)
def test_a_flag_given_its_default_reads_as_the_default(name: str) -> None:
    option = BY_NAME[name]
    default = option["default"]
    text = f"{default:g}" if isinstance(default, float) else str(default)
    args = cli.build_parser().parse_args([option["cli"] or "", text])
    assert cli.engine_options(args) == {name: default}


def test_list_flags_repeat_and_switches_switch() -> None:
    args = cli.build_parser().parse_args(
        ["--allow-domain", "a.test", "--allow-domain", ".b.test", "--deny-private"]
    )
    assert cli.engine_options(args) == {
        "allow_domains": ["a.test", ".b.test"],
        "deny_private": True,
    }


def test_the_docs_table_is_current() -> None:
    text = (ROOT / "docs/quickstart.md").read_text()
    assert docs_with_table(text) == text, "stale: run python scripts/gen-options-doc.py"
    for name in ENGINE_OPTIONS:
        assert f"| `{name}` |" in markdown_table()


def test_markdown_from_the_command_line() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "segproxy.options", "--markdown"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT / "python")},
    )
    assert r.returncode == 0 and r.stdout == markdown_table(), r.stderr


# --- the engine's parser of values --------------------------------------------------------


def start(**options: Any) -> None:
    """Starts (and stops) a server with these options, or raises what the engine says."""

    async def main() -> None:
        server = await segproxy.start_proxy_server(port=0, **options)
        await server.aclose(grace=0)

    asyncio.run(main())


def test_unknown_options_are_refused_naming_the_known() -> None:
    with pytest.raises(TypeError) as info:
        start(no_such_option=1, colour="red")
    message = str(info.value)
    assert message.startswith("unknown option(s) colour, no_such_option; known: ")
    assert all(name in message for name in ENGINE_OPTIONS)


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"idle_timeout": 0}, ValueError, "idle_timeout must be a positive number of seconds"),
        ({"idle_timeout": "soon"}, TypeError, "idle_timeout must be a number of seconds"),
        ({"shutdown_timeout": -1}, ValueError, "shutdown_timeout must be a number of seconds"),
        ({"max_connections": 0}, ValueError, "max_connections must be at least 1"),
        ({"dns_cache_size": -1}, ValueError, "dns_cache_size must be a whole number >= 0"),
        ({"stats_port": 70000}, ValueError, "stats_port must be a port number"),
        ({"stats_port": True}, ValueError, "stats_port must be a port number"),
        ({"deny_private": 1}, TypeError, "deny_private must be True or False"),
        ({"access_log_format": "xml"}, ValueError, 'access_log_format must be "text" or "json"'),
        ({"dns_server": "dns.test"}, ValueError, "dns_server must be an IP address"),
        ({"allow_domains": [b"x"]}, TypeError, "allow_domains: an option value is"),
        ({"proxy_auth": [42]}, TypeError, "proxy_auth entries must be"),
        ({"proxy_auth": [("us:er", "p")]}, ValueError, "a user name may not contain ':'"),
    ],
)
def test_bad_values_get_the_engines_message(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=re.escape(message)):
        start(**options)


def test_values_in_their_python_shapes(tmp_path: Path) -> None:
    """Paths as os.PathLike, one value for a list, (user, password) pairs, tuples."""
    (tmp_path / "ca.pem").write_bytes(segproxy.TLSStore.generate_ca().get_ca_pem())
    start(
        access_log=tmp_path / "access.log",
        flows_file=tmp_path / "flows.jsonl",
        upstream_ca=tmp_path / "ca.pem",
        allow_domains="a.test",
        deny_domains=("b.test", "c.test"),
        proxy_auth=[("user", "pass"), "other:pass"],
        idle_timeout=5,
        shutdown_timeout=0,
    )
    assert (tmp_path / "access.log").exists() and (tmp_path / "flows.jsonl").exists()


def test_the_table_is_what_the_server_uses() -> None:
    async def main() -> None:
        server = await segproxy.start_proxy_server(port=0, shutdown_timeout=2.5)
        assert server.shutdown_timeout == 2.5
        await server.aclose(grace=0)
        server = await segproxy.start_proxy_server(port=0)
        assert server.shutdown_timeout == ENGINE_OPTIONS["shutdown_timeout"]
        await server.aclose(grace=0)

    asyncio.run(main())
