"""A plain forward proxy with an access log on stdout, from a script.

    python examples/forward_proxy.py --port 8080
    curl -x http://127.0.0.1:8080 http://127.0.0.1:8000/
"""

import asyncio

import segproxy
from _common import announce, parse_args


async def main() -> None:
    args = parse_args(__doc__ or "")
    async with await segproxy.start_proxy_server(host=args.host, port=args.port) as server:
        announce(server)
        seen = 0
        while server.is_serving():
            records = server.access_records()
            for record in records[seen:]:
                print(record["line"], flush=True)
            seen = len(records)
            await asyncio.sleep(0.2)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
