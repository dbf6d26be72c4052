"""Static settings (`aidial.settings.json`): defaults, a settings file, `aidial.*` variables.

Assembled once at start-up, lowest to highest priority (README, "Configuration"): built-in
`default_settings.json` → the file named by `AIDIAL_SETTINGS` (or `--settings`) → environment
variables prefixed `aidial.` (or the deprecated `proxy.`) → command-line options. The merged
tree is then validated once into `Settings`, a pydantic model whose every field names the
setting it comes from; a problem is reported as `setting <path>: <what is wrong>`. Settings are
never reloaded.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple
from urllib.parse import urlsplit

from pydantic import (
    AliasGenerator,
    AliasPath,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from tollgate.config.merge import deep_merge

ENV_PREFIXES = ("aidial.", "proxy.")


class SettingsError(Exception):
    """A settings source that cannot be read, or a setting that cannot be used; the message
    names the source or the setting (one line per problem)."""


@dataclass(frozen=True, slots=True)
class TracingSettings:
    """Where and how spans are exported (OTLP over HTTP, protobuf)."""

    endpoint: str  # the full URL spans are posted to (`.../v1/traces`)
    source: str  # the setting or variable that turned tracing on, for messages
    service_name: str
    sample_ratio: float  # of traces started here; a caller's sampled flag is followed


# --- Value types: each raises the message that follows `setting <path>: ` -----------------------


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a number, got {value!r}")
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"expected a number, got {value!r}") from None


def _integer(value: Any) -> int:
    return int(_number(value))


def _positive(value: Any) -> float:
    number = _number(value)
    if number <= 0:
        raise ValueError("must be a positive number")
    return number


def _seconds(value: Any) -> float:
    return _number(value) / 1000  # settings give milliseconds


def _positive_seconds(value: Any) -> float:
    return _positive(value) / 1000


def _tcp_port(value: Any) -> int:
    port = _integer(value)
    if not 0 <= port <= 65535:
        raise ValueError(f"{port} is not a TCP port")
    return port


def _one_of(*choices: str) -> Any:
    def check(value: Any) -> Any:
        if value not in choices:
            names = " or ".join(f'"{choice}"' for choice in choices)
            raise ValueError(f"expected {names}, got {value!r}")
        return value

    return BeforeValidator(check)


Number = Annotated[float, BeforeValidator(_number)]
Integer = Annotated[int, BeforeValidator(_integer)]
Seconds = Annotated[float, BeforeValidator(_seconds)]  # given in milliseconds
PositiveSeconds = Annotated[float, BeforeValidator(_positive_seconds)]
PositiveInteger = Annotated[int, BeforeValidator(lambda value: int(_positive(value)))]
Flag = Annotated[bool, BeforeValidator(lambda value: value is not False)]  # on unless false


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


Boolean = Annotated[bool, BeforeValidator(_boolean)]  # off unless true, and nothing else


def _at(*path: str) -> Any:
    return AliasPath(*path)


# --- Sections parsed here once, for the modules that use them -----------------------------------


class SettingsSection(BaseModel):
    """A settings object as DIAL names its fields (camelCase); unknown fields ignored."""

    model_config = ConfigDict(
        alias_generator=AliasGenerator(validation_alias=to_camel), extra="ignore", frozen=True
    )


ADMIN_RULE_FUNCTIONS = ("EQUAL", "CONTAIN", "REGEX")


class AdminRuleSetting(SettingsSection):
    """One rule of `access.admin.rules`, as DIAL writes it; the matching is `security.admin`'s.

    `function` is upper-cased (DIAL binds it case-insensitively); `REGEX` targets are checked
    to compile here, so that a bad pattern is a settings error at start-up.
    """

    source: str
    function: Literal["EQUAL", "CONTAIN", "REGEX"]
    targets: tuple[str, ...]

    @field_validator("source", mode="before")
    @classmethod
    def _claim(cls, value: Any) -> Any:
        if not isinstance(value, str) or not value:
            raise ValueError("expected a claim name such as roles")
        return value

    @field_validator("function", mode="before")
    @classmethod
    def _function(cls, value: Any) -> Any:
        if not isinstance(value, str) or value.upper() not in ADMIN_RULE_FUNCTIONS:
            raise ValueError("expected EQUAL, CONTAIN or REGEX")
        return value.upper()

    @field_validator("targets", mode="before")
    @classmethod
    def _targets(cls, value: Any) -> Any:
        if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
            raise ValueError("expected a list of strings")
        return value

    @model_validator(mode="after")
    def _patterns(self) -> AdminRuleSetting:
        if self.function == "REGEX":
            for target in self.targets:
                try:
                    re.compile(target)
                except re.error as exc:
                    raise ValueError(f"targets: invalid regular expression: {exc}") from None
        return self


def _rules(value: Any) -> Any:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ValueError("expected a list of rules")
    for index, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise ValueError(f"[{index}]: expected an object")
    # Missing fields are reported by the field validators (validate_default below).
    return [{"source": None, "function": None, "targets": None, **item} for item in value]


class RedisNode(NamedTuple):
    host: str
    port: int
    tls: bool  # `rediss://`


def _redis_address(value: Any) -> RedisNode:
    if isinstance(value, RedisNode):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected redis://host:port, got {value!r}")
    url = urlsplit(value if "://" in value else f"redis://{value}")
    try:
        port = url.port or 6379
    except ValueError:
        raise ValueError(f"expected redis://host:port, got {value!r}") from None
    if url.scheme not in ("redis", "rediss") or not url.hostname:
        raise ValueError(f"expected redis://host:port, got {value!r}")
    return RedisNode(url.hostname, port, url.scheme == "rediss")


RedisAddress = Annotated[RedisNode, BeforeValidator(_redis_address)]
DEFAULT_REDIS_TIMEOUT = 1.0  # s: a limits check must not hold a call for Redisson's 3 s
DEFAULT_REDIS_POOL_SIZE = 64  # Redisson's connectionPoolSize default


class _RedisServers(SettingsSection):
    username: str | None = None
    password: str | None = Field(default=None, repr=False)
    timeout: Seconds = DEFAULT_REDIS_TIMEOUT  # of a command; milliseconds in the settings
    connect_timeout: Seconds = DEFAULT_REDIS_TIMEOUT


class SingleServerConfig(_RedisServers):
    address: RedisAddress | None = None
    database: Integer = 0


def _node_list(value: Any) -> Any:
    if value is not None and not isinstance(value, list):
        raise ValueError("expected a list")
    return value


class ClusterServersConfig(_RedisServers):
    node_addresses: Annotated[list[RedisAddress] | None, BeforeValidator(_node_list)] = None
    connection_pool_size: Integer = DEFAULT_REDIS_POOL_SIZE


class RedisSettings(SettingsSection):
    """`redis.*`, DIAL's Redisson settings: one server or a cluster (the server wins)."""

    single_server_config: SingleServerConfig | None = None
    cluster_servers_config: ClusterServersConfig | None = None

    @property
    def server(self) -> SingleServerConfig | ClusterServersConfig | None:
        """The configuration in use: the one server if it has an address, else the cluster if
        it names nodes, else None (no Redis: the embedded ledger)."""
        single = self.single_server_config
        if single is not None and single.address is not None:
            return single
        cluster = self.cluster_servers_config
        if cluster is not None and cluster.node_addresses:
            return cluster
        return None


