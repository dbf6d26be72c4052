"""Rendering at the edge: JSON bodies and DIAL's error shape (compatibility C49)."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from tollgate.errors import GatewayError

JSON = "application/json"


def json_response(value: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(value), status=status, content_type=JSON)


def json_bytes_response(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type=JSON)


def error_response(error: GatewayError) -> web.Response:
    response = web.Response(body=error.body(), status=error.status, content_type=JSON)
    if error.headers:
        response.headers.update(error.headers)
    return response


def list_body(items: list[dict[str, Any]]) -> bytes:
    return orjson.dumps({"data": items, "object": "list"})
