"""API-managed keys and roles: names, request bodies, stored records (compatibility C81).

A key's record in the store holds the SHA-256 of its secret, never the secret (compatibility C81):
`key` is write-only in the API, and a GET, a listing, a log or an error never shows it. A PUT
without `key` on a new key makes a 256-bit secret, returned once, in that answer.

Bodies are checked with the same schema, and the same messages, as the config files
(`tollgate config check`): a key needs a project and a role, IP ranges must be CIDRs, a role's
limits are numbers. Fields the API does not know are refused rather than stored, so that a
secret sent under a misspelt name is never kept.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, unquote

import orjson
from pydantic import ValidationError

from tollgate.config.key_names import HASHED_NAME, digest_of, fingerprint_of_digest
from tollgate.config.load import _message
from tollgate.config.schema import Key, Role, epoch_ms
from tollgate.errors import GatewayError

NAME_RULE = "^[A-Za-z0-9._%:-]+$"
_NAME = re.compile(r"[A-Za-z0-9._%:-]+")
KEYS_FOLDER = "platform/keys/"
ROLES_FOLDER = "platform/roles/"
SECRET_BYTES = 32  # a generated secret: 256 bits
GENERATED_PREFIX = "tg-"
MAX_PREVIOUS = 4  # old secrets kept in their grace period at once; the oldest goes first
MAX_TEXT = 1024  # `description`, `displayName`

# Fields a key's body may carry: what it sets, and what a GET shows (ignored on PUT, so that a
# GET's answer can be sent back).
KEY_FIELDS = frozenset(
    {
        "project",
        "role",
        "roles",
        "secured",
        "allowedIpAddressRanges",
        "allowed_ip_address_ranges",
        "key",
        "expiresAt",
        "expires_at",
        "description",
        "displayName",
    }
)
READ_ONLY = frozenset(
    {
        "name",
        "status",
        "createdAt",
        "updatedAt",
        "keyGeneratedAt",
        "fingerprint",
        "previousKeyExpiresAt",
        "author",
    }
)


def entity_name(segment: str) -> str:
    """The entity a URL's last segment names, percent-decoded; DIAL's 400 if it may not be one
    (a literal `%` is sent as `%25`; `.` and `..` are refused too: they are not names)."""
    name = unquote(segment)
    if _NAME.fullmatch(name) is None or name in (".", ".."):
        raise GatewayError(400, f"Invalid entity name segment: must match {NAME_RULE}")
    return name


def store_key(folder: str, name: str) -> str:
    """Where an entity lives in the resource store: its name, percent-encoded (a leading `.`
    too, so no name is ever a hidden or reserved file)."""
    encoded = quote(name, safe="-_")
    return folder + ("%2E" + encoded[1:] if encoded.startswith(".") else encoded)


def name_of(key: str) -> str:
    return unquote(key.rpartition("/")[2])


def json_body(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object, or DIAL's 400. A parse error names the place only: the
    offending text is never echoed (it may be a secret)."""
    if not raw.strip():
        raise GatewayError(400, "Request body must not be empty")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise GatewayError(400, f"Invalid JSON at line {exc.lineno}, column {exc.colno}") from None
    if not isinstance(body, dict):
        raise GatewayError(400, "Request body must be a JSON object")
    return body


def parse_time(value: Any, field_name: str = "expiresAt") -> int | None:
    """`epoch_ms` of the config schema, with DIAL's 400 for a bad value."""
    try:
        return epoch_ms(value)
    except ValueError as exc:
        raise GatewayError(400, f"{field_name}: {exc}") from None


def iso(ms: int) -> str:
    """Epoch milliseconds as ISO 8601 UTC, to the millisecond: `2027-01-31T00:00:00.000Z`."""
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def new_secret() -> str:
    """A 256-bit secret, URL-safe; the prefix says where it came from (and helps scanners)."""
    return GENERATED_PREFIX + secrets.token_urlsafe(SECRET_BYTES)


