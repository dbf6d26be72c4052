"""Static settings (`aidial.settings.json`): defaults, a settings file, `aidial.*` variables.

Assembled once at start-up, lowest to highest priority (spec auth-limits 1.1):
built-in `default_settings.json` → the file named by `AIDIAL_SETTINGS` (or `--settings`) →
environment variables prefixed `aidial.` (or the deprecated `proxy.`). Settings are never reloaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from tollgate.config.merge import deep_merge

ENV_PREFIXES = ("aidial.", "proxy.")


class SettingsError(Exception):
    """A settings source that cannot be read; the message names the source."""


@dataclass(frozen=True, slots=True)
class Settings:
    """The static settings Tollgate uses, typed; `raw` keeps the whole merged document."""

    host: str
    port: int
    config_files: tuple[str, ...]
    reload_ms: int
    overwrite_arrays: bool
    per_request_key_ttl_s: float
    proxy_count: int
    max_body_size: int
    connect_timeout_s: float
    read_timeout_s: float
    admission: str  # "dial" or "reserve" (DECISIONS 8)
    default_completion_tokens: int
    usage_file: str | None  # the embedded ledger's SQLite file; None: memory only
    usage_flush_s: float
    on_store_failure: Literal["local", "closed"]
    raw: Mapping[str, Any]
    # Hostile input and shutdown (`server.*`): see `_server_limits`.
    shutdown_grace_s: float = 30.0
    keep_alive_timeout_s: float = 75.0
    body_read_timeout_s: float = 60.0
    write_stall_timeout_s: float = 60.0
    max_header_size: int = 8190
    max_headers: int = 128
    # Telemetry (DECISIONS 12): `metrics.*` and `log.*`.
    metrics_enabled: bool = True
    metrics_host: str | None = None  # None: server.host
    metrics_port: int | None = None  # None: `/metrics` on the gateway's port, for admins only
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"
    access_log: bool = True
    # OpenTelemetry traces (`telemetry.*`, DECISIONS 12); None: off. See `_tracing`.
    tracing: TracingSettings | None = None


@dataclass(frozen=True, slots=True)
class TracingSettings:
    """Where and how spans are exported (OTLP over HTTP, protobuf)."""

    endpoint: str  # the full URL spans are posted to (`.../v1/traces`)
    source: str  # the setting or variable that turned tracing on, for messages
    service_name: str
    sample_ratio: float  # of traces started here; a caller's sampled flag is followed


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


def _get(tree: Mapping[str, Any], *path: str) -> Any:
    node: Any = tree
    for part in path:
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


def _number(tree: Mapping[str, Any], *path: str) -> float:
    value = _get(tree, *path)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise SettingsError(f"setting {'.'.join(path)}: expected a number, got {value!r}")
    try:
        return float(value)
    except ValueError as exc:
        raise SettingsError(f"setting {'.'.join(path)}: expected a number, got {value!r}") from exc


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

    files = _get(tree, "config", "files")
    if isinstance(files, str):
        files = [files]
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise SettingsError(f"setting config.files: expected a list of paths, got {files!r}")
    port = int(_number(tree, "server", "port"))
    if not 0 <= port <= 65535:
        raise SettingsError(f"setting server.port: {port} is not a TCP port")
    admission = _get(tree, "limits", "admission")
    if admission not in ("dial", "reserve"):
        raise SettingsError(
            f'setting limits.admission: expected "dial" or "reserve", got {admission!r}'
        )
    usage_file = _get(tree, "limits", "embedded", "file")
    if usage_file is not None and not isinstance(usage_file, str):
        raise SettingsError(f"setting limits.embedded.file: expected a path, got {usage_file!r}")
    on_store_failure = _get(tree, "limits", "onStoreFailure")
    if on_store_failure not in ("local", "closed"):
        raise SettingsError(
            f'setting limits.onStoreFailure: expected "local" or "closed", got {on_store_failure!r}'
        )
    reload_ms = int(_number(tree, "config", "reload"))
    if reload_ms <= 0:
        raise SettingsError("setting config.reload: must be a positive number of milliseconds")
    metrics_port = _get(tree, "metrics", "port")
    if metrics_port is not None:
        metrics_port = int(_number(tree, "metrics", "port"))
        if not 0 < metrics_port <= 65535:
            raise SettingsError(f"setting metrics.port: {metrics_port} is not a TCP port")
        if metrics_port == port:
            raise SettingsError("setting metrics.port: must differ from server.port")
    from tollgate.security.admin import AdminRules  # here: it imports this module

    AdminRules.from_settings(tree)  # a malformed rule is a settings error
    log_format = _get(tree, "log", "format")
    if log_format not in ("text", "json"):
        raise SettingsError(f'setting log.format: expected "text" or "json", got {log_format!r}')
    log_level = str(_get(tree, "log", "level")).upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise SettingsError(
            f"setting log.level: expected DEBUG, INFO, WARNING or ERROR, got {log_level!r}"
        )
    return Settings(
        host=str(_get(tree, "server", "host") or "0.0.0.0"),
        port=port,
        config_files=tuple(files),
        reload_ms=reload_ms,
        overwrite_arrays=bool(_get(tree, "config", "jsonMergeStrategy", "overwriteArrays")),
        per_request_key_ttl_s=_number(tree, "perRequestApiKey", "ttl"),
        proxy_count=int(_number(tree, "apiKeyValidation", "proxyCount")),
        max_body_size=int(_number(tree, "resources", "maxSize")),
        connect_timeout_s=_number(tree, "upstream", "connectTimeout") / 1000,
        read_timeout_s=_number(tree, "upstream", "readTimeout") / 1000,
        admission=admission,
        default_completion_tokens=int(
            _number(tree, "limits", "reserve", "defaultCompletionTokens")
        ),
        usage_file=usage_file or None,
        usage_flush_s=_number(tree, "limits", "embedded", "flushInterval") / 1000,
        on_store_failure=on_store_failure,
        raw=tree,
        **_server_limits(tree),
        metrics_enabled=_get(tree, "metrics", "enabled") is not False,
        metrics_host=_get(tree, "metrics", "host") or None,
        metrics_port=metrics_port,
        log_format=log_format,
        log_level=log_level,
        access_log=_get(tree, "log", "access") is not False,
        tracing=_tracing(tree, env),
    )


def _server_limits(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Connection hygiene (`server.*`): how long a shutdown waits for calls in flight, how long
    an idle connection or a request body may take, how long a client may take none of a
    streamed answer, and how large request headers may be."""
    limits: dict[str, Any] = {}
    for field, name, scale in (
        ("shutdown_grace_s", "shutdownGracePeriod", 1000),
        ("keep_alive_timeout_s", "keepAliveTimeout", 1000),
        ("body_read_timeout_s", "bodyReadTimeout", 1000),
        ("write_stall_timeout_s", "writeStallTimeout", 1000),
        ("max_header_size", "maxHeaderSize", 0),
        ("max_headers", "maxHeaders", 0),
    ):
        value = _number(tree, "server", name)
        if value <= 0:
            raise SettingsError(f"setting server.{name}: must be a positive number")
        limits[field] = value / scale if scale else int(value)
    return limits


