"""Shared command-line handling for the examples: where to listen, and a ready line."""

from __future__ import annotations

import argparse

import segproxy


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    return parser.parse_args()


def announce(server: segproxy.ProxyServer) -> None:
    print(f"segproxy listening on {server.host}:{server.port}", flush=True)