def secret_digest(value: Any) -> bytes:
    """The digest a body's `key` stands for: a secret, or `sha256:<64 hex>` (the secret itself
    never reaches Tollgate then)."""
    if not isinstance(value, str) or not value:
        raise GatewayError(400, "key: expected a non-empty string")
    match = HASHED_NAME.fullmatch(value)
    if match is not None:
        return bytes.fromhex(match.group(1))
    if value[:7].lower() == "sha256:":
        raise GatewayError(
            400, "key: a key named sha256:... must be followed by exactly 64 hex digits"
        )
    return digest_of(value)


def _first_problem(exc: ValidationError) -> str:
    error = exc.errors(include_input=False, include_url=False)[0]
    message = _message(error)
    loc = [str(part) for part in error["loc"] if not str(part).startswith("function-")]
    return f"{'.'.join(loc)}: {message}" if loc else message


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A key as stored: its public fields, the digest of its secret, the digests of the old
    secrets still in their grace period, and when and by whom it was changed."""

    name: str
    spec: Mapping[str, Any]  # project, roles, ...: camelCase, `expiresAt` in epoch ms
    digest: bytes = field(repr=False)
    previous: tuple[tuple[bytes, int], ...] = field(default=(), repr=False)  # (digest, until)
    created_at: int = 0
    updated_at: int = 0
    key_generated_at: int = 0
    author: str = ""
    etag: str | None = field(default=None, compare=False)

    @property
    def project(self) -> str:
        return str(self.spec["project"])

    @property
    def roles(self) -> tuple[str, ...]:
        roles = tuple(self.spec.get("roles") or ())
        role = self.spec.get("role")
        return (*roles, role) if role else roles

    @property
    def expires_at(self) -> int | None:
        return self.spec.get("expiresAt")

    @property
    def fingerprint(self) -> str:
        return fingerprint_of_digest(self.digest)

    def live_previous(self, now_ms: int) -> tuple[tuple[bytes, int], ...]:
        return tuple((d, until) for d, until in self.previous if until > now_ms)

    def public(self, now_ms: int) -> dict[str, Any]:
        """What a GET shows: never the secret nor its digest (the fingerprint names it)."""
        body: dict[str, Any] = {"name": self.name}
        for name, value in self.spec.items():
            if value is None:
                continue
            body[name] = iso(value) if name == "expiresAt" else value
        body["fingerprint"] = self.fingerprint
        body["createdAt"] = iso(self.created_at)
        body["updatedAt"] = iso(self.updated_at)
        body["keyGeneratedAt"] = iso(self.key_generated_at)
        previous = self.live_previous(now_ms)
        if previous:
            body["previousKeyExpiresAt"] = iso(max(until for _, until in previous))
        expires = self.expires_at
        body["status"] = "expired" if expires is not None and expires <= now_ms else "valid"
        return body

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "version": 1,
                "spec": self.spec,
                "secretSha256": self.digest.hex(),
                "previous": [[d.hex(), until] for d, until in self.previous],
                "createdAt": self.created_at,
                "updatedAt": self.updated_at,
                "keyGeneratedAt": self.key_generated_at,
                "author": self.author,
            }
        )

    @classmethod
    def from_json(cls, name: str, data: bytes, etag: str | None) -> KeyRecord:
        """A stored record; ValueError if it is not one (a corrupt or foreign object)."""
        try:
            stored = orjson.loads(data)
            spec = dict(stored["spec"])
            Key.model_validate(
                {
                    k: v
                    for k, v in spec.items()
                    if k in ("project", "role", "roles", "secured", "allowedIpAddressRanges")
                }
            )
            return cls(
                name=name,
                spec=spec,
                digest=bytes.fromhex(stored["secretSha256"]),
                previous=tuple((bytes.fromhex(d), int(u)) for d, u in stored.get("previous", ())),
                created_at=int(stored.get("createdAt", 0)),
                updated_at=int(stored.get("updatedAt", 0)),
                key_generated_at=int(stored.get("keyGeneratedAt", 0)),
                author=str(stored.get("author", "")),
                etag=etag,
            )
        except (KeyError, TypeError, ValueError, orjson.JSONDecodeError, ValidationError) as exc:
            raise ValueError(f"not a key record: {type(exc).__name__}") from None


def key_spec(body: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """The public fields of a key's PUT body, checked as a config file's key is, and its `key`
    (None when absent or null). DIAL's 400 messages (compatibility C9)."""
    unknown = sorted(name for name in body if name not in KEY_FIELDS and name not in READ_ONLY)
    if unknown:
        raise GatewayError(
            400,
            f"Unknown field: {unknown[0][:64]} (a key has project, roles, role, secured, "
            "allowedIpAddressRanges, expiresAt, description, displayName and key)",
        )
    ranges = body.get("allowedIpAddressRanges", body.get("allowed_ip_address_ranges"))
    checked = {
        "project": body.get("project"),
        "role": body.get("role"),
        "roles": body.get("roles") if body.get("roles") is not None else [],
        "secured": body.get("secured", False),
        "allowedIpAddressRanges": ranges,
    }
    try:
        Key.model_validate(checked)
    except ValidationError as exc:
        raise GatewayError(400, _first_problem(exc)) from None
    spec: dict[str, Any] = {
        "project": checked["project"],
        "roles": list(checked["roles"]),
    }
    if checked["role"]:
        spec["role"] = checked["role"]
    spec["secured"] = bool(checked["secured"])
    if ranges is not None:
        spec["allowedIpAddressRanges"] = list(ranges)
    expires = parse_time(body.get("expiresAt", body.get("expires_at")))
    if expires is not None:
        spec["expiresAt"] = expires
    for text in ("description", "displayName"):
        value = body.get(text)
        if value is None:
            continue
        if not isinstance(value, str) or len(value) > MAX_TEXT:
            raise GatewayError(400, f"{text}: expected a string of at most {MAX_TEXT} characters")
        spec[text] = value
    return spec, body.get("key")


