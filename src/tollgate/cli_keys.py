"""Operator commands that drive a running Tollgate's Configuration API over HTTP.

`tollgate keys create | list | show | rotate | revoke` and `tollgate audit` (compatibility C81):
each is one or a few calls to `/v1/keys/platform/...`, `/v1/metadata/keys/platform/`,
`/v1/ops/keys/{name}/rotate` or `/v1/admin/audit`, with the administrator's key taken from
`$TOLLGATE_ADMIN_KEY` only (a command-line flag would show it to `ps` and the shell history)
and sent as `Api-Key`. A secret the operator chooses is read from stdin, never from argv; a
secret the server makes is printed once.

Standard library only (urllib): the command needs nothing the gateway does not. Redirects are
not followed, so the admin key is never sent to another address than the one named.

Exit status: 0 done; 1 the server refused (`tollgate: <status> <message>` on stderr) or could
not be reached; 2 a usage error (bad arguments, no admin key, no secret on stdin).
"""

from __future__ import annotations

import argparse
import functools
import getpass
import hashlib
import http.client
import json
import os
import re
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from tollgate import __version__

URL_ENV = "TOLLGATE_URL"
KEY_ENV = "TOLLGATE_ADMIN_KEY"
DEFAULT_URL = "http://127.0.0.1:8080"
TIMEOUT_S = 30.0
MAX_PAGE = 1000  # the most entries the server gives per request (listing and audit)
DEFAULT_PAGE = 100
KEYS = "/v1/keys/platform/"
KEYS_LISTING = "/v1/metadata/keys/platform/"
AUDIT = "/v1/admin/audit"
_DURATION = re.compile(r"(\d+)([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400}

Command = Callable[[argparse.Namespace, "Client"], int]


class CommandError(Exception):
    """What the command prints as `tollgate: <message>` before exiting with `code`."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class ApiError(CommandError):
    """The server answered with an error: its status and the message of its error body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status} {message}")
        self.status = status
        self.server_message = message


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer like any other: following it would send the admin key there."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class Client:
    """The Configuration API of one Tollgate, called with the administrator's key."""

    def __init__(self, base_url: str, admin_key: str) -> None:
        self.base_url = base_url.rstrip("/")
        self._admin_key = admin_key
        self._opener = urllib.request.build_opener(_NoRedirects())

    def __repr__(self) -> str:  # never the key
        return f"Client({shown_url(self.base_url)!r})"

    def redact(self, text: str) -> str:
        """`text` without the admin key (should a server or proxy ever echo it)."""
        return text.replace(self._admin_key, "<admin key>") if self._admin_key else text

    def call(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str | int] | None = None,
        body: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, Any]:
        """Status and JSON answer (None for an empty one); ApiError for a 3xx-5xx answer,
        CommandError when the server cannot be reached."""
        url = self.base_url + path
        if query:
            url += "?" + urlencode(query)
        sent = {
            "Api-Key": self._admin_key,
            "Accept": "application/json",
            "User-Agent": f"tollgate-cli/{__version__}",
            **(headers or {}),
        }
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            sent["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, headers=sent, method=method)
        try:
            with self._opener.open(request, timeout=TIMEOUT_S) as answer:
                return answer.status, _json_of(answer.read(), answer.status)
        except urllib.error.HTTPError as error:
            try:
                raw = error.read()
            except (OSError, http.client.HTTPException):
                raw = b""
            finally:
                error.close()
            raise _api_error(error.code, str(error.reason), raw, error.headers) from None
        except urllib.error.URLError as error:
            raise CommandError(self._unreachable(error.reason)) from None
        except (OSError, http.client.HTTPException) as error:
            raise CommandError(self._unreachable(error)) from None

    def _unreachable(self, reason: object) -> str:
        where = shown_url(self.base_url)
        if isinstance(reason, ConnectionRefusedError):
            why = "connection refused"
        elif isinstance(reason, socket.gaierror):
            why = "unknown host"
        elif isinstance(reason, TimeoutError):
            why = f"no answer within {TIMEOUT_S:g} s"
        elif isinstance(reason, http.client.RemoteDisconnected):
            why = "the server closed the connection without answering"
        else:
            why = str(getattr(reason, "strerror", None) or reason)
        return (
            f"cannot reach Tollgate at {where}: {why} (is it running there? "
            f"--url or ${URL_ENV} names it)"
        )


def _json_of(raw: bytes, status: int) -> Any:
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError:
        raise CommandError(f"{status}: the answer is not JSON (is this Tollgate?)") from None


def _api_error(status: int, reason: str, raw: bytes, headers: Any) -> ApiError:
    message = None
    try:
        body = json.loads(raw)
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            message = body["error"].get("message")
    except ValueError:
        pass
    if 300 <= status < 400:
        location = headers.get("Location") if headers is not None else None
        message = f"redirected to {location or 'another address'}; not followed (--url names "
        message += "the gateway itself)"
    if not isinstance(message, str) or not message:
        text = raw.decode(errors="replace").strip()
        message = text[:200] if text and len(text) < 200 and "<" not in text else reason
    return ApiError(status, str(message or "error"))


def shown_url(url: str) -> str:
    """A URL as messages show it: without a user or password."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port is not None else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _base_url(given: str | None) -> str:
    url = given or os.environ.get(URL_ENV) or DEFAULT_URL
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (a bad port raises here)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise CommandError(f"--url: expected an http:// or https:// URL, got {url!r}", 2)
    if parts.query or parts.fragment:
        raise CommandError("--url: expected the gateway's base URL, without ? or #", 2)
    return url


def _admin_key() -> str:
    key = os.environ.get(KEY_ENV, "")
    if not key.strip():
        raise CommandError(
            f"no admin key: set the environment variable {KEY_ENV} to an API key that "
            "access.admin.rules admits (it is never taken from the command line)",
            2,
        )
    return key.strip()


def run(command: Command, args: argparse.Namespace) -> int:
    """Run one command: the client made from --url and the environment, errors printed."""
    client: Client | None = None
    try:
        client = Client(_base_url(args.url), _admin_key())
        return command(args, client)
    except CommandError as error:
        text = f"tollgate: {error.message}"
        print(client.redact(text) if client is not None else text, file=sys.stderr)
        return error.code
    except KeyboardInterrupt:
        return 130


def _entity(name: str) -> str:
    return KEYS + quote(name, safe="")


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def fingerprint(secret: str) -> str:
    """How Tollgate names a secret in logs and answers: 8 hex digits of its SHA-256 (of the
    digest itself for a `sha256:<hex>` secret)."""
    if re.fullmatch(r"sha256:[0-9a-fA-F]{64}", secret):
        return secret[7:15].lower()
    return hashlib.sha256(secret.encode()).hexdigest()[:8]


def _read_secret(name: str) -> str:
    """The secret for `name` from stdin (a prompt without echo on a terminal); one line."""
    if sys.stdin is None:
        raise CommandError("--key-from-stdin: there is no stdin", 2)
    if sys.stdin.isatty():
        text = getpass.getpass(f"Secret for key {name} (not echoed): ")
    else:
        text = sys.stdin.read()
    secret = text.rstrip("\r\n")
    if not secret.strip():
        raise CommandError("--key-from-stdin: stdin held no secret", 2)
    if "\n" in secret or "\r" in secret:
        raise CommandError("--key-from-stdin: expected the secret on one line", 2)
    return secret


def _show_secret(secret: str, label: str = "Its secret") -> None:
    print(
        f"{label} (shown only now: it will not be shown again, Tollgate keeps its SHA-256 "
        f"only; give it to the client, keep it out of files and logs):\n  {secret}"
    )


# --- the commands


def keys_create(args: argparse.Namespace, client: Client) -> int:
    body: dict[str, Any] = {"project": args.project, "roles": list(args.roles)}
    if args.expires_at is not None:
        body["expiresAt"] = args.expires_at
    if args.ip_ranges:
        body["allowedIpAddressRanges"] = list(args.ip_ranges)
    if args.description is not None:
        body["description"] = args.description
    secret = _read_secret(args.name) if args.key_from_stdin else None
    if secret is not None:
        body["key"] = secret
    try:
        _, answer = client.call(
            "PUT", _entity(args.name), body=body, headers={"If-None-Match": "*"}
        )
    except ApiError as error:
        if error.status == 412:
            raise CommandError(
                f"412 {error.server_message}: a key named {args.name} exists already "
                f"(`tollgate keys rotate {args.name}` gives it a new secret, "
                f"`tollgate keys revoke {args.name}` deletes it)"
            ) from None
        raise
    answer = answer if isinstance(answer, dict) else {}
    if args.json:
        _print_json(answer)
        return 0
    made = answer.get("key")
    shown = made if isinstance(made, str) else secret
    roles = ", ".join(args.roles)
    print(
        f"Created key {args.name}: project {args.project}, roles {roles}"
        + (f", expires {args.expires_at}" if args.expires_at else "")
        + (f", fingerprint {fingerprint(shown)}" if shown else "")
        + "."
    )
    if isinstance(made, str):
        _show_secret(made)
    elif secret is not None:
        print("Its secret is the one read from stdin (not shown).")
    return 0


def keys_list(args: argparse.Namespace, client: Client) -> int:
    items = _listing(client, args.page_size)
    if args.long:
        found = []
        for item in items:
            try:
                _, key = client.call("GET", _entity(str(item.get("name", ""))))
            except ApiError as error:
                if error.status == 404:
                    continue  # deleted since the listing
                raise
            found.append(key)
        if args.json:
            _print_json({"items": found})
            return 0
        rows = [
            [
                str(key.get("name", "")),
                str(key.get("project", "")),
                ",".join(_roles(key)),
                str(key.get("status", "")),
                _time(key.get("expiresAt")) or "never",
                str(key.get("fingerprint", "")),
                _time(key.get("updatedAt")),
            ]
            for key in found
        ]
        header = ["NAME", "PROJECT", "ROLES", "STATUS", "EXPIRES", "FINGERPRINT", "UPDATED"]
    else:
        if args.json:
            _print_json({"items": items})
            return 0
        rows = [
            [str(item.get("name", "")), _time(item.get("updatedAt")), str(item.get("author", ""))]
            for item in items
        ]
        header = ["NAME", "UPDATED", "AUTHOR"]
    if not rows:
        print("no API-managed keys (keys of the config files are not listed here)")
        return 0
    _table(header, rows)
    return 0


def _listing(client: Client, page_size: int) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    token: str | None = None
    seen: set[str] = set()
    while True:
        query: dict[str, str | int] = {"limit": page_size}
        if token:
            query["token"] = token
        _, page = client.call("GET", KEYS_LISTING, query=query)
        page = page if isinstance(page, dict) else {}
        items += [item for item in page.get("items") or () if isinstance(item, dict)]
        token = page.get("nextToken")
        if not isinstance(token, str) or not token or token in seen:
            return items
        seen.add(token)


def keys_show(args: argparse.Namespace, client: Client) -> int:
    _, key = client.call("GET", _entity(args.name))
    key = key if isinstance(key, dict) else {}
    if args.json:
        _print_json(key)
        return 0
    order = (
        "name",
        "project",
        "roles",
        "status",
        "expiresAt",
        "fingerprint",
        "keyGeneratedAt",
        "previousKeyExpiresAt",
        "allowedIpAddressRanges",
        "secured",
        "description",
        "displayName",
        "createdAt",
        "updatedAt",
    )
    fields = {"roles": ", ".join(_roles(key))}
    rest = [name for name in key if name not in order and name != "role"]
    width = max(len(name) for name in (*order, *rest))
    for name in (*order, *rest):
        if name not in key and name not in fields:
            continue
        value = fields.get(name, key.get(name))
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        print(f"{name + ':':<{width + 1}} {text}")
    return 0


def keys_rotate(args: argparse.Namespace, client: Client) -> int:
    body: dict[str, Any] = {}
    if args.grace is not None:
        body["gracePeriodSeconds"] = args.grace
    secret = _read_secret(args.name) if args.key_from_stdin else None
    if secret is not None:
        body["key"] = secret
    quoted = quote(args.name, safe="")
    _, answer = client.call("POST", f"/v1/ops/keys/{quoted}/rotate", body=body)
    answer = answer if isinstance(answer, dict) else {}
    if args.json:
        _print_json(answer)
        return 0
    print(f"Rotated key {args.name}: new fingerprint {answer.get('fingerprint', '?')}.")
    made = answer.get("key")
    if isinstance(made, str):
        _show_secret(made, "Its new secret")
    else:
        print("Its new secret is the one read from stdin (not shown).")
    until = answer.get("previousKeyExpiresAt")
    if args.grace == 0:
        print("The old secret is refused from now on.")
        if until:
            print(f"A secret of an earlier rotation still works until {until}.")
    elif until:
        print(f"The old secret keeps working until {until}, then it is refused.")
    else:
        print("The old secret is refused from now on.")
    return 0


def keys_revoke(args: argparse.Namespace, client: Client) -> int:
    client.call("DELETE", _entity(args.name))
    if args.json:
        _print_json({"name": args.name, "revoked": True})
        return 0
    print(f"Revoked key {args.name}: its secret is refused from now on.")
    return 0


def audit(args: argparse.Namespace, client: Client) -> int:
    entries: list[dict[str, Any]] = []
    token: str | None = None
    more: str | None = None
    while len(entries) < args.limit:
        query: dict[str, str | int] = {"limit": min(args.limit - len(entries), args.page_size)}
        for name, value in (("name", args.name), ("type", args.type), ("since", args.since)):
            if value is not None:
                query[name] = value
        if token:
            query["token"] = token
        _, page = client.call("GET", AUDIT, query=query)
        page = page if isinstance(page, dict) else {}
        entries += [entry for entry in page.get("items") or () if isinstance(entry, dict)]
        next_token = page.get("nextToken")
        if not isinstance(next_token, str) or not next_token or next_token == token:
            more = None
            break
        token = more = next_token
    entries = entries[: args.limit]
    if args.json:
        _print_json({"items": entries, **({"nextToken": more} if more else {})})
        return 0
    if not entries:
        print("no audit entries")
        return 0
    _table(None, [audit_row(entry) for entry in entries])
    return 0


def audit_row(entry: Mapping[str, Any]) -> list[str]:
    """One entry: time, action, type, name, who (project and key fingerprint), what changed."""
    actor = entry.get("actor")
    if isinstance(actor, dict) and "system" in actor:
        who = f"by {actor['system']} (system)"
    elif isinstance(actor, dict):
        who = f"by {actor.get('project', '?')} (key {actor.get('key', '?')})"
    else:
        who = "by ?"
    changes = entry.get("changes")
    parts = []
    for name, change in changes.items() if isinstance(changes, dict) else ():
        if isinstance(change, dict) and set(change) == {"from", "to"}:
            parts.append(f"{name}: {_value(change['from'])} -> {_value(change['to'])}")
        else:
            parts.append(f"{name}={_value(change)}")
    return [
        _time(entry.get("time") or entry.get("timeMs")),
        str(entry.get("action", "?")),
        str(entry.get("type", "?")),
        str(entry.get("name", "?")),
        who,
        "; ".join(parts) or "-",
    ]


def _value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _roles(key: Mapping[str, Any]) -> list[str]:
    roles = [str(role) for role in key.get("roles") or ()]
    role = key.get("role")
    if role and role not in roles:
        roles.append(str(role))
    return roles


def _time(value: Any) -> str:
    """A time of an answer (epoch ms, or ISO 8601) as `2026-01-31T12:00:00Z`."""
    if value is None or value == "":
        return ""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    text = str(value)
    match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.\d+Z", text)
    return match.group(1) + "Z" if match else text


def _table(header: Sequence[str] | None, rows: Iterable[Sequence[str]]) -> None:
    """Columns aligned (the last one is not padded); `header` first, if any."""
    table = [*([list(header)] if header is not None else []), *(list(row) for row in rows)]
    if not table:
        return
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    widths[-1] = 0
    for row in table:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


# --- arguments


def duration(text: str) -> int:
    """Seconds: `3600`, `90s`, `15m`, `1h`, `2d`, `1h30m`, `0`."""
    compact = text.strip().lower().replace(" ", "")
    if not compact or _DURATION.sub("", compact):
        raise argparse.ArgumentTypeError(
            f"expected seconds or a duration such as 90s, 15m, 1h, 2d (0: at once), got {text!r}"
        )
    return sum(int(number) * _UNITS[unit] for number, unit in _DURATION.findall(compact))


def _not_empty(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _page_size(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        number = 0
    if not 1 <= number <= MAX_PAGE:
        raise argparse.ArgumentTypeError(f"expected a number from 1 to {MAX_PAGE}")
    return number


def _positive(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError("expected a whole number of at least 1")
    return number


def _common(parser: argparse.ArgumentParser, command: Command) -> None:
    parser.add_argument(
        "--url",
        metavar="URL",
        help=f"the gateway's base URL (default: ${URL_ENV}, else {DEFAULT_URL})",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the server's answer as JSON, for scripts"
    )
    parser.set_defaults(run=functools.partial(run, command))


EPILOG = (
    f"The admin key is read from ${KEY_ENV} only (never from the command line) and sent as "
    "Api-Key; it must match access.admin.rules of the gateway's settings. Exit status: 0 done, "
    "1 the server refused or could not be reached, 2 bad arguments or no admin key."
)


def add_commands(keys_commands: Any, commands: Any) -> None:
    """`keys create|list|show|rotate|revoke` under `keys_commands`, `audit` under `commands`
    (argparse sub-parser actions); each sets `run`, which runs the command."""
    create = keys_commands.add_parser(
        "create",
        help="create an API key in a running Tollgate (Configuration API)",
        description="Create an API-managed key: PUT /v1/keys/platform/NAME, creation only (an "
        "existing name is refused). Tollgate makes a 256-bit secret and shows it once, unless "
        "--key-from-stdin gives one.",
        epilog=EPILOG,
    )
    create.add_argument("name", metavar="NAME", type=_not_empty, help="the key's name")
    create.add_argument("--project", required=True, type=_not_empty, help="project of the key")
    create.add_argument(
        "--role",
        action="append",
        dest="roles",
        required=True,
        metavar="R",
        type=_not_empty,
        help="role of the key; repeat for several",
    )
    create.add_argument(
        "--expires-at",
        metavar="ISO8601",
        help="when the key stops working, such as 2027-01-31T00:00:00Z (default: never)",
    )
    create.add_argument(
        "--ip-range",
        action="append",
        dest="ip_ranges",
        metavar="CIDR",
        help="an address range the key may be used from; repeat for several (default: any)",
    )
    create.add_argument("--description", metavar="TEXT", help="what the key is for")
    create.add_argument(
        "--key-from-stdin",
        action="store_true",
        help="read the secret (or sha256:<hex> of it) from stdin instead of having Tollgate "
        "make one",
    )
    _common(create, keys_create)

    listing = keys_commands.add_parser(
        "list",
        help="list the API-managed keys of a running Tollgate",
        description="List API-managed keys (GET /v1/metadata/keys/platform/, every page): "
        "name, last update and its author. --long reads each key too (one more request per "
        "key) for project, roles, status, expiry and fingerprint. Keys of the config files "
        "are not listed.",
        epilog=EPILOG,
    )
    listing.add_argument(
        "--long", "-l", action="store_true", help="project, roles, status, expiry, fingerprint"
    )
    listing.add_argument(
        "--page-size",
        type=_page_size,
        default=DEFAULT_PAGE,
        metavar="N",
        help=f"keys asked per listing request, 1 to {MAX_PAGE} (default {DEFAULT_PAGE})",
    )
    _common(listing, keys_list)

    show = keys_commands.add_parser(
        "show",
        help="show one API-managed key (never its secret)",
        description="Show an API-managed key: GET /v1/keys/platform/NAME. The secret is never "
        "shown; its fingerprint names it.",
        epilog=EPILOG,
    )
    show.add_argument("name", metavar="NAME", type=_not_empty, help="the key's name")
    _common(show, keys_show)

    rotate = keys_commands.add_parser(
        "rotate",
        help="give an API-managed key a new secret; the old one works for a grace period",
        description="Rotate a key's secret: POST /v1/ops/keys/NAME/rotate. The new secret is "
        "shown once; the old one keeps working for the grace period, then is refused.",
        epilog=EPILOG,
    )
    rotate.add_argument("name", metavar="NAME", type=_not_empty, help="the key's name")
    rotate.add_argument(
        "--grace",
        type=duration,
        metavar="DURATION",
        help="how long the old secret keeps working: seconds, or 90s, 15m, 1h, 2d; 0 refuses "
        "it at once (default: the server's, one day; at most 30 days)",
    )
    rotate.add_argument(
        "--key-from-stdin",
        action="store_true",
        help="read the new secret (or sha256:<hex> of it) from stdin",
    )
    _common(rotate, keys_rotate)

    revoke = keys_commands.add_parser(
        "revoke",
        help="delete an API-managed key: its secret is refused at once",
        description="Delete an API-managed key: DELETE /v1/keys/platform/NAME. Its secret, and "
        "any old secret still in a grace period, is refused from the next call on.",
        epilog=EPILOG,
    )
    revoke.add_argument("name", metavar="NAME", type=_not_empty, help="the key's name")
    _common(revoke, keys_revoke)

    trail = commands.add_parser(
        "audit",
        help="print the audit trail of API-managed keys and roles",
        description="Print the changes to API-managed keys and roles, newest first "
        "(GET /v1/admin/audit, following pages up to --limit): time, action, type, name, who "
        "(project and key fingerprint) and the fields changed.",
        epilog=EPILOG,
    )
    trail.add_argument("--name", type=_not_empty, help="only the entries of this key or role")
    trail.add_argument("--type", choices=("key", "role"), help="only keys, or only roles")
    trail.add_argument(
        "--since",
        metavar="ISO8601",
        help="only entries at or after this time, such as 2026-01-31T00:00:00Z",
    )
    trail.add_argument(
        "--limit",
        type=_positive,
        default=DEFAULT_PAGE,
        metavar="N",
        help=f"at most N entries (default {DEFAULT_PAGE})",
    )
    trail.add_argument(
        "--page-size",
        type=_page_size,
        default=MAX_PAGE,
        metavar="N",
        help=f"entries asked per request, 1 to {MAX_PAGE} (default {MAX_PAGE})",
    )
    _common(trail, audit)
