"""Answer some requests from the handler without reaching the origin (a mock).

    python examples/mock_response.py --port 8080
    curl -x http://127.0.0.1:8080 http://anything.test/mock/hello
"""

import asyncio
import json

from segproxy import HTTPSForwardProxyHandler, start_proxy_server
from _common import announce, parse_args


class Mocker(HTTPSForwardProxyHandler):
    async def on_request_received(self) -> None:
        if not self.request.path.startswith("/mock/"):
            await self.forward_http_request()
            return
        body = json.dumps({"mocked": self.request.path}).encode()
        self.write_response(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
            + body
        )
        await self.flush_response()


async def main() -> None:
    args = parse_args(__doc__ or "")
    server = await start_proxy_server(Mocker, args.host, args.port)
    announce(server)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
