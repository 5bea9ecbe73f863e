"""Keep one CA across runs: load it from disk, or create and save it the first time.

    python examples/persistent_ca.py --port 8080 --ca-dir ./ca
    curl --cacert ./ca/ca-cert.pem -x http://127.0.0.1:8080 https://localhost:8443/
"""

import argparse
import asyncio
from pathlib import Path

from segproxy import HTTPSForwardProxyHandler, TLSStore, start_proxy_server


def get_or_create_ca(directory: Path) -> TLSStore:
    key, cert = directory / "ca-key.pem", directory / "ca-cert.pem"
    if key.exists() and cert.exists():
        print(f"loading CA from {directory}", flush=True)
        return TLSStore.load_ca_from_disk(key, cert)
    directory.mkdir(parents=True, exist_ok=True)
    store = TLSStore.generate_ca("US", "California", "San Francisco", "Example Lab", "Example Lab CA")
    store.save_ca_to_disk(key, cert)
    print(f"created CA in {directory}", flush=True)
    return store


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--ca-dir", type=Path, default=Path("ca"))
    parser.add_argument("--upstream-ca", action="append", default=[], help="extra CA files to trust for origins")
    args = parser.parse_args()
    store = get_or_create_ca(args.ca_dir)
    server = await start_proxy_server(
        HTTPSForwardProxyHandler, args.host, args.port, store, upstream_ca=args.upstream_ca
    )
    print(f"segproxy listening on {server.host}:{server.port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