# OpenTelemetry's own variables (its SDK configuration spec), honoured as operators expect.
OTEL_TRACES_ENDPOINT = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"  # a full URL, used as it is
OTEL_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"  # a base URL: `/v1/traces` is appended
TRACES_PATH = "/v1/traces"


def _tracing(tree: Mapping[str, Any], env: Mapping[str, str]) -> TracingSettings | None:
    """Tracing is on when `telemetry.otlp.endpoint` names a collector, or else when one of
    OpenTelemetry's endpoint variables is set (unless `OTEL_TRACES_EXPORTER=none`);
    `OTEL_SDK_DISABLED=true` turns it off in every case, as it does any OpenTelemetry SDK. The
    setting is a base URL, like the variable `OTEL_EXPORTER_OTLP_ENDPOINT`: spans go to
    `<endpoint>/v1/traces`."""
    ratio = _number(tree, "telemetry", "sampleRatio")
    if not 0 <= ratio <= 1:
        raise SettingsError("setting telemetry.sampleRatio: must be between 0 and 1")
    name = _get(tree, "telemetry", "serviceName")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise SettingsError(f"setting telemetry.serviceName: expected a name, got {name!r}")
    endpoint = _get(tree, "telemetry", "otlp", "endpoint")
    if endpoint is not None and not isinstance(endpoint, str):
        raise SettingsError(f"setting telemetry.otlp.endpoint: expected a URL, got {endpoint!r}")
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
        raise SettingsError(f"setting {source}: expected an http:// or https:// URL")
    if source != OTEL_TRACES_ENDPOINT and not endpoint.rstrip("/").endswith(TRACES_PATH):
        endpoint = endpoint.rstrip("/") + TRACES_PATH
    return TracingSettings(
        endpoint=endpoint,
        source=source,
        service_name=name or env.get("OTEL_SERVICE_NAME") or "tollgate",
        sample_ratio=ratio,
    )
