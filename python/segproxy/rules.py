"""`Rules`: routing, blocking, intercept-or-tunnel and segmentation in one table.

The text format is SegmentedProxy's, one rule a line::

    HOST_GLOB=MODE[,strategy=none|fixed|random][,chunk=N][,min=N][,max=N][,delay=MS]
        [,action=direct|upstream|block][,upstream=[socks5://][USER:PASS@]HOST:PORT][,reason=TEXT]
        [,scheme=http|https][,method=M][,path_prefix=/p][,port=N]
        [,direction=up|down|both][,intercept=yes|no][,capture=yes|no][,h2c=yes|no]

The rule with SegmentedProxy's highest score wins: +1000 for a host glob other than ``*``,
+500 for a glob without ``*`` or ``?`` (else +200 for ``*.suffix``), +100 each for
``scheme=``, ``method=`` and (ours) ``port=``, plus the length of ``path_prefix``; on equal
scores a ``block`` rule wins, then the earlier rule.

A server uses a copy of its `Rules` taken when it starts: changing a `Rules` object later
does not change a running server.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Literal

from . import _engine

__all__ = ["Decision", "Rule", "Rules"]

#: A segmentation strategy's name: the engine's (`STRATEGIES`), as a type; a test keeps the
#: two equal.
Strategy = Literal["none", "fixed", "random"]
#: The names of the strategies the engine's one parser of policies knows.
STRATEGIES: tuple[str, ...] = _engine.SEGMENT_STRATEGIES
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
    """SegmentedProxy's explain line (``matched host_glob=...; ctx ...; score=N;
    action=A``), then which rule it was; or ``no rule matched; using default policy``."""
    score: int | None = None
    """SegmentedProxy's score of the winning rule; None when no rule matched."""
    mode: str = "direct"
    """The winning rule's mode word (or the default policy's)."""
    capture: bool | None = None
    """The winning rule's ``capture=`` (None: as the server's ``capture_bodies`` says)."""


@dataclass(frozen=True)
class Rule:
    """One rule as an object; ``Rule(...).text()`` is its line in the rule syntax.

    ``Rule("*.example.test", strategy="fixed", chunk=512, delay=10)`` segments (a rule
    with any of strategy, chunk, min, max or delay uses mode ``segment_upstream``);
    ``Rule("*.example.test", rate="100k")`` limits the rate to 100,000 bytes a second;
    ``Rule("ads.test", action="block", reason="no ads")`` blocks. Unset fields are left out.
    """

    host: str
    strategy: Strategy | None = None
    chunk: int | None = None
    min: int | None = None
    max: int | None = None
    delay: int | None = None
    """Milliseconds between chunks."""
    rate: int | str | None = None
    """Bytes per second (``100k``, ``1M``: suffixes k = 1,000 and M = 1,000,000): after a
    chunk of n bytes the next waits n / rate (at least ``delay``); a burst is one chunk."""
    ttfb: int | None = None
    """Milliseconds the first byte of each response (a tunnel's first byte toward the client)
    is held, whatever the direction."""
    latency: float | None = None
    """Milliseconds every byte is held in its direction (a delay line: throughput is kept)."""
    jitter: float | None = None
    """Milliseconds of jitter on ``latency``: each write's latency is drawn uniformly in
    latency ± jitter (never below zero); bytes keep their order."""
    fault: str | None = None
    """``reset@N`` (the peer sees a TCP reset after N bytes), ``close@N`` (a clean close after
    N bytes) or ``stall@N:MS`` (a pause of MS milliseconds after N bytes), in the rule's
    direction."""
    fault_rate: float | None = None
    """The share of flows (0..1) that draw the fault; default 1."""
    seed: int | None = None
    """Makes fault draws, jitter and random chunk sizes repeat from run to run."""
    action: Literal["direct", "upstream", "block"] | None = None
    upstream: str | None = None
    """``[USER:PASS@]HOST:PORT`` of an HTTP upstream proxy, or
    ``socks5://[USER:PASS@]HOST:PORT`` of a SOCKS5 one (with ``action="upstream"``)."""
    reason: str | None = None
    scheme: Literal["http", "https"] | None = None
    method: str | None = None
    path_prefix: str | None = None
    port: int | None = None
    direction: DirectionName | None = None
    intercept: bool | None = None
    capture: bool | None = None
    """Keep the matching flows' request and response heads, phase times and bodies (up to
    the server's ``capture_bodies``, else 64 KiB each) in their flow records; False leaves
    them out even when ``capture_bodies`` captures every flow."""
    h2c: bool | None = None
    """Plain ``http://`` requests to the origin in HTTP/2 over cleartext (prior knowledge)."""

    _SEGMENTING = ("strategy", "chunk", "min", "max", "delay")

    def text(self) -> str:
        """The rule line, e.g. ``*.example.test=segment_upstream,strategy=fixed,chunk=512``."""
        mode = (
            "segment_upstream"
            if any(getattr(self, k) is not None for k in self._SEGMENTING)
            else "direct"
        )
        parts = [f"{self.host}={mode}"]
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "host" or value is None:
                continue
            if f.name in ("intercept", "capture", "h2c"):
                value = "yes" if value else "no"
            text = str(value)
            if "," in text or "\n" in text:
                raise ValueError(
                    f"rule {self.host}: {f.name} cannot contain a comma or a line break: {text!r}"
                )
            parts.append(f"{f.name}={text}")
        return ",".join(parts)


