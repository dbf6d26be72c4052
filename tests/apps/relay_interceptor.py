"""A small DIAL interceptor service for the tests (aiohttp, run as its own process).

One process serves any number of interceptors, one per path prefix: the interceptor `first` is
configured in Tollgate with the endpoint `http://127.0.0.1:<port>/first/chat/completions`.
For each call it:

1. records what it got (path, query, headers, body) under its name;
2. appends ` [<name>]` to the content of the last message, so the model's request shows the
   chain it went through;
3. calls Tollgate back at `POST <dial-url>/openai/deployments/interceptor/<api>?<query>` with the
   per-request key it received as `Api-Key` (spec proxy 8 and 15.5), passing on the
   `Authorization` it received, and the `X-Fake-*` and `X-Test-*` headers;
4. relays the answer (status, `Content-Type`, body), chunk by chunk when it streams.

The request header `X-Test-Mode-<name>` changes what the interceptor `<name>` does:

- `call:<deployment>`: call that deployment instead of `interceptor`;
- `auth:<token>`: call back with `Authorization: Bearer <token>` (a credential of its own);
- `drop`: close the connection without answering;
- `sleep:<ms>`: wait that long first.

Test-only endpoints: `GET /_test/requests/<name>` (what the interceptor got, oldest first),
`DELETE /_test/requests` (forget everything), `GET /health`.

    python apps/relay_interceptor.py --port 8123 --dial-url http://127.0.0.1:8080
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import aiohttp
from aiohttp import web

APIS = ("chat/completions", "completions", "embeddings")
RECORDS = web.AppKey("records", dict)
DIAL_URL = web.AppKey("dial_url", str)
SESSION = web.AppKey("session", aiohttp.ClientSession)


def _split(path: str) -> tuple[str, str]:
    """`/<name>/<api>` → (name, api)."""
    name, _, api = path.strip("/").partition("/")
    if api not in APIS:
        raise web.HTTPNotFound(text=f"no interceptor at {path}")
    return name, api


def _modified(body: bytes, name: str) -> bytes:
    request: dict[str, Any] = json.loads(body)
    messages = request.get("messages")
    if messages and isinstance(messages[-1].get("content"), str):
        messages[-1]["content"] += f" [{name}]"
    return json.dumps(request).encode()


def _passed_on(headers: Any) -> dict[str, str]:
    return {
        name: value
        for name, value in headers.items()
        if name.lower().startswith(("x-fake-", "x-test-")) or name.lower() == "authorization"
    }


async def intercept(request: web.Request) -> web.StreamResponse:
    name, api = _split(request.path)
    body = await request.read()
    request.app[RECORDS].setdefault(name, []).append(
        {
            "path": request.path,
            "query": request.query_string,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body": body.decode(),
        }
    )
    mode = request.headers.get(f"X-Test-Mode-{name}", "")
    if mode == "drop":
        assert request.transport is not None
        request.transport.abort()
        return web.Response()  # never sent: the connection is gone

    if mode.startswith("sleep:"):
        await asyncio.sleep(int(mode.removeprefix("sleep:")) / 1000)

    target = "interceptor"
    headers = _passed_on(request.headers)
    headers["Api-Key"] = request.headers.get("Api-Key", "")
    headers["Content-Type"] = "application/json"
    if mode.startswith("call:"):
        target = mode.removeprefix("call:")
    elif mode.startswith("auth:"):
        headers["Authorization"] = "Bearer " + mode.removeprefix("auth:")
    url = f"{request.app[DIAL_URL]}/openai/deployments/{target}/{api}"
    if request.query_string:
        url += "?" + request.query_string

    async with request.app[SESSION].post(
        url, data=_modified(body, name), headers=headers
    ) as answer:
        response = web.StreamResponse(status=answer.status)
        response.content_type = answer.content_type
        await response.prepare(request)
        async for chunk in answer.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def records(request: web.Request) -> web.Response:
    return web.json_response(request.app[RECORDS].get(request.match_info["name"], []))


async def clear(request: web.Request) -> web.Response:
    request.app[RECORDS].clear()
    return web.Response()


async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def build_app(dial_url: str) -> web.Application:
    app = web.Application()
    app[RECORDS] = {}
    app[DIAL_URL] = dial_url.rstrip("/")

    async def session(app: web.Application) -> Any:
        app[SESSION] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        yield
        await app[SESSION].close()

    app.cleanup_ctx.append(session)
    app.router.add_get("/health", health)
    app.router.add_get("/_test/requests/{name}", records)
    app.router.add_delete("/_test/requests", clear)
    app.router.add_post("/{tail:.*}", intercept)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dial-url", required=True)
    args = parser.parse_args()
    web.run_app(build_app(args.dial_url), host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
