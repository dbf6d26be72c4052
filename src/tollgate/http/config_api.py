"""DIAL's Configuration API for keys and roles, with Tollgate's key lifecycle (compatibility C81).

- `GET | HEAD | PUT | DELETE /v1/{keys|roles}/platform/{name}`: one entity; `If-None-Match: *`
  creates only, `If-Match: <etag>` replaces or deletes only that version (412 otherwise).
- `GET /v1/metadata/{keys|roles}/platform/[{name}]`: DIAL's listing (`limit`, `token`).
- `POST /v1/admin/validate` and `/v1/admin/apply`: DIAL's bulk manifests, for `Key` and `Role`.
- `POST /v1/ops/keys/{name}/rotate`: a new secret; the old one works for a grace period.
- `GET /v1/admin/audit`: the changes, newest first.

Every one is for administrators (`access.admin.rules`; never a per-request key): anyone else
gets 403 `User must be admin`. DIAL's order of checks: a type or bucket the API does not serve
is 404, then 403, then a bad name 400, then another method 405 with `Allow`.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from tollgate.errors import GatewayError
from tollgate.managed.entities import (
    KEYS_FOLDER,
    ROLES_FOLDER,
    entity_name,
    json_body,
    key_spec,
    parse_time,
    role_spec,
    secret_digest,
)
from tollgate.managed.registry import (
    DEFAULT_GRACE_S,
    Conditions,
    ManagedConfig,
    actor_of,
)
from tollgate.pipeline.forward import read_body
from tollgate.security.admin import AdminRules
from tollgate.security.principal import Principal

ENTITY = re.compile(r"/+v1/(keys|roles)/([^/]*)/(.*)")
METADATA = re.compile(r"/+v1/metadata/(keys|roles)/([^/]*)/(.*)")
ROTATE = re.compile(r"/+v1/ops/keys/([^/]+)/rotate")
AUDIT = re.compile(r"/+v1/admin/audit")
BULK = re.compile(r"/+v1/admin/(validate|apply)")
BUCKET = "platform"
RESOURCE_TYPES = {"keys": "PROJECT_KEY", "roles": "ROLE"}
FOLDERS = {"keys": KEYS_FOLDER, "roles": ROLES_FOLDER}
BAD_QUERY = "Bad query parameters. Limit must be in [0, 1000] range. Recursive must be true/false"
JSON = "application/json"
# Manifest kinds in DIAL's order of application; the ones Tollgate manages are Role and Key.
KINDS = {
    "Settings": ("settings", 0),
    "Schema": ("schemas", 1),
    "CatalogSchema": ("catalog_schemas", 1),
    "Interceptor": ("interceptors", 2),
    "Role": ("roles", 3),
    "Key": ("keys", 4),
    "Route": ("routes", 5),
    "Model": ("models", 6),
    "ToolSet": ("toolsets", 7),
    "Application": ("applications", 8),
    "Translator": ("translators", 2),
}
MANAGED_KINDS = ("Role", "Key")


def not_admin() -> GatewayError:
    return GatewayError(403, "User must be admin")


def not_found() -> GatewayError:
    return GatewayError(404, "Not found")


def not_implemented(allow: str) -> GatewayError:
    return GatewayError(405, "Not implemented", headers={"Allow": allow})


def _json(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type=JSON, headers=headers)


def _secret_answer(body: Mapping[str, Any], etag: str) -> web.Response:
    """An answer that may carry a secret: never cached anywhere."""
    return _json(body, headers={"ETag": etag, "Cache-Control": "no-store"})


class ConfigApi:
    """The handlers; `match(method, path)` finds the one for a request, if any."""

    def __init__(
        self, managed: ManagedConfig, admins: AdminRules, body_timeout_s: float, max_body: int
    ) -> None:
        self.managed = managed
        self.admins = admins
        self._body_timeout_s = body_timeout_s
        self._max_body = max_body

    def handles(self, path: str) -> bool:
        return path.startswith(("/v1/", "//")) and (
            ENTITY.fullmatch(path) is not None
            or METADATA.fullmatch(path) is not None
            or ROTATE.fullmatch(path) is not None
            or AUDIT.fullmatch(path) is not None
            or BULK.fullmatch(path) is not None
        )

    async def handle(
        self, request: web.Request, principal: Principal, path: str
    ) -> web.StreamResponse:
        match = ENTITY.fullmatch(path)
        if match is not None:
            return await self._entity(request, principal, match[1], match[2], match[3])
        match = METADATA.fullmatch(path)
        if match is not None:
            return self._metadata(request, principal, match[1], match[2], match[3])
        match = ROTATE.fullmatch(path)
        if match is not None:
            self._admin(principal)
            if request.method != "POST":
                raise not_implemented("POST")
            return await self._rotate(request, principal, entity_name(match[1]))
        match = AUDIT.fullmatch(path)
        if match is not None:
            self._admin(principal)
            if request.method not in ("GET", "HEAD"):
                raise not_implemented("GET")
            return await self._audit(request)
        match = BULK.fullmatch(path)
        assert match is not None
        self._admin(principal)
        if request.method != "POST":
            raise not_implemented("POST")
        return await self._bulk(request, principal, apply=match[1] == "apply")

    def _admin(self, principal: Principal) -> None:
        if not self.admins.allows(principal):
            raise not_admin()

    async def _body(self, request: web.Request) -> bytes:
        # The call path's reader: 100-continue, the body timeout, 413, a client gone mid-body.
        return await read_body(request, self._body_timeout_s)

    # --- one entity

    async def _entity(
        self, request: web.Request, principal: Principal, kind: str, bucket: str, raw_name: str
    ) -> web.StreamResponse:
        if bucket != BUCKET:
            raise not_found()  # DIAL: indistinguishable from an entity that does not exist
        self._admin(principal)
        method = request.method
        folder = FOLDERS[kind]
        if method in ("GET", "HEAD"):
            return self._get(request, kind, raw_name)
        if method not in ("PUT", "DELETE"):
            raise not_implemented("GET, PUT, DELETE")
        name = entity_name(raw_name)
        conditions = Conditions(
            request.headers.get("If-Match"), request.headers.get("If-None-Match")
        )
        actor = actor_of(principal)
        if method == "DELETE":
            await self.managed.delete(folder, name, conditions, actor)
            return web.Response(status=204)
        body = json_body(await self._body(request))
        if kind == "keys":
            record, secret = await self.managed.put_key(name, body, conditions, actor)
            answer: dict[str, Any] = {"name": name}
            if secret is not None:
                answer["key"] = secret  # shown this once: the store keeps its SHA-256 only
            assert record.etag is not None
            return _secret_answer(answer, record.etag)
        role = await self.managed.put_role(name, body, conditions, actor)
        assert role.etag is not None
        return _json({"name": name}, headers={"ETag": role.etag})

    def _get(self, request: web.Request, kind: str, raw_name: str) -> web.StreamResponse:
        try:
            name = entity_name(raw_name)
        except GatewayError:
            raise not_found() from None
        managed = self.managed
        record = (managed.keys if kind == "keys" else managed.roles).get(name)
        if record is None:
            raise not_found()
        etag = record.etag or ""
        if request.headers.get("If-None-Match", "").strip().strip('"') == etag:
            return web.Response(status=304, headers={"ETag": etag})
        body = (
            record.public(managed.now_ms()) if kind == "keys" else record.public()  # type: ignore[call-arg]
        )
        response = _json(body, headers={"ETag": etag})
        if request.method == "HEAD":
            return web.Response(status=200, headers={"ETag": etag, "Content-Type": JSON})
        return response

    # --- listings

    def _metadata(
        self, request: web.Request, principal: Principal, kind: str, bucket: str, path: str
    ) -> web.Response:
        if bucket != BUCKET:
            raise not_found()
        self._admin(principal)  # DIAL's order: the caller, then the method
        if request.method not in ("GET", "HEAD"):
            raise not_implemented("GET")
        query = request.query
        try:
            limit = int(query.get("limit", "100"))
        except ValueError:
            raise GatewayError(400, BAD_QUERY) from None
        recursive = query.get("recursive", "false").lower()
        if not 0 <= limit <= 1000 or recursive not in ("true", "false"):
            raise GatewayError(400, BAD_QUERY)
        folder = FOLDERS[kind]
        managed = self.managed
        records = managed.keys if kind == "keys" else managed.roles
        if path:
            try:
                name = entity_name(path)
            except GatewayError:
                name = None
            record = None if name is None else records.get(name)
            if record is None:
                raise GatewayError(404, f"Not found: {kind}/{bucket}/{path}")
            return _json(self._item(kind, record))
        after = _token_name(query.get("token"))
        names = managed.sorted_names(folder)
        import bisect

        start = 0 if after is None else bisect.bisect_right(names, after)
        chosen = names[start : start + limit]
        items = [self._item(kind, records[name]) for name in chosen if name in records]
        body: dict[str, Any] = {
            "name": "",
            "parentPath": None,
            "bucket": BUCKET,
            "url": f"{kind}/{BUCKET}/",
            "nodeType": "FOLDER",
            "resourceType": RESOURCE_TYPES[kind],
            "items": items,
        }
        if chosen and start + limit < len(names):
            body["nextToken"] = base64.urlsafe_b64encode(chosen[-1].encode()).decode()
        content_type = (
            "application/vnd.dial.metadata+json"
            if "application/vnd.dial.metadata+json" in request.headers.get("Accept", "")
            else JSON
        )
        return web.Response(body=orjson.dumps(body), content_type=content_type)

    def _item(self, kind: str, record: Any) -> dict[str, Any]:
        from urllib.parse import quote

        item: dict[str, Any] = {
            "name": record.name,
            "parentPath": None,
            "bucket": BUCKET,
            "url": f"{kind}/{BUCKET}/{quote(record.name, safe='')}",
            "nodeType": "ITEM",
            "resourceType": RESOURCE_TYPES[kind],
            "createdAt": record.created_at,
            "updatedAt": record.updated_at,
        }
        if record.etag is not None:
            item["etag"] = record.etag
        if record.author:
            item["author"] = record.author
        return item

    # --- rotation and audit

    async def _rotate(self, request: web.Request, principal: Principal, name: str) -> web.Response:
        raw = await self._body(request)
        body = json_body(raw) if raw.strip() else {}
        unknown = sorted(set(body) - {"gracePeriodSeconds", "key"})
        if unknown:
            raise GatewayError(
                400, f"Unknown field: {unknown[0][:64]} (a rotation takes gracePeriodSeconds, key)"
            )
        grace = body.get("gracePeriodSeconds", DEFAULT_GRACE_S)
        if not isinstance(grace, int) or isinstance(grace, bool):
            raise GatewayError(400, "gracePeriodSeconds: expected a whole number of seconds")
        conditions = Conditions(request.headers.get("If-Match"))
        record, secret = await self.managed.rotate_key(
            name, grace, body.get("key"), conditions, actor_of(principal)
        )
        answer: dict[str, Any] = {"name": name, "fingerprint": record.fingerprint}
        if secret is not None:
            answer["key"] = secret
        public = record.public(self.managed.now_ms())
        if "previousKeyExpiresAt" in public:
            answer["previousKeyExpiresAt"] = public["previousKeyExpiresAt"]
        assert record.etag is not None
        return _secret_answer(answer, record.etag)

    async def _audit(self, request: web.Request) -> web.Response:
        query = request.query
        try:
            limit = int(query.get("limit", "100"))
        except ValueError:
            raise GatewayError(400, "limit: expected a number from 1 to 1000") from None
        if not 1 <= limit <= 1000:
            raise GatewayError(400, "limit: expected a number from 1 to 1000")
        since_text = query.get("since")
        since = None
        if since_text is not None:
            digits = since_text.isascii() and since_text.isdigit()  # not `²`: int() refuses it
            since = parse_time(int(since_text) if digits else since_text, "since")
        kind = query.get("type")
        if kind is not None and kind not in ("key", "role"):
            raise GatewayError(400, "type: expected key or role")
        token = query.get("token")
        if token is not None and not re.fullmatch(r"audit/[0-9]{13}-[0-9a-zx]+", token):
            raise GatewayError(400, "token: not a token of this listing")
        try:
            items, next_token = await self.managed.audit.read(
                limit=limit, token=token, name=query.get("name"), kind=kind, since_ms=since
            )
        except Exception as exc:
            from tollgate.storage.store import StorageError

            if isinstance(exc, StorageError):
                raise GatewayError(503, "Resource store is not available") from None
            raise
        body: dict[str, Any] = {"items": items}
        if next_token is not None:
            body["nextToken"] = next_token
        return _json(body)

    # --- bulk manifests

    async def _bulk(
        self, request: web.Request, principal: Principal, *, apply: bool
    ) -> web.Response:
        raw = await self._body(request)
        try:
            body = orjson.loads(raw) if raw.strip() else {}
        except orjson.JSONDecodeError as exc:
            raise GatewayError(
                400, f"Invalid JSON at line {exc.lineno}, column {exc.colno}"
            ) from None
        if not isinstance(body, dict):
            raise GatewayError(400, "Missing or invalid 'manifests' array")
        manifests = body.get("manifests")
        if not isinstance(manifests, list):
            raise GatewayError(400, "Missing or invalid 'manifests' array")
        for index, manifest in enumerate(manifests):
            if not isinstance(manifest, dict) or not isinstance(manifest.get("kind"), str):
                raise GatewayError(400, f"manifests[{index}].kind must be a string")
            if manifest["kind"] == "Bundle":
                raise GatewayError(
                    400,
                    f"Bundle kind is not allowed in /v1/admin/{'apply' if apply else 'validate'}",
                )
        precheck = body.get("precheck", True) is not False
        order = sorted(
            range(len(manifests)), key=lambda i: KINDS.get(manifests[i]["kind"], ("", 99))[1]
        )
        checked: dict[int, tuple[str, str] | str] = {}  # index -> (kind, name) or error
        batch_roles: set[str] = set()
        batch_digests: dict[bytes, str] = {}
        for index in order:
            checked[index] = self._check_manifest(manifests[index], batch_roles, batch_digests)
        failed = [i for i, outcome in checked.items() if isinstance(outcome, str)]
        results: list[dict[str, Any]] = []
        if not apply or (precheck and failed):
            for index in order:
                outcome = checked[index]
                entity = _entity_id(manifests[index])
                if isinstance(outcome, str):
                    results.append({"entityId": entity, "status": "FAILED", "error": outcome})
                else:
                    status = (
                        "SKIPPED" if precheck and failed else ("VALID" if not apply else "SKIPPED")
                    )
                    results.append({"entityId": entity, "status": status})
            if not apply:
                valid = sum(1 for r in results if r["status"] == "VALID")
                return _json(
                    {"valid": valid, "failed": len(failed), "results": results},
                    status=422 if precheck and failed else 200,
                )
            return _json({"applied": 0, "failed": len(failed), "results": results}, status=422)
        applied = 0
        actor = actor_of(principal)
        for index in order:
            manifest = manifests[index]
            entity = _entity_id(manifest)
            outcome = checked[index]
            if isinstance(outcome, str):
                results.append({"entityId": entity, "status": "FAILED", "error": outcome})
                continue
            kind, name = outcome
            result: dict[str, Any] = {"entityId": entity}
            try:
                if kind == "Role":
                    await self.managed.put_role(name, manifest["spec"], Conditions(), actor)
                else:
                    _, secret = await self.managed.put_key(
                        name, manifest["spec"], Conditions(), actor
                    )
                    if secret is not None:
                        result["key"] = secret
            except GatewayError as error:
                results.append({**result, "status": "FAILED", "error": error.message})
                continue
            applied += 1
            results.append({**result, "status": "APPLIED"})
        failed_count = sum(1 for r in results if r["status"] == "FAILED")
        return web.Response(
            body=orjson.dumps({"applied": applied, "failed": failed_count, "results": results}),
            content_type=JSON,
            headers={"Cache-Control": "no-store"},
        )

    def _check_manifest(
        self, manifest: Mapping[str, Any], batch_roles: set[str], batch_digests: dict[bytes, str]
    ) -> tuple[str, str] | str:
        """(kind, name) of a manifest that may be applied, else the error of its entry."""
        kind = manifest["kind"]
        if kind not in KINDS:
            return f"Unknown kind: {kind[:64]}"
        segment = KINDS[kind][0]
        name = manifest.get("name")
        if not isinstance(name, str) or not name:
            return "Missing or empty 'name'"
        if not name.startswith(segment + "/"):
            return f"'name' must start with '{segment}/' for kind {kind}"
        parts = name.split("/")
        if len(parts) < 3:
            return f"'name' must include a bucket segment, e.g. '{segment}/platform/<name>'"
        if parts[1] != BUCKET:
            return f"'name' bucket segment must be 'platform', got '{parts[1][:64]}'"
        if kind not in MANAGED_KINDS:
            return f"Kind {kind} is not managed by Tollgate's Configuration API (Key and Role are)"
        spec = manifest.get("spec")
        if not isinstance(spec, dict):
            return "Missing 'spec'"
        try:
            short = entity_name("/".join(parts[2:]))
            if kind == "Role":
                role_spec(spec)
                batch_roles.add(short)
                return kind, short
            fields, key_value = key_spec(spec)
            known = self.managed.role_names() | batch_roles
            for role in (*fields["roles"], *([fields["role"]] if "role" in fields else [])):
                if role not in known:
                    return f'Role "{role}" is not defined in roles and no userRoles lists it'
            expires = fields.get("expiresAt")
            if expires is not None and expires <= self.managed.now_ms():
                return "expiresAt: the time is not later than the current time"
            if key_value is not None:
                digest = secret_digest(key_value)
                owner = self.managed.owner_of(digest)
                if (owner is not None and owner != short) or batch_digests.get(
                    digest, short
                ) != short:
                    return "Key secret is already used by a different key entity"
                batch_digests[digest] = short
            return kind, short
        except GatewayError as error:
            return error.message


def _entity_id(manifest: Mapping[str, Any]) -> str:
    name = manifest.get("name")
    return name if isinstance(name, str) else ""


def _token_name(token: str | None) -> str | None:
    if token is None or token == "":
        return None
    try:
        return base64.urlsafe_b64decode(token.encode() + b"=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise GatewayError(400, BAD_QUERY) from None