class TelemetrySettings(SettingsSection):
    """`telemetry.*`; whether spans are exported is `Settings.tracing`, which also reads
    OpenTelemetry's own variables."""

    endpoint: str | None = Field(default=None, validation_alias=_at("otlp", "endpoint"))
    service_name: str | None = None
    sample_ratio: Number = 1.0

    @field_validator("endpoint", mode="before")
    @classmethod
    def _url(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, str):
            raise ValueError(f"expected a URL, got {value!r}")
        return value

    @field_validator("service_name", mode="before")
    @classmethod
    def _name(cls, value: Any) -> Any:
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ValueError(f"expected a name, got {value!r}")
        return value

    @field_validator("sample_ratio")
    @classmethod
    def _ratio(cls, value: float) -> float:
        if not 0 <= value <= 1:
            raise ValueError("must be between 0 and 1")
        return value


# --- The settings ---------------------------------------------------------------------------


def _files(value: Any) -> Any:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(f, str) for f in value):
        raise ValueError(f"expected a list of paths, got {value!r}")
    return tuple(value)


def _positive_reload(value: Any) -> int:
    reload_ms = _integer(value)
    if reload_ms <= 0:
        raise ValueError("must be a positive number of milliseconds")
    return reload_ms


def _usage_file(value: Any) -> Any:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"expected a path, got {value!r}")
    return value or None