@dataclass(frozen=True, slots=True)
class RoleRecord:
    """A role as stored: its body as sent (DIAL's role object), checked, and its history."""

    name: str
    spec: Mapping[str, Any]
    role: Role = field(repr=False, compare=False)
    created_at: int = 0
    updated_at: int = 0
    author: str = ""
    etag: str | None = field(default=None, compare=False)

    def public(self) -> dict[str, Any]:
        return {
            **self.spec,
            "name": self.name,
            "createdAt": iso(self.created_at),
            "updatedAt": iso(self.updated_at),
            "status": "valid",
        }

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "version": 1,
                "spec": self.spec,
                "createdAt": self.created_at,
                "updatedAt": self.updated_at,
                "author": self.author,
            }
        )

    @classmethod
    def from_json(cls, name: str, data: bytes, etag: str | None) -> RoleRecord:
        try:
            stored = orjson.loads(data)
            spec = dict(stored["spec"])
            return cls(
                name=name,
                spec=spec,
                role=Role.model_validate(spec),
                created_at=int(stored.get("createdAt", 0)),
                updated_at=int(stored.get("updatedAt", 0)),
                author=str(stored.get("author", "")),
                etag=etag,
            )
        except (KeyError, TypeError, ValueError, orjson.JSONDecodeError, ValidationError) as exc:
            raise ValueError(f"not a role record: {type(exc).__name__}") from None


def role_spec(body: Mapping[str, Any]) -> tuple[dict[str, Any], Role]:
    """A role's PUT body without the fields a GET adds, checked as a config file's role is."""
    spec = {name: value for name, value in body.items() if name not in READ_ONLY}
    try:
        return spec, Role.model_validate(spec)
    except ValidationError as exc:
        raise GatewayError(400, _first_problem(exc)) from None
