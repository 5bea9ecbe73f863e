"""The engine's modules import one way down: no module of src/engine (or of the binding,
src/python) imports, directly or through others, a module that imports it back
(docs/architecture.md)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imports(layer: Path) -> dict[str, set[str]]:
    """Module -> the sibling modules it names (`super::x` / `crate::engine::x`), outside
    comments and its test module."""
    mods = {p.stem: p.read_text() for p in layer.glob("*.rs") if p.stem != "mod"}
    graph: dict[str, set[str]] = {}
    for name, text in mods.items():
        code = re.split(r"#\[cfg\(test\)\]\s*mod tests", text)[0]
        code = "\n".join(line for line in code.splitlines() if not line.strip().startswith("//"))
        named = set(re.findall(r"super::(\w+)", code)) | set(
            re.findall(r"crate::engine::(\w+)", code)
        )
        graph[name] = {m for m in named if m in mods and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.mark.parametrize("layer", ["src/engine", "src/python"])
def test_no_import_cycles(layer: str) -> None:
    graph = imports(ROOT / layer)
    assert len(graph) > 5, graph
    assert cycles(graph) == [], {m: sorted(graph[m]) for c in cycles(graph) for m in c}


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
