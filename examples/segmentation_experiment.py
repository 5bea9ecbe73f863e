"""Download one body through several segmentation policies and print a table.

Starts its own origin and proxies on loopback, so it needs nothing else:

    python examples/segmentation_experiment.py
"""

import asyncio
import hashlib
import time

import httpx

import segproxy

SIZE = 512 * 1024
POLICIES = {
    "none": "*=direct",
    "fixed 1 KiB": "*=segment_upstream,strategy=fixed,chunk=1024,direction=down",
    "random 512-4096": "*=segment_upstream,strategy=random,min=512,max=4096,direction=down",
    "fixed 8 KiB, 1 ms": "*=segment_upstream,strategy=fixed,chunk=8192,delay=1,direction=down",
}
BODY = bytes(range(256)) * (SIZE // 256)


async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main() -> None:
    server = await asyncio.start_server(origin, "127.0.0.1", 0)
    url = "http://127.0.0.1:%d/body" % server.sockets[0].getsockname()[1]
    print(f"{'policy':20} {'chunks':>7} {'ms':>8} {'MiB/s':>8}")
    for name, rule in POLICIES.items():
        proxy = await segproxy.start_proxy_server(port=0, rules=rule, record_flows=True)
        async with httpx.AsyncClient(proxy=proxy.url) as client:
            started = time.perf_counter()
            response = await client.get(url)
            elapsed = time.perf_counter() - started
        await proxy.aclose()
        assert hashlib.sha256(response.content).digest() == hashlib.sha256(BODY).digest()
        chunks = [c for c in proxy.flows()[-1]["chunks"] if c[0] == "down"]
        print(f"{name:20} {len(chunks):7} {elapsed * 1000:8.1f} {SIZE / elapsed / 2**20:8.1f}", flush=True)
    server.close()
    await server.wait_closed()


if __name__ == "__main__":
    asyncio.run(main())