class Rules:
    """An ordered rule set with a default segmentation policy.

    Built from text (`parse`), a file (`from_file`) or `Rule` objects (`from_rules`); each
    add is all or nothing. A server takes a snapshot of its rules when it starts: later
    changes to this object do not reach it until it is given to `ProxyServer.set_rules`.
    """

    def __init__(
        self,
        strategy: Strategy = "none",
        chunk: int = 1024,
        min: int | None = None,
        max: int | None = None,
        delay_ms: float = 0.0,
        direction: DirectionName = "up",
        mode: str | None = None,
        rate: int | str | None = None,
        ttfb_ms: int | None = None,
    ) -> None:
        """The default policy, used when no rule matches; `mode` is the mode word listings
        and access lines show for it (default: ``segment_upstream`` if it segments, else
        ``direct``); `rate` limits every flow the default decides (bytes a second, as in
        `Rule.rate`) and `ttfb_ms` holds the first byte of every response it decides. The engine
        checks the policy as it checks a rule's (ValueError)."""
        self._set = _engine.RuleSet(
            strategy,
            chunk,
            min,
            max,
            delay_ms,
            direction,
            mode,
            None if rate is None else str(rate),
            ttfb_ms,
        )

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

    @classmethod
    def from_rules(
        cls, rules: Iterable[Rule | str], source: str = "<rules>", **default_policy: object
    ) -> Rules:
        """Rules from `Rule` objects (or rule lines); errors name ``source:N``, N counting
        from 1 in the order given."""
        built = cls(**default_policy)  # type: ignore[arg-type]
        built.add("\n".join(r.text() if isinstance(r, Rule) else r for r in rules), source)
        return built

    def add(self, text: str | Rule, source: str = "<text>") -> Rules:
        """Add rules: text (one rule a line) or one `Rule` (all or none); returns self for
        chaining."""
        self._set.add_text(text.text() if isinstance(text, Rule) else text, source)
        return self

    def add_file(self, path: str | os.PathLike[str]) -> Rules:
        self._set.add_file(os.fspath(path))
        return self

    def decide(self, method: str, scheme: str, host: str, port: int, path: str = "/") -> Decision:
        """The decision for a request (use method "CONNECT" and path "" for tunnels)."""
        return Decision(**self._set.decide(method, scheme, host, port, path))

    def describe(self) -> str:
        """The default policy and the numbered rules, as ``--validate-rules`` prints them
        (SegmentedProxy's format: ``Default policy: ...``, ``Rules:``, ``01. host=...``)."""
        return self._set.describe()

    def warnings(self) -> list[str]:
        """``FILE:LINE: note`` for each accepted line that does nothing or looks wrong (an
        unknown mode word, an empty host, an out-of-range upstream port, dead keys)."""
        return self._set.warnings()

    def __len__(self) -> int:
        return len(self._set)

    def __repr__(self) -> str:
        return f"<segproxy.Rules {len(self)} rules; a server uses a snapshot taken when it starts>"

    @property
    def engine_rules(self) -> _engine.RuleSet:
        return self._set
