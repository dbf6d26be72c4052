"""Operator endpoints: `POST /v1/ops/config/reload` (compatibility C53) and `/metrics`.

Both are for administrators (`access.admin.rules`, see `security.admin`): anyone else gets
403 `User must be admin`. `/metrics` may instead be served on a port of its own
(`metrics.port`), without authentication: that port is meant to be reachable by Prometheus
only, and the gateway's port then has no `/metrics`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from decimal import Decimal
from typing import Any, Final
from urllib.parse import unquote, urlsplit, urlunsplit

import orjson
from aiohttp import web
from pydantic import BaseModel
from pydantic.alias_generators import to_camel

from tollgate.config.load import ConfigError
from tollgate.config.schema import Config
from tollgate.config_store import ConfigStore
from tollgate.errors import GatewayError
from tollgate.http.responses import json_bytes_response
from tollgate.observability.metrics import CONTENT_TYPE, Metrics
from tollgate.security.admin import AdminRules
from tollgate.security.keys import fingerprint_of_name
from tollgate.security.principal import Principal

log = logging.getLogger("tollgate.ops")

MASK: Final = "********"
# Unknown fields (DIAL's newer ones, adapters' extraData) named like a credential are masked.
_SECRET_WORDS: Final = ("key", "secret", "token", "password", "credential", "auth")


def not_admin() -> GatewayError:
    return GatewayError(403, "User must be admin")


class Ops:
    def __init__(
        self,
        store: ConfigStore,
        admins: AdminRules,
        metrics: Metrics | None,
        rescan: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        """`rescan`: read the API-managed keys and roles from the resource store again."""
        self.store = store
        self.admins = admins
        self.metrics = metrics
        self.rescan = rescan

    async def reload(self, principal: Principal) -> web.Response:
        """Re-read the config files now. 200: the config now serving, without secrets; a file
        that cannot be used: 500 with its problems, and the previous config keeps serving.
        Both the reload and the answer (the whole config) are made off the event loop."""
        if not self.admins.allows(principal):
            raise not_admin()
        if self.rescan is not None:  # as DIAL's reload: the stored entities too (C81)
            await self.rescan()
        try:
            await self.store.reload_now()
        except ConfigError as exc:
            log.warning("Failed to reload config: %s", "; ".join(exc.problems))
            raise GatewayError(500, "; ".join(exc.problems)) from None
        config = self.store.current.config
        body = await asyncio.to_thread(lambda: orjson.dumps(public_config(config)))
        return json_bytes_response(body)

    def metrics_for(self, principal: Principal) -> web.Response:
        """`GET /metrics` on the gateway's own port: administrators only."""
        if not self.admins.allows(principal):
            raise not_admin()
        return self.scrape()

    def scrape(self) -> web.Response:
        assert self.metrics is not None
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


def metrics_app(ops: Ops) -> web.Application:
    """The application of the separate metrics port: `GET /metrics`, no authentication."""

    async def scrape(request: web.Request) -> web.Response:
        return ops.scrape()

    app = web.Application()
    app.router.add_get("/metrics", scrape, allow_head=False)
    return app


# --- the config as JSON, without secrets ---------------------------------------------------


def public_config(config: Config) -> dict[str, Any]:
    """The config in DIAL's camelCase, secrets left out (compatibility C53: secrets
    are write-only). Keys are named by their fingerprint (`sha256:1a2b3c4d…`, compatibility C10);
    upstream and key `key` fields are dropped; credentials in endpoint URLs and unknown fields
    that look like credentials are masked."""
    tree = _public(config)
    assert isinstance(tree, dict)
    keys = tree.get("keys")
    if isinstance(keys, dict):
        tree["keys"] = {fingerprint_of_name(name): entry for name, entry in keys.items()}
    return tree


def _public(value: Any) -> Any:
    if isinstance(value, BaseModel):
        out: dict[str, Any] = {}
        for name in type(value).model_fields:
            item = getattr(value, name)
            if name in ("key", "token"):
                continue  # an upstream's or a key's secret; an addon's token
            if name == "extra_data":  # sent to the adapter as it is: may hold credentials
                out["extraData"] = _masked("", item)
                continue
            out[to_camel(name)] = _public(item)
        for name, item in (value.model_extra or {}).items():
            out[name] = _masked(name, item)
        return out
    if isinstance(value, Mapping):
        return {str(name): _public(item) for name, item in value.items()}
    if isinstance(value, list | tuple):
        return [_public(item) for item in value]
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, str) and "://" in value:
        # Any URL, whatever field holds it (features.*Endpoint, upstreams, routes, ...).
        return masked_url(value)
    return value


def _masked(name: str, value: Any) -> Any:
    """A field the schema does not know: masked if its name says credential; its object's
    fields likewise."""
    if any(word in name.lower() for word in _SECRET_WORDS) and value is not None:
        return MASK if not isinstance(value, bool) else value
    if isinstance(value, Mapping):
        return {str(k): _masked(str(k), v) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked("", item) for item in value]
    return _public(value)


# Query parameters that carry a credential in the URLs of common providers and signed links.
_SECRET_PARAMS: Final = frozenset(
    {"key", "api_key", "apikey", "token", "sig", "signature", "password", "secret", "code"}
)
_SECRET_PARAM_ENDINGS: Final = ("_key", "-key", "_token", "-token", "_secret", "_signature")


def _secret_param(name: str) -> bool:
    name = name.lower()
    return name in _SECRET_PARAMS or name.endswith(_SECRET_PARAM_ENDINGS)


def masked_url(url: str) -> str:
    """`url` with its userinfo (a password, or a token given as the user) and the values of
    query parameters named like a credential masked; the rest kept as written."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{host}" if colon else f"{MASK}@{host}"
    query = parts.query
    if query:
        fields = []
        for field in query.split("&"):
            name, equals, _ = field.partition("=")
            fields.append(f"{name}={MASK}" if equals and _secret_param(unquote(name)) else field)
        query = "&".join(fields)
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
