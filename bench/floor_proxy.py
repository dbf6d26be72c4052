"""Bare pass-through HTTP proxy: the floor a Python (aiohttp) proxy can reach. No features."""

from __future__ import annotations

import argparse
import asyncio

import aiohttp
import uvloop
from aiohttp import web
from multidict import CIMultiDictProxy

# Per-connection headers (RFC 9110 section 7.6.1) plus the ones aiohttp recomputes itself.
DROP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer"}
    | {"proxy-connection", "transfer-encoding", "upgrade", "host", "content-length"}
)
SESSION = web.AppKey("session", aiohttp.ClientSession)


def _headers(headers: CIMultiDictProxy[str]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers.items() if k.lower() not in DROP]


async def _forward(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    upstream = request.app[SESSION]
    async with upstream.request(
        request.method, request.path_qs, headers=_headers(request.headers), data=body
    ) as up:
        headers = _headers(up.headers)
        if up.content_type != "text/event-stream":
            return web.Response(status=up.status, headers=headers, body=await up.read())
        resp = web.StreamResponse(status=up.status, headers=headers)
        try:
            await resp.prepare(request)
            async for chunk in up.content.iter_any():  # relay each piece as it arrives
                await resp.write(chunk)
            await resp.write_eof()
        except ConnectionError:
            pass  # the client left mid-stream (wrk does at the end of a run)
        return resp


async def _serve(port: int, upstream: str) -> None:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _forward)
    # One shared session with unlimited pooled keep-alive connections; bodies pass undecoded.
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(
        upstream, connector=connector, timeout=timeout, auto_decompress=False
    ) as session:
        app[SESSION] = session
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
        print(f"floor proxy listening on http://127.0.0.1:{port}", flush=True)
        await asyncio.Event().wait()  # forever: the benchmark ends it with SIGTERM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:9001")
    args = parser.parse_args()
    uvloop.run(_serve(args.port, args.upstream.rstrip("/")))


if __name__ == "__main__":
    main()
