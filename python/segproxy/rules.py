"""`Rules`: routing, blocking, intercept-or-tunnel and segmentation in one table.

The text format is SegmentedProxy's, one rule a line::

    HOST_GLOB=MODE[,strategy=none|fixed|random][,chunk=N][,min=N][,max=N][,delay=MS]
        [,action=direct|upstream|block][,upstream=[USER:PASS@]HOST:PORT][,reason=TEXT]
        [,scheme=http|https][,method=M][,path_prefix=/p][,port=N]
        [,direction=up|down|both][,intercept=yes|no]

The most specific matching rule wins (exact host, then ``*.suffix``, then other globs, then
``*``; scheme, method, port and path prefix add specificity; on a tie ``block`` wins).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from . import _engine

__all__ = ["Decision", "Rules"]

Strategy = Literal["none", "fixed", "random"]
DirectionName = Literal["up", "down", "both"]


@dataclass(frozen=True)
class Decision:
    """What the rules decide for one request, and why."""

    action: str
    """"direct", "upstream" or "block"."""
    upstream: str | None
    reason: str | None
    policy: str
    direction: str
    intercept: str
    rule: str | None
    """FILE:LINE of the rule that matched, None for the default."""
    rule_text: str | None
    explanation: str


class Rules:
    """An ordered rule set with a default segmentation policy."""

    def __init__(
        self,
        strategy: Strategy = "none",
        chunk: int = 1024,
        min: int = 1,
        max: int = 1024,
        delay_ms: float = 0.0,
        direction: DirectionName = "up",
    ) -> None:
        self._set = _engine.RuleSet(strategy, chunk, min, max, delay_ms, direction)

    @classmethod
    def parse(cls, text: str, source: str = "<text>", **default_policy: object) -> Rules:
        """Rules from text; a bad line raises ValueError naming ``source:LINE``."""
        rules = cls(**default_policy)  # type: ignore[arg-type]
        rules.add(text, source)
        return rules

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **default_policy: object) -> Rules:
        rules = cls(**default_policy)  # type: ignore[arg-type]
        rules.add_file(path)
        return rules

    def add(self, text: str, source: str = "<text>") -> Rules:
        """Add rules (all or none); returns self for chaining."""
        self._set.add_text(text, source)
        return self

    def add_file(self, path: str | os.PathLike[str]) -> Rules:
        self._set.add_file(os.fspath(path))
        return self

    def decide(self, method: str, scheme: str, host: str, port: int, path: str = "/") -> Decision:
        """The decision for a request (use method "CONNECT" and path "" for tunnels)."""
        return Decision(**self._set.decide(method, scheme, host, port, path))

    def describe(self) -> str:
        """The default policy and the numbered rules, as ``--validate-rules`` prints them."""
        return self._set.describe()

    def __len__(self) -> int:
        return len(self._set)

    def __repr__(self) -> str:
        return f"<segproxy.Rules {len(self)} rules>"

    @property
    def engine_rules(self) -> _engine.RuleSet:
        return self._set
