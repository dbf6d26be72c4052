"""`tollgate config check`: every problem of a set of config files, without starting anything.

Errors are what `serve` would refuse, found by the same loader (`load.py`: same reading, merge
and validation, same messages). Warnings are what DIAL accepts but is most likely a mistake:
unknown fields, weak keys, roles and names that lead nowhere. Each problem names its file, its
JSON path (key names as `sha256:` fingerprints, never the secret) and, where it can be found,
its line and column.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import string
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import AliasChoices, BaseModel, ValidationError
from pydantic.alias_generators import to_snake

from tollgate.config.load import (
    ConfigError,
    SourceFile,
    _display_path,
    _json_loc,
    _message,
    _origin,
    read_source,
)
from tollgate.config.merge import deep_merge
from tollgate.config.schema import (
    ANTHROPIC_MESSAGES,
    INTERFACE_TYPES,
    RESPONSES,
    SHARE_TYPES,
    Config,
    Deployable,
    Model,
)
from tollgate.routing.interfaces import OPERATIONS
from tollgate.routing.routes import DEFAULT_ORDER as DEFAULT_ROUTE_ORDER
from tollgate.security.admin import AdminRule
from tollgate.security.keys import HASHED_NAME, digest_of_name
from tollgate.settings import AdminRuleSetting, Settings, SettingsError, load_settings
from tollgate.snapshot import BASE_ASSISTANT, build_snapshot
from tollgate.storage.settings import StorageSettings

Severity = Literal["error", "warning"]
Loc = tuple[int | str, ...]

MIN_KEY_BITS = 128

# Top-level sections of newer DIAL versions that Tollgate does not implement
# (compatibility C6): worth a warning of their own, since DIAL would act on them and Tollgate
# will not.
UNSUPPORTED_DIAL_SECTIONS = frozenset(
    {
        "toolsets",
        "applicationTypeSchemas",
        "catalogSchemas",
        "translators",
        "defaultLocale",
    }
)


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding, ready to print: where it is and what DIAL (or Tollgate) says about it."""

    severity: Severity
    message: str
    path: str | None = None  # JSON path as operators read it: `$.keys["sha256:1a2b3c4d…"].project`
    file: str | None = None
    line: int | None = None
    column: int | None = None
    # The raw location in the merged tree, used to find the file and line. It may hold a key's
    # secret (the name of a `keys` entry), so it is never shown.
    loc: Loc | None = field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        where = self.file or "tollgate"
        if self.line is not None:
            where += f":{self.line}:{self.column}"
        path = f"{self.path}: " if self.path else ""
        return f"{where}: {self.severity}: {path}{self.message}"

    def to_json(self) -> dict[str, Any]:
        return {
            "severity": self.severity,
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "path": self.path,
            "message": self.message,
        }


def at(loc: Loc, message: str, severity: Severity = "warning") -> Problem:
    return Problem(severity, message, _display_path(loc), loc=loc)


def exit_code(problems: Sequence[Problem], *, strict: bool = False) -> int:
    """0: clean; 1: errors (or warnings when strict); 2: warnings only."""
    if any(p.severity == "error" for p in problems):
        return 1
    if problems:
        return 1 if strict else 2
    return 0


# --- The whole check -----------------------------------------------------------------------------


