"""Add a request header on the way out and remove a response header on the way back.

    python examples/modify_headers.py --port 8080
"""

import asyncio

from segproxy import HTTPSForwardProxyHandler, start_proxy_server
from _common import announce, parse_args


class HeaderRewriter(HTTPSForwardProxyHandler):
    async def on_request_received(self) -> None:
        self.request.headers.set("X-Proxied-By", "segproxy")
        self.request.headers.remove("Cookie")
        await self.forward_http_request()

    async def on_response_received(self) -> None:
        self.response.headers.remove("Server")
        self.response.headers.set("X-Rewritten", "yes")


async def main() -> None:
    args = parse_args(__doc__ or "")
    server = await start_proxy_server(HeaderRewriter, args.host, args.port)
    announce(server)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
