"""A model upstream that sets a cookie on every answer (a raw ASGI app, run by uvicorn).

It records the `Cookie` header of each call it gets (`GET /seen`), so a test can tell whether
a gateway sent one caller's cookies on another caller's request.
"""

from __future__ import annotations

import json
from typing import Any

SEEN: list[str | None] = []
ANSWER = json.dumps(
    {
        "id": "chatcmpl-cookie",
        "object": "chat.completion",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
).encode()


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
    headers_out = [(b"content-type", b"application/json")]
    if scope["path"] == "/health":
        body = b"{}"
    elif scope["path"] == "/seen":
        body = json.dumps(SEEN).encode()
    else:
        SEEN.append(headers.get("cookie"))
        body = ANSWER
        headers_out.append((b"set-cookie", f"session=caller-{len(SEEN)}; Path=/".encode()))
    await send({"type": "http.response.start", "status": 200, "headers": headers_out})
    await send({"type": "http.response.body", "body": body})
