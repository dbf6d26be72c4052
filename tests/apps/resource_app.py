"""A small DIAL application for the tests that uses Tollgate's resources with the per-request
key it was given (aiohttp; in the test's event loop, see `start_resource_app`).

Any `POST` path is a chat completions call of this app. For each one it records what it got
(path, headers, body) and then does, in order, what the request's
`custom_fields.configuration.actions` list says, with its `Api-Key` against `dial_url`:

- `{"op": "bucket"}`: `GET /v1/bucket`;
- `{"op": "read", "url": "files/<bucket>/<path>"}`: `GET /v1/<url>`;
- `{"op": "read_attached"}`: `GET /v1/<url>` of each attachment of the last message
  (`custom_content.attachments[].url`) that is not absolute and not a `data:` URL;
- `{"op": "write", "url": "files/...", "text": "..."}`: `PUT /v1/<url>` (multipart);
- `{"op": "write_appdata", "name": "x.txt", "text": "..."}`: the same into its app-data folder
  (`appdata` of `GET /v1/bucket`);
- `{"op": "call", "deployment": "<id>"}`: `POST /openai/deployments/<id>/chat/completions`
  with the request's messages.

Each action's result (`{"status": ..., "body": ...}`, the body as text) goes, in order, into the
answer: a non-streamed chat completion whose message content is the JSON list of results. The
key itself is never put in an answer.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import aiohttp
from aiohttp import web

RECORDS = web.AppKey("records", list)
DIAL_URL = web.AppKey("dial_url", str)
SESSION = web.AppKey("session", aiohttp.ClientSession)


def _is_resource_url(url: str) -> bool:
    return "://" not in url and not url.lower().startswith("data:")


async def _result(answer: aiohttp.ClientResponse) -> dict[str, Any]:
    return {"status": answer.status, "body": await answer.text()}


async def _act(
    app: web.Application, key: str, request: dict[str, Any], action: dict[str, Any]
) -> Any:
    session, dial = app[SESSION], app[DIAL_URL]
    headers = {"Api-Key": key}
    op = action["op"]
    if op == "bucket":
        async with session.get(f"{dial}/v1/bucket", headers=headers) as answer:
            return await _result(answer)
    if op == "read":
        async with session.get(f"{dial}/v1/{action['url']}", headers=headers) as answer:
            return await _result(answer)
    if op == "read_attached":
        custom = (request.get("messages") or [{}])[-1].get("custom_content") or {}
        results = []
        for attachment in custom.get("attachments") or []:
            url = attachment.get("url", "")
            if _is_resource_url(url):
                async with session.get(f"{dial}/v1/{url}", headers=headers) as answer:
                    results.append({"url": url, **await _result(answer)})
        return results
    if op in ("write", "write_appdata"):
        url = action.get("url")
        if op == "write_appdata":
            async with session.get(f"{dial}/v1/bucket", headers=headers) as answer:
                appdata = (await answer.json())["appdata"]
            url = f"files/{appdata}/{action['name']}"
        form = aiohttp.FormData()
        form.add_field("attachment", action["text"].encode(), filename="x.txt")
        async with session.put(f"{dial}/v1/{url}", data=form, headers=headers) as answer:
            return {"url": url, **await _result(answer)}
    if op == "call":
        target = action["deployment"]
        body = {"messages": request.get("messages", [])}
        async with session.post(
            f"{dial}/openai/deployments/{target}/chat/completions", json=body, headers=headers
        ) as answer:
            return await _result(answer)
    return {"status": None, "body": f"unknown op {op}"}


async def chat(request: web.Request) -> web.Response:
    raw = await request.read()
    request.app[RECORDS].append(
        {
            "path": request.path,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body": raw.decode(),
        }
    )
    body = json.loads(raw)
    key = request.headers.get("Api-Key", "")
    configuration = (body.get("custom_fields") or {}).get("configuration") or {}
    results = [await _act(request.app, key, body, a) for a in configuration.get("actions", [])]
    return web.json_response(
        {
            "id": "chatcmpl-resource-app",
            "object": "chat.completion",
            "created": 0,
            "model": "resource-app",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": json.dumps(results)},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
    )


async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def build_app(dial_url: str) -> web.Application:
    app = web.Application()
    app[RECORDS] = []
    app[DIAL_URL] = dial_url.rstrip("/")

    async def session(app: web.Application) -> Any:
        app[SESSION] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        yield
        await app[SESSION].close()

    app.cleanup_ctx.append(session)
    app.router.add_get("/health", health)
    app.router.add_post("/{tail:.*}", chat)
    return app


class ResourceApp:
    """The app served on 127.0.0.1 in the test's event loop (`await start_resource_app(...)`)."""

    def __init__(self, app: web.Application, runner: web.AppRunner, port: int) -> None:
        self.app = app
        self.runner = runner
        self.port = port

    def endpoint(self, name: str = "resource-app") -> str:
        return f"http://127.0.0.1:{self.port}/openai/deployments/{name}/chat/completions"

    def requests(self) -> list[dict[str, Any]]:
        recorded: list[dict[str, Any]] = self.app[RECORDS]
        return recorded

    def clear(self) -> None:
        self.app[RECORDS].clear()

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_resource_app(dial_url: str, sock: socket.socket | None = None) -> ResourceApp:
    """The app calling Tollgate at `dial_url`, on `sock` (a listening socket whose port a
    config names before Tollgate starts: `inprocess.listening_socket`) or a free port."""
    app = build_app(dial_url)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    if sock is None:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port: int = runner.addresses[0][1]
    else:
        await web.SockSite(runner, sock).start()
        port = sock.getsockname()[1]
    return ResourceApp(app, runner, port)
