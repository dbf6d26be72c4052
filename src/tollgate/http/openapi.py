"""`GET /openapi.json`: the OpenAPI 3 description of Tollgate's own API, served as shipped."""

from __future__ import annotations

from functools import cache
from importlib import resources

from aiohttp import web

from tollgate.http.responses import json_bytes_response


@cache
def document() -> bytes:
    """Read once from the package (`http/openapi.json`), then served from memory."""
    return resources.files("tollgate.http").joinpath("openapi.json").read_bytes()


def openapi_response() -> web.Response:
    return json_bytes_response(document())
