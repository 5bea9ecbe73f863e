"""Log every request and response through a handler (HTTP and intercepted HTTPS).

Written as for asyncio-https-proxy: only the import line differs.

    python examples/log_requests.py --port 8080
"""

import asyncio

from segproxy import HTTPSForwardProxyHandler, TLSStore, start_proxy_server
from _common import announce, parse_args


class LoggingHandler(HTTPSForwardProxyHandler):
    async def on_client_connected(self) -> None:
        print("client connected", flush=True)

    async def on_request_received(self) -> None:
        print(f"request: {self.request.method} {self.request.url()}", flush=True)
        await self.forward_http_request()

    async def on_response_received(self) -> None:
        print(f"response: {self.response.status_code} {self.response.reason_phrase}", flush=True)

    async def on_response_complete(self) -> None:
        print("response complete", flush=True)

    async def on_error(self, error: Exception) -> None:
        print(f"error: {error}", flush=True)


async def main() -> None:
    args = parse_args(__doc__ or "")
    tls_store = TLSStore()  # a fresh CA for this run; clients must trust get_ca_pem()
    server = await start_proxy_server(
        handler_builder=lambda: LoggingHandler(), host=args.host, port=args.port, tls_store=tls_store
    )
    announce(server)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
