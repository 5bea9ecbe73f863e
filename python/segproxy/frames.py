"""Flow records as pandas DataFrames: one row a flow, or one row a chunk, typed columns and
times in seconds from each flow's start, ready to group and plot in a notebook.

pandas is optional: ``pip install segproxy[notebook]`` brings it (with matplotlib, httpx and
tqdm). The functions take any list of flow records: ``server.flows()``, or the lines of a
``--record-flows`` file read with ``json.loads``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["CHUNK_COLUMNS", "FLOW_COLUMNS", "chunks_frame", "flows_frame"]

#: Columns of `flows_frame`, with their pandas dtypes.
FLOW_COLUMNS: dict[str, str] = {
    "id": "string",
    "kind": "category",
    "method": "category",
    "target": "string",
    "rule": "category",
    "action": "category",
    "policy": "category",
    "direction": "category",
    "status": "int64",
    "outcome": "category",
    "error": "string",
    "bytes_up": "int64",
    "bytes_down": "int64",
    "start": "float64",
    "duration": "float64",
    "chunks": "int64",
    "short_chunks": "int64",
    "dropped_chunks": "int64",
    "websocket_up": "int64",
    "websocket_down": "int64",
}

#: Columns of `chunks_frame`, with their pandas dtypes.
CHUNK_COLUMNS: dict[str, str] = {
    "id": "string",
    "index": "int64",
    "direction": "category",
    "size": "int64",
    "t": "float64",
    "gap": "float64",
    "short": "category",
}


def _pandas() -> Any:
    try:
        import pandas
    except ImportError:
        raise ImportError(
            "flows_frame() and chunks_frame() need pandas: pip install segproxy[notebook]"
        ) from None
    return pandas


def flows_frame(flows: Iterable[Mapping[str, Any]]) -> Any:
    """One row a flow: its decision, outcome, bytes, `start` (seconds on the proxy's clock),
    `duration` (seconds; NaN while unfinished), how many chunks were written, short and
    not recorded, and how many WebSocket messages went each way."""
    pd = _pandas()
    rows = []
    for f in flows:
        end = f.get("end")
        rows.append(
            {
                "id": f["id"],
                "kind": f["kind"],
                "method": f["method"],
                "target": f["target"],
                "rule": f["rule"],
                "action": f["action"],
                "policy": f["policy"],
                "direction": f["direction"],
                "status": f["status"],
                "outcome": f["outcome"],
                "error": f.get("error"),
                "bytes_up": f.get("bytes_up", 0),
                "bytes_down": f.get("bytes_down", 0),
                "start": f["start"],
                "duration": (end - f["start"]) if end is not None else float("nan"),
                "chunks": len(f["chunks"]),
                "short_chunks": len(f["short_chunks"]),
                "dropped_chunks": f["dropped_chunks"],
                "websocket_up": f.get("websocket_up", 0),
                "websocket_down": f.get("websocket_down", 0),
            }
        )
    return pd.DataFrame(rows, columns=list(FLOW_COLUMNS)).astype(FLOW_COLUMNS)


def chunks_frame(flows: Iterable[Mapping[str, Any]]) -> Any:
    """One row a chunk written: the flow's `id`, the chunk's `index` in its flow, `direction`
    ("up" or "down"), `size` (bytes), `t` (seconds from the flow's start, when the chunk
    started), `gap` (seconds since the previous chunk of the same direction; NaN for the
    first) and `short` (why it is shorter than the policy asked, or missing)."""
    pd = _pandas()
    rows = []
    for f in flows:
        short = {index: why for index, why in f["short_chunks"]}
        last: dict[str, float] = {}
        for index, (direction, size, t) in enumerate(f["chunks"]):
            since = t - f["start"]
            previous = last.get(direction)
            last[direction] = since
            rows.append(
                {
                    "id": f["id"],
                    "index": index,
                    "direction": direction,
                    "size": size,
                    "t": since,
                    "gap": since - previous if previous is not None else float("nan"),
                    "short": short.get(index),
                }
            )
    return pd.DataFrame(rows, columns=list(CHUNK_COLUMNS)).astype(CHUNK_COLUMNS)