def _metrics_port(value: Any) -> int | None:
    if value is None:
        return None
    port = _integer(value)
    if not 0 < port <= 65535:
        raise ValueError(f"{port} is not a TCP port")
    return port


def _log_level(value: Any) -> str:
    level = str(value).upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(f"expected DEBUG, INFO, WARNING or ERROR, got {level!r}")
    return level


# Sections the settings read fields of: each must be a JSON object when given.
SECTIONS = (
    "server",
    "config",
    "perRequestApiKey",
    "apiKeyValidation",
    "resources",
    "upstream",
    "limits",
    "metrics",
    "log",
    "telemetry",
    "access",
    "redis",
    "storage",
    "invitations",
    "applications",
)


class Settings(BaseModel):
    """The static settings Tollgate uses, typed, each field read from its setting's path.

    Defaults are those of `default_settings.json` (which `load_settings` always merges first).
    `raw` keeps the whole merged document; `tracing` also depends on OpenTelemetry's
    variables, so it is worked out with the environment `load_settings` was given.
    """

    model_config = ConfigDict(frozen=True, extra="ignore", arbitrary_types_allowed=True)

    host: Annotated[str, BeforeValidator(lambda v: str(v or "0.0.0.0"))] = Field(
        "0.0.0.0", validation_alias=_at("server", "host")
    )
    port: Annotated[int, BeforeValidator(_tcp_port)] = Field(
        8080, validation_alias=_at("server", "port")
    )
    config_files: Annotated[tuple[str, ...], BeforeValidator(_files)] = Field(
        (), validation_alias=_at("config", "files")
    )
    reload_ms: Annotated[int, BeforeValidator(_positive_reload)] = Field(
        60000, validation_alias=_at("config", "reload")
    )
    overwrite_arrays: Annotated[bool, BeforeValidator(bool)] = Field(
        False, validation_alias=_at("config", "jsonMergeStrategy", "overwriteArrays")
    )
    per_request_key_ttl_s: Number = Field(1800.0, validation_alias=_at("perRequestApiKey", "ttl"))
    proxy_count: Integer = Field(0, validation_alias=_at("apiKeyValidation", "proxyCount"))
    max_body_size: Integer = Field(67108864, validation_alias=_at("resources", "maxSize"))
    # The comment line a resource subscription sends when it has had nothing to send (C94).
    heartbeat_ms: PositiveInteger = Field(
        60000, validation_alias=_at("resources", "heartbeatPeriod")
    )
    # DIAL 2024's invitation TTL; when set, it is the types' default TTL (compatibility C88).
    invitation_ttl_s: PositiveInteger | None = Field(
        None, validation_alias=_at("invitations", "ttlInSeconds")
    )
    # Custom applications (resources) in `GET /openai/applications` (compatibility C92).
    include_custom_apps: Boolean = Field(
        False, validation_alias=_at("applications", "includeCustomApps")
    )
    connect_timeout_s: Seconds = Field(10.0, validation_alias=_at("upstream", "connectTimeout"))
    read_timeout_s: Seconds = Field(300.0, validation_alias=_at("upstream", "readTimeout"))
    # The upstream connection pool: in all, and to one upstream (host and port), so that calls
    # flooding one slow upstream cannot take every connection (docs/configuration.md).
    max_connections: PositiveInteger = Field(
        1024, validation_alias=_at("upstream", "maxConnections")
    )
    max_connections_per_upstream: PositiveInteger = Field(
        256, validation_alias=_at("upstream", "maxConnectionsPerUpstream")
    )
    # "dial" or "reserve" (README, "Limits")
    admission: Annotated[Literal["dial", "reserve"], _one_of("dial", "reserve")] = Field(
        "dial", validation_alias=_at("limits", "admission")
    )
    default_completion_tokens: Integer = Field(
        1024, validation_alias=_at("limits", "reserve", "defaultCompletionTokens")
    )
    # The embedded ledger's SQLite file; None: memory only.
    usage_file: Annotated[str | None, BeforeValidator(_usage_file)] = Field(
        "tollgate-usage.sqlite", validation_alias=_at("limits", "embedded", "file")
    )
    usage_flush_s: Seconds = Field(1.0, validation_alias=_at("limits", "embedded", "flushInterval"))
    on_store_failure: Annotated[Literal["local", "closed"], _one_of("local", "closed")] = Field(
        "local", validation_alias=_at("limits", "onStoreFailure")
    )
    # Token and cost limits checked while a stream is relayed (compatibility C79).
    enforce_during_stream: Boolean = Field(
        False, validation_alias=_at("limits", "enforceDuringStream")
    )
    # Hostile input and shutdown (`server.*`): how long a shutdown waits for calls in flight,
    # how long an idle connection or a request body may take, how long a client may take none
    # of a streamed answer, and how large request headers may be.
    shutdown_grace_s: PositiveSeconds = Field(
        30.0, validation_alias=_at("server", "shutdownGracePeriod")
    )
    keep_alive_timeout_s: PositiveSeconds = Field(
        75.0, validation_alias=_at("server", "keepAliveTimeout")
    )
    body_read_timeout_s: PositiveSeconds = Field(
        60.0, validation_alias=_at("server", "bodyReadTimeout")
    )
    write_stall_timeout_s: PositiveSeconds = Field(
        60.0, validation_alias=_at("server", "writeStallTimeout")
    )
    max_header_size: PositiveInteger = Field(8190, validation_alias=_at("server", "maxHeaderSize"))
    max_headers: PositiveInteger = Field(128, validation_alias=_at("server", "maxHeaders"))
    # Telemetry: `metrics.*` and `log.*`.
    metrics_enabled: Flag = Field(True, validation_alias=_at("metrics", "enabled"))
    # None: server.host
    metrics_host: Annotated[str | None, BeforeValidator(lambda v: v or None)] = Field(
        None, validation_alias=_at("metrics", "host")
    )
    # None: `/metrics` on the gateway's port, for admins only
    metrics_port: Annotated[int | None, BeforeValidator(_metrics_port)] = Field(
        None, validation_alias=_at("metrics", "port")
    )
    log_format: Annotated[Literal["text", "json"], _one_of("text", "json")] = Field(
        "text", validation_alias=_at("log", "format")
    )
    log_level: Annotated[str, BeforeValidator(_log_level)] = Field(
        "INFO", validation_alias=_at("log", "level")
    )
    access_log: Flag = Field(True, validation_alias=_at("log", "access"))
    telemetry: TelemetrySettings = Field(
        default_factory=TelemetrySettings, validation_alias=_at("telemetry")
    )
    # `access.admin.rules`: who is an administrator (matched by `security.admin`).
    admin_rules: Annotated[tuple[AdminRuleSetting, ...], BeforeValidator(_rules)] = Field(
        (), validation_alias=_at("access", "admin", "rules")
    )
    # `redis.*`; None: no Redis section. `redis.server` says whether Redis is used.
    redis: RedisSettings | None = Field(None, validation_alias=_at("redis"))

    _raw: Mapping[str, Any] = PrivateAttr(default_factory=dict)
    _tracing: TracingSettings | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _objects(cls, tree: Any) -> Any:
        if not isinstance(tree, Mapping):
            raise ValueError("the settings must be a JSON object")
        for name in SECTIONS:
            if tree.get(name) is not None and not isinstance(tree[name], Mapping):
                raise ValueError(f"{name}: expected an object, got {tree[name]!r}")
        return tree

    @model_validator(mode="after")
    def _finish(self, info: ValidationInfo) -> Settings:
        if self.metrics_port is not None and self.metrics_port == self.port:
            raise ValueError("metrics.port: must differ from server.port")
        context = info.context or {}
        self._raw = context.get("raw", {})
        self._tracing = _tracing(self.telemetry, context.get("environ", {}))
        return self

    @property
    def raw(self) -> Mapping[str, Any]:
        """The whole merged settings document, as given."""
        return self._raw

    @property
    def tracing(self) -> TracingSettings | None:
        """OpenTelemetry traces (`telemetry.*`); None: off. See `_tracing`."""
        return self._tracing


