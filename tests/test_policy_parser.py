"""One parser of segmentation policies, in the engine (`SegmentPolicy::parse`): a rule line,
`Rules(...)`, a hook's `set_segmentation` and the command line's default policy all ask it, so
a policy is taken or refused the same way, for the same reason, wherever it is given."""

from __future__ import annotations

import subprocess
import sys
import typing

import pytest
from segproxy import HTTPSProxyHandler, Rules, _engine, cli
from segproxy.rules import STRATEGIES, Strategy

#: (strategy, chunk, min, max, delay in ms) and the engine's reason for refusing it.
BAD = [
    ("zigzag", 1024, None, None, 0, "unknown strategy 'zigzag' (expected none, fixed or random)"),
    ("fixed", 0, None, None, 0, "fixed strategy requires chunk > 0"),
    ("random", 1024, 5, None, 0, "random strategy requires both min and max"),
    ("random", 1024, 0, 5, 0, "random strategy requires min/max > 0"),
    ("random", 1024, 9, 5, 0, "random strategy requires min <= max (min=9 max=5)"),
    ("fixed", 10, None, None, -1, "delay must be >= 0"),
]


def rule_line(strategy: str, chunk: int, low: int | None, high: int | None, delay: int) -> str:
    line = f"a.test=segment_upstream,strategy={strategy},chunk={chunk},delay={delay}"
    line += f",min={low}" if low is not None else ""
    return line + (f",max={high}" if high is not None else "")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "segproxy", *args, "--validate-rules"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_one_list_of_strategies() -> None:
    assert STRATEGIES == _engine.SEGMENT_STRATEGIES == typing.get_args(Strategy)
    action = next(
        a for a in cli.build_parser()._actions if "--segment-strategy" in a.option_strings
    )
    assert tuple(action.choices or ()) == _engine.SEGMENT_STRATEGIES


@pytest.mark.parametrize("strategy, chunk, low, high, delay, reason", BAD)
def test_a_bad_policy_is_refused_alike_everywhere(
    strategy: str, chunk: int, low: int | None, high: int | None, delay: int, reason: str
) -> None:
    with pytest.raises(ValueError) as engine:
        _engine.segment_policy(strategy, chunk, low, high, delay)
    assert str(engine.value) == reason
    with pytest.raises(ValueError) as text:
        Rules.parse(rule_line(strategy, chunk, low, high, delay), source="r.rules")
    assert str(text.value) == f"r.rules:1: {reason}"
    with pytest.raises(ValueError) as default_policy:
        Rules(strategy=strategy, chunk=chunk, min=low, max=high, delay_ms=delay)  # type: ignore[arg-type]
    assert str(default_policy.value) == reason
    if strategy != "random" or None not in (low, high):  # its sizes are never None
        with pytest.raises(ValueError) as hook:
            HTTPSProxyHandler().set_segmentation(
                strategy,  # type: ignore[arg-type]
                chunk,
                low or 0,
                high or 0,
                delay,
            )
        assert str(hook.value) == reason
    out = run_cli("--segment-rule", rule_line(strategy, chunk, low, high, delay))
    assert out.returncode == 1
    assert out.stderr == f"segproxy: error: --segment-rule#1:1: {reason}\n"


def test_the_command_line_refuses_an_unknown_strategy_as_a_usage_error() -> None:
    out = run_cli("--segmentation", "segment_upstream", "--segment-strategy", "zigzag")
    assert out.returncode == 2
    assert "invalid choice: 'zigzag'" in out.stderr, out.stderr


def test_the_command_line_names_its_flags_with_the_engines_reason() -> None:
    out = run_cli(
        "--segmentation",
        "segment_upstream",
        "--segment-min-size",
        "9",
        "--segment-max-size",
        "5",
    )
    assert out.returncode == 1
    assert out.stderr == (
        "segproxy: error: random strategy requires min <= max (min=9 max=5) "
        "(--segment-min-size and --segment-max-size)\n"
    )


@pytest.mark.parametrize(
    "strategy, chunk, low, high, delay",
    [("none", 1024, None, None, 0), ("fixed", 512, None, None, 5), ("random", 1024, 64, 256, 2)],
)
def test_a_good_policy_is_the_same_everywhere(
    strategy: str, chunk: int, low: int | None, high: int | None, delay: int
) -> None:
    policy = _engine.segment_policy(strategy, chunk, low, high, delay)
    from_text = Rules.parse(rule_line(strategy, chunk, low, high, delay))
    from_default = Rules(strategy=strategy, chunk=chunk, min=low, max=high, delay_ms=delay)  # type: ignore[arg-type]
    for rules in (from_text, from_default):
        assert rules.decide("GET", "http", "a.test", 80).policy == policy
