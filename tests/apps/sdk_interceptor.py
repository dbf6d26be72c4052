"""An interceptor built with `aidial-interceptors-sdk` (PyPI), run as its own process.

The SDK pins `openai<2`, so this runs from a virtualenv of its own (see
`tests/interceptors_sdk.py`), never from the test environment:

    <venv>/bin/python -m uvicorn apps.sdk_interceptor:app    (cwd: tests/, DIAL_URL set)

It serves the interceptor `shout` at `/openai/deployments/shout/chat/completions`: it appends
` [shout]` to the last message of the request, calls DIAL (Tollgate) back through the SDK's
`interceptor` deployment with the per-request key it was given, and upper-cases every piece of
content of the answer, streamed or not.
"""

from __future__ import annotations

import os
from typing import Any

import httpx
from aidial_interceptors_sdk.chat_completion import (
    ChatCompletionInterceptor,
    interceptor_to_chat_completion,
)
from aidial_interceptors_sdk.utils.not_given import NotGiven
from aidial_sdk import DIALApp

DIAL_URL = os.environ["DIAL_URL"]
_CLIENT: httpx.AsyncClient | None = None


async def client_factory() -> httpx.AsyncClient:
    global _CLIENT
    if _CLIENT is None:
        _CLIENT = httpx.AsyncClient(timeout=httpx.Timeout(60, connect=10))
    return _CLIENT


class ShoutInterceptor(ChatCompletionInterceptor):
    async def on_request_messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if messages and isinstance(messages[-1].get("content"), str):
            messages[-1]["content"] += " [shout]"
        return messages

    async def on_response_message(
        self, path: Any, message: dict[str, Any] | NotGiven | None
    ) -> dict[str, Any] | NotGiven | None:
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            message["content"] = message["content"].upper()
        return message


app = DIALApp(
    dial_url=DIAL_URL,
    propagate_auth_headers=True,  # the per-request key goes on every call to DIAL_URL
    add_healthcheck=True,
    allow_extra_request_fields=True,
)
app.add_chat_completion(
    "shout", interceptor_to_chat_completion(ShoutInterceptor, DIAL_URL, client_factory)
)