def _convert_env_value(text: str) -> Any:
    """Type conversion of vertx-config: booleans, numbers, JSON objects/arrays, else the string."""
    if text in ("true", "false"):
        return text == "true"
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    stripped = text.strip()
    if stripped[:1] in ("{", "["):
        try:
            return json.loads(stripped)
        except ValueError:
            pass
    return text


def settings_from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """`aidial.config.reload=5000` → `{"config": {"reload": 5000}}`."""
    tree: dict[str, Any] = {}
    for name, value in sorted(environ.items()):
        prefix = next((p for p in ENV_PREFIXES if name.startswith(p)), None)
        if prefix is None:
            continue
        parts = name[len(prefix) :].split(".")
        node = tree
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[parts[-1]] = _convert_env_value(value)
    return tree


def _read_json_file(path: str, what: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"{what} {path}: cannot read file: {exc.strerror}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SettingsError(
            f"{what} {path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from exc
    if not isinstance(data, dict):
        raise SettingsError(f"{what} {path}: the top level must be a JSON object")
    return data


def _builtin() -> dict[str, Any]:
    text = resources.files("tollgate").joinpath("default_settings.json").read_text("utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


def _setting_path(loc: tuple[int | str, ...]) -> str:
    """`("access", "admin", "rules", 0, "source")` → `access.admin.rules[0].source`."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else part
    return text


def _problem(error: Any) -> str:
    message = str(error["msg"]).removeprefix("Value error, ")
    path = _setting_path(tuple(error["loc"]))
    # A validator of an object may name the field it found wrong: `targets: ...`, `[0]: ...`.
    head, sep, rest = message.partition(": ")
    if sep and re.fullmatch(r"[A-Za-z_.]+|\[\d+\]", head) and not head.startswith("expected"):
        path = f"{path}{head}" if head.startswith("[") else f"{path}.{head}" if path else head
        message = rest
    return f"setting {path}: {message}" if path else f"settings: {message}"


def load_settings(
    settings_file: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge every source; `overrides` (from the command line) win over all of them."""
    env = os.environ if environ is None else environ
    tree = _builtin()
    file_name = settings_file or env.get("AIDIAL_SETTINGS")
    if file_name:
        # DIAL: the settings replace built-in values; arrays are replaced, not concatenated.
        tree = deep_merge(tree, _read_json_file(file_name, "settings file"), overwrite_arrays=True)
    tree = deep_merge(tree, settings_from_env(env), overwrite_arrays=True)
    if overrides:
        tree = deep_merge(tree, dict(overrides), overwrite_arrays=True)
    try:
        return Settings.model_validate(tree, context={"raw": tree, "environ": env})
    except ValidationError as exc:
        problems = [_problem(e) for e in exc.errors(include_input=False, include_url=False)]
        raise SettingsError("\n".join(problems)) from None


# OpenTelemetry's own variables (its SDK configuration spec), honoured as operators expect.
OTEL_TRACES_ENDPOINT = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"  # a full URL, used as it is
OTEL_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"  # a base URL: `/v1/traces` is appended
TRACES_PATH = "/v1/traces"


def _tracing(telemetry: TelemetrySettings, env: Mapping[str, str]) -> TracingSettings | None:
    """Tracing is on when `telemetry.otlp.endpoint` names a collector, or else when one of
    OpenTelemetry's endpoint variables is set (unless `OTEL_TRACES_EXPORTER=none`);
    `OTEL_SDK_DISABLED=true` turns it off in every case, as it does any OpenTelemetry SDK. The
    setting is a base URL, like the variable `OTEL_EXPORTER_OTLP_ENDPOINT`: spans go to
    `<endpoint>/v1/traces`."""
    endpoint = telemetry.endpoint
    source = "telemetry.otlp.endpoint"
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if not endpoint:
        if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
            return None
        endpoint = env.get(OTEL_TRACES_ENDPOINT, "").strip()
        source = OTEL_TRACES_ENDPOINT
        if not endpoint:
            endpoint = env.get(OTEL_ENDPOINT, "").strip()
            source = OTEL_ENDPOINT
            if not endpoint:
                return None
    if not endpoint.startswith(("http://", "https://")):
        # Not a field's value when it comes from a variable: named as the variable.
        raise ValueError(f"{source}: expected an http:// or https:// URL")
    if source != OTEL_TRACES_ENDPOINT and not endpoint.rstrip("/").endswith(TRACES_PATH):
        endpoint = endpoint.rstrip("/") + TRACES_PATH
    return TracingSettings(
        endpoint=endpoint,
        source=source,
        service_name=telemetry.service_name or env.get("OTEL_SERVICE_NAME") or "tollgate",
        sample_ratio=telemetry.sample_ratio,
    )