def check(
    config_files: Sequence[str],
    *,
    settings_file: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> list[Problem]:
    """Check the static settings as `serve` assembles them, then the config files they name.

    `config_files`, when given, replace `config.files` of the settings (as `serve --config`);
    the settings also decide how arrays merge (`config.jsonMergeStrategy.overwriteArrays`).
    """
    settings, problems = check_settings(settings_file, config_files, environ)
    if settings is None:
        return problems
    if not settings.config_files:
        return [Problem("error", "no config files: pass FILE... or set config.files in settings")]
    return check_files(
        settings.config_files,
        overwrite_arrays=settings.overwrite_arrays,
        admin_rules=settings.admin_rules,
    )


def check_settings(
    settings_file: str | None,
    config_files: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> tuple[Settings | None, list[Problem]]:
    env = os.environ if environ is None else environ
    overrides = {"config": {"files": list(config_files)}} if config_files else None
    try:
        settings = load_settings(settings_file, env, overrides)
        StorageSettings.from_raw(settings.raw)  # `storage.*`, as `tollgate serve` checks it
        return settings, []
    except SettingsError as exc:
        return None, [_settings_problem(exc, settings_file or env.get("AIDIAL_SETTINGS"))]


def _settings_problem(exc: SettingsError, settings_file: str | None) -> Problem:
    message = str(exc)
    prefix = f"settings file {settings_file}: "
    if settings_file is None or not message.startswith(prefix):
        return Problem("error", message)  # a setting's value: from the file or the environment
    cause = exc.__cause__
    line, column = (
        (cause.lineno, cause.colno) if isinstance(cause, json.JSONDecodeError) else (None, None)
    )
    return Problem("error", message[len(prefix) :], file=settings_file, line=line, column=column)


def check_files(
    paths: Sequence[str],
    *,
    overwrite_arrays: bool = False,
    admin_rules: Sequence[AdminRuleSetting] = (),
) -> list[Problem]:
    """Read, merge and validate like `load_config`, then look for likely mistakes.

    `admin_rules` are the settings' `access.admin.rules`: a role they make an administrator
    has an effect even if nothing in the config names it.

    Unreadable files stop the check (a merge without them would only add confusing errors).
    Warnings that need a valid config (keys, roles, references) wait until the errors are fixed.
    """
    if not paths:
        return [Problem("error", "no config files to check")]
    sources: list[SourceFile] = []
    raws: dict[str, bytes] = {}
    read_problems: list[Problem] = []
    for path in paths:
        try:
            source, raw = read_source(path)
        except ConfigError as exc:
            read_problems.extend(_read_problem(path, text, exc) for text in exc.problems)
            continue
        sources.append(source)
        raws[path] = raw
    if read_problems:
        return read_problems

    merged: dict[str, Any] = {}
    for source in sources:
        merged = deep_merge(merged, source.tree, overwrite_arrays=overwrite_arrays)
    errors: list[Problem] = []
    warnings = unknown_fields(Config, merged)
    try:
        config = Config.model_validate(merged)
    except ValidationError as exc:
        for error in exc.errors(include_input=False, include_url=False):
            errors.append(at(_json_loc(error, merged), _message(error), "error"))
    else:
        errors.extend(_snapshot_problems(config))
        warnings += check_config(config, admin_rules)
    where = _Locator(sources, raws, merged)
    order = {path: index for index, path in enumerate(paths)}

    def reading_order(problem: Problem) -> tuple[int, int, int]:
        file = order.get(problem.file or "", len(order))
        return file, problem.line or 0, problem.column or 0

    return [
        *sorted((where.locate(p) for p in errors), key=reading_order),
        *sorted((where.locate(p) for p in warnings), key=reading_order),
    ]


def _read_problem(path: str, text: str, exc: ConfigError) -> Problem:
    """The loader's message for an unreadable file, its line and column taken apart."""
    message = text.removeprefix(f"{path}: ")
    cause = exc.__cause__
    if isinstance(cause, json.JSONDecodeError):
        message = message.removeprefix(f"line {cause.lineno} column {cause.colno}: ")
        return Problem("error", message, file=path, line=cause.lineno, column=cause.colno)
    return Problem("error", message, file=path)


def _snapshot_problems(config: Config) -> list[Problem]:
    """`serve` also builds the request path's snapshot; whatever fails there fails here."""
    try:
        build_snapshot(config)
    except Exception as exc:
        return [Problem("error", f"the config cannot be used: {exc}")]
    return []


def check_config(config: Config, admin_rules: Sequence[AdminRuleSetting] = ()) -> list[Problem]:
    """Warnings about a valid config: weak or duplicate keys, dangling roles and names."""
    return [
        *key_problems(config),
        *role_problems(config, admin_rules),
        *reference_problems(config),
        *route_problems(config),
        *interface_problems(config),
    ]


# --- Unknown fields ------------------------------------------------------------------------------


def unknown_fields(model: type[BaseModel], tree: Any, loc: Loc = ()) -> list[Problem]:
    """Fields no model declares (kept, then ignored: likely typos), and fields given twice.

    Walks the merged JSON along the schema, so it works on an invalid config too and names each
    field as it is written.
    """
    if not isinstance(tree, dict):
        return []
    spellings = {name: _spellings(name, info) for name, info in model.model_fields.items()}
    field_of = {spelling: name for name, names in spellings.items() for spelling in names}
    problems: list[Problem] = []
    for key, value in tree.items():
        name = field_of.get(key)
        if name is None:
            problems.append(at((*loc, key), _unknown_message(key, loc, field_of)))
            continue
        given = [spelling for spelling in spellings[name] if spelling in tree]
        if key != given[0]:
            # pydantic takes the first spelling it knows (camelCase) and keeps the other as extra.
            problems.append(at((*loc, key), f'"{given[0]}" is also given; this one is ignored'))
            continue
        problems += _nested(model.model_fields[name].annotation, value, (*loc, key))
    return problems


def _spellings(name: str, info: Any) -> list[str]:
    alias = info.validation_alias
    choices = alias.choices if isinstance(alias, AliasChoices) else [alias or info.alias or name]
    names = [choice for choice in choices if isinstance(choice, str)]
    return list(dict.fromkeys([*names, name]))


def _unknown_message(key: str, loc: Loc, field_of: Mapping[str, str]) -> str:
    if not loc and key in UNSUPPORTED_DIAL_SECTIONS:
        return "a section of newer DIAL versions that Tollgate does not support; ignored"
    message = "unknown field, ignored"
    close = difflib.get_close_matches(key, list(field_of), n=1, cutoff=0.75)
    return f'{message} (did you mean "{close[0]}"?)' if close else message


def _nested(annotation: Any, value: Any, loc: Loc) -> list[Problem]:
    """Follow a field's type into the models it holds: `X | None`, `dict[str, X]`, `list[X]`."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        return [p for arg in get_args(annotation) for p in _nested(arg, value, loc)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return unknown_fields(annotation, value, loc)
    if origin is dict and isinstance(value, dict):
        item_type = get_args(annotation)[1]
        return [p for k, v in value.items() for p in _nested(item_type, v, (*loc, k))]
    if origin is list and isinstance(value, list):
        item_type = get_args(annotation)[0]
        return [p for i, v in enumerate(value) for p in _nested(item_type, v, (*loc, i))]
    return []


# --- Keys ----------------------------------------------------------------------------------------


def estimated_bits(secret: str) -> float:
    """A generous upper bound on a secret's randomness: length x log2(alphabet it draws from).

    The alphabet is the union of the character classes used (hex digits alone count 16), so a
    short or narrow key is caught; a long guessable phrase is not (no dictionary here).
    """
    if not secret:
        return 0.0
    if all(c in string.digits for c in secret):
        alphabet = 10
    elif all(c in string.hexdigits for c in secret):
        alphabet = 16
    else:
        alphabet = (
            10 * any(c in string.digits for c in secret)
            + 26 * any(c in string.ascii_lowercase for c in secret)
            + 26 * any(c in string.ascii_uppercase for c in secret)
            + 32 * any(c not in string.ascii_letters + string.digits for c in secret)
        )
    return len(secret) * math.log2(alphabet)


def key_problems(config: Config) -> list[Problem]:
    problems: list[Problem] = []
    seen: dict[bytes, str] = {}
    for name in config.keys:
        loc: Loc = ("keys", name)
        digest = digest_of_name(name)
        earlier = seen.get(digest)
        if earlier is not None:
            # Both stand for one secret (plain and `sha256:` name): the later entry wins.
            problems.append(
                at(loc, f"the same key as {_display_path(('keys', earlier))}, which it replaces")
            )
        seen[digest] = name
        if HASHED_NAME.fullmatch(name) or config.keys[name].demo:
            continue  # the secret is not here to judge, or is known to be a demonstration
        bits = estimated_bits(name)
        if bits < MIN_KEY_BITS:
            problems.append(
                at(
                    loc,
                    f"weak key: at most about {bits:.0f} bits of randomness, fewer than "
                    f"{MIN_KEY_BITS}; make a new one with `tollgate keys new`",
                )
            )
    return problems


# --- Roles ---------------------------------------------------------------------------------------


def _access_lists(config: Config) -> Iterator[tuple[Loc, list[str]]]:
    """Every `userRoles` list, with its location."""
    for loc, item in _deployables(config):
        if item.user_roles is not None:
            yield (*loc, "userRoles"), item.user_roles
    for name, route in config.routes.items():
        if route.user_roles is not None:
            yield ("routes", name, "userRoles"), route.user_roles


def _key_roles(config: Config) -> Iterator[tuple[Loc, str]]:
    for name, key in config.keys.items():
        for index, role in enumerate(key.roles):
            yield ("keys", name, "roles", index), role
        if key.role:
            yield ("keys", name, "role"), key.role


def role_problems(config: Config, admin_rules: Sequence[AdminRuleSetting] = ()) -> list[Problem]:
    """Roles that lead nowhere, judged by DIAL's rules (compatibility C9, C12, C15).

    A role needs no `roles` entry to grant access through `userRoles` (compatibility C9), so
    only roles that can have no effect are reported: a key's role that no `roles` entry defines
    and no `userRoles` lists (`default` excepted: DIAL's conventional role, needed only for
    limits; nor a role the admin rules of the settings match, which makes its keys
    administrators), a `userRoles` role that no key holds and no `roles` entry defines
    (Tollgate's callers are keys: nobody can hold it), and a role limit for a deployment that
    does not exist.
    """
    rules = [AdminRule.of(rule) for rule in admin_rules]
    defined = set(config.roles)
    listed = {role for _, roles in _access_lists(config) for role in roles}
    held = {role for _, role in _key_roles(config)}
    problems: list[Problem] = []
    for loc, role in _key_roles(config):
        if role in defined or role in listed or role == "default":
            continue
        if not any(rule.matches((role,)) for rule in rules):
            problems.append(
                at(
                    loc,
                    f'role "{role}" is not defined in roles and no userRoles lists it: '
                    "it has no effect",
                )
            )
    for loc, roles in _access_lists(config):
        for index, role in enumerate(roles):
            if role not in defined and role not in held:
                problems.append(
                    at(
                        (*loc, index),
                        f'no key has role "{role}" and roles does not define it: '
                        "no caller can use it to reach this deployment",
                    )
                )
    targets = _limit_targets(config)
    for role_name, definition in config.roles.items():
        for deployment in definition.limits:
            if deployment not in targets:
                problems.append(
                    at(
                        ("roles", role_name, "limits", deployment),
                        f'no deployment named "{deployment}": this limit applies to nothing',
                    )
                )
        for type_name in definition.share or {}:
            if type_name in SHARE_TYPES:
                continue
            upper = type_name.upper()
            hint = (
                f"did you mean {upper}?"
                if upper in SHARE_TYPES
                else f"DIAL's types are {', '.join(SHARE_TYPES)}"
            )
            problems.append(
                at(
                    ("roles", role_name, "share", type_name),
                    f'share type "{type_name}" is not one DIAL knows, and DIAL ignores it '
                    f"without a word: {hint}",
                )
            )
    return problems


def _limit_targets(config: Config) -> set[str]:
    """What a role limit may name: deployments, and routes as in newer DIAL (compatibility C45)."""
    names = {*config.models, *config.applications, *config.assistant.assistants, *config.routes}
    if config.assistant.endpoint:
        names.add(BASE_ASSISTANT)
    return names


# --- Interceptors and addons ---------------------------------------------------------------------


def _deployables(config: Config) -> Iterator[tuple[Loc, Deployable]]:
    sections: tuple[tuple[str, Mapping[str, Deployable]], ...] = (
        ("models", config.models),
        ("applications", config.applications),
        ("addons", config.addons),
        ("interceptors", config.interceptors),
    )
    for section, items in sections:
        for name, item in items.items():
            yield (section, name), item
    for name, assistant in config.assistant.assistants.items():
        yield ("assistant", "assistants", name), assistant


def reference_problems(config: Config) -> list[Problem]:
    """Interceptors and addons named but not defined (DIAL answers 404 when they are called)."""
    problems: list[Problem] = []
    for index, name in enumerate(config.global_interceptors):
        if name not in config.interceptors:
            problems.append(
                at(("globalInterceptors", index), f'no interceptor "{name}" in interceptors')
            )
    for loc, item in _deployables(config):
        for index, name in enumerate(item.interceptors):
            if name not in config.interceptors:
                problems.append(
                    at((*loc, "interceptors", index), f'no interceptor "{name}" in interceptors')
                )
    for name, assistant in config.assistant.assistants.items():
        for index, addon in enumerate(assistant.addons):
            if addon not in config.addons:
                problems.append(
                    at(
                        ("assistant", "assistants", name, "addons", index),
                        f'no addon "{addon}" in addons',
                    )
                )
    return problems


# --- Typed interfaces --------------------------------------------------------------------------

OVERRIDE_PATH_OPERATIONS = frozenset(OPERATIONS.values()) | {
    "getOpenaiResponsesById",
    "deleteOpenaiResponsesById",
    "postOpenaiResponsesCancel",
}


def interface_problems(config: Config) -> list[Problem]:
    """`interfaces` entries that serve nothing, or not what they seem to (compatibility C75,
    C76)."""
    problems: list[Problem] = []
    for loc, item in _deployables(config):
        for name, entry in item.interfaces.items():
            where = (*loc, "interfaces", name)
            if name not in INTERFACE_TYPES:
                problems.append(
                    at(
                        where,
                        f"Unsupported interface type '{name}'. Model supports: "
                        + ", ".join(INTERFACE_TYPES)
                        + " (kept, but it never serves a call)",
                    )
                )
                continue
            if entry.mode != "passthrough":
                problems.append(
                    at(
                        (*where, "mode"),
                        f'mode "{entry.mode}" is not served by Tollgate: this interface serves '
                        "nothing (only passthrough is)",
                    )
                )
            elif entry.base_url is None and item.base_url is None:
                problems.append(
                    at(where, "no base_url here nor baseUrl on the deployment: serves nothing")
                )
            for operation in entry.override_paths:
                if operation not in OVERRIDE_PATH_OPERATIONS:
                    problems.append(
                        at(
                            (*where, "overridePaths", operation),
                            f'unknown operation "{operation}": never used',
                        )
                    )
        typed = [name for name in item.interfaces if name in (RESPONSES, ANTHROPIC_MESSAGES)] + (
            ["responsesEndpoint"] if item.responses_endpoint else []
        )
        if typed and (item.interceptors or config.global_interceptors):
            problems.append(
                at(
                    loc,
                    f"{', '.join(typed)} not served: the deployment has interceptors, which "
                    "speak chat completions only (calls answer 503)",
                )
            )
        if (
            isinstance(item, Model)
            and item.upstreams
            and (RESPONSES in item.interfaces or item.responses_endpoint)
        ):
            for index, upstream in enumerate(item.upstreams):
                if upstream.id is None:
                    problems.append(
                        at(
                            (*loc, "upstreams", index),
                            "an upstream of a model that serves the Responses API needs an id "
                            "(calls answer 503 Upstream is missing required id)",
                        )
                    )
        pricing = item.pricing if isinstance(item, Model) else None
        if (
            pricing is not None
            and (pricing.cache_read is not None or pricing.cache_write is not None)
            and (pricing.unit or "token") != "token"
        ):
            problems.append(
                at(
                    (*loc, "pricing"),
                    "cacheRead and cacheWrite apply to unit token only: ignored here",
                )
            )
    return problems


# --- Routes ------------------------------------------------------------------------------------


def route_problems(config: Config) -> list[Problem]:
    """Routes that cannot do what they seem to (compatibility C44-C46): a `response` beside
    `upstreams` (the response answers), no way to answer (every call is 502 `No route`), WebSocket
    upstreams (Tollgate does not proxy them), and routes after one that takes every request."""
    problems: list[Problem] = []
    catch_all: str | None = None
    for name, route in sorted(
        config.routes.items(),
        key=lambda item: DEFAULT_ROUTE_ORDER if item[1].order is None else item[1].order,
    ):
        loc: Loc = ("routes", name)
        if catch_all is not None:
            problems.append(
                at(loc, f'route "{catch_all}" before it takes every request: it is never used')
            )
        elif not route.paths and not route.methods:
            catch_all = name
        if route.response is not None:
            if route.upstreams:
                problems.append(
                    at((*loc, "upstreams"), "the route's response answers: never called")
                )
            continue
        for index, upstream in enumerate(route.upstreams):
            if (upstream.endpoint or "").lower().startswith(("ws:", "wss:")):
                problems.append(
                    at(
                        (*loc, "upstreams", index, "endpoint"),
                        "WebSocket upstreams are not supported: never called",
                    )
                )
        usable = [
            u
            for u in route.upstreams
            if u.weight > 0 and not (u.endpoint or "").lower().startswith(("ws:", "wss:"))
        ]
        if not usable:
            problems.append(
                at(loc, 'no response and no usable upstream: every call answers 502 "No route"')
            )
    return problems


# --- Where a problem was written -----------------------------------------------------------------


class _Locator:
    """Finds the file (the last one to define the location, as the loader does) and the line."""

    def __init__(
        self, sources: Sequence[SourceFile], raws: Mapping[str, bytes], merged: dict[str, Any]
    ) -> None:
        self._sources = sources
        self._raws = raws
        self._merged = merged
        self._texts: dict[str, tuple[str, dict[Loc, int]]] = {}

    def locate(self, problem: Problem) -> Problem:
        if problem.loc is None or problem.file is not None:
            return problem
        loc = _as_written(self._merged, problem.loc)
        file = _origin(self._sources, loc)
        line = column = None
        if file in self._raws:
            text, positions = self._positions(file)
            for depth in range(len(loc), 0, -1):
                offset = positions.get(loc[:depth])
                if offset is not None:
                    line, column = _line_column(text, offset)
                    break
        return replace(
            problem, path=_display_path(loc), file=file, line=line, column=column, loc=loc
        )

    def _positions(self, path: str) -> tuple[str, dict[Loc, int]]:
        if path not in self._texts:
            raw = self._raws[path]
            try:
                text = raw.decode(json.detect_encoding(raw))
                self._texts[path] = (text, json_positions(text))
            except (UnicodeDecodeError, ValueError, RecursionError):
                self._texts[path] = ("", {})
        return self._texts[path]


def _as_written(tree: Any, loc: Loc) -> Loc:
    """Checks name fields in DIAL's camelCase; the file may spell them in snake_case."""
    written: list[int | str] = []
    node = tree
    for part in loc:
        if isinstance(node, dict) and isinstance(part, str):
            if part not in node and to_snake(part) in node:
                part = to_snake(part)
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            node = None
        written.append(part)
    return tuple(written)


_SPACE = re.compile(r"[ \t\n\r]*")


def json_positions(text: str) -> dict[Loc, int]:
    """The offset of every member name and array element of a well-formed JSON text.

    Member names are keyed by their location (`("models", "gpt", "endpoint")`); a name given
    twice keeps its last position, as `json.loads` keeps the last value.
    """
    positions: dict[Loc, int] = {}
    decoder = json.JSONDecoder()

    def skip(index: int) -> int:
        match = _SPACE.match(text, index)
        return match.end() if match else index

    def value(index: int, loc: Loc) -> int:
        index = skip(index)
        opener = text[index : index + 1]
        if opener not in ("{", "["):
            _, end = decoder.raw_decode(text, index)
            return int(end)
        closer = "}" if opener == "{" else "]"
        index = skip(index + 1)
        if text.startswith(closer, index):
            return index + 1
        item = 0
        while True:
            index = skip(index)
            if opener == "{":
                start = index
                name, index = decoder.raw_decode(text, index)
                child: Loc = (*loc, str(name))
                positions[child] = start
                index = skip(index) + 1  # the colon
            else:
                child = (*loc, item)
                positions[child] = index
                item += 1
            index = skip(value(index, child))
            if not text.startswith(",", index):
                return index + 1
            index += 1

    value(0, ())
    return positions


def _line_column(text: str, offset: int) -> tuple[int, int]:
    """1-based, counted as `json.JSONDecodeError` counts them."""
    return text.count("\n", 0, offset) + 1, offset - text.rfind("\n", 0, offset)
