"""Secrets never reach the logs, the metrics or an answer: every credential through every
endpoint, then a search (DECISIONS 11)."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import signal
import socket
import threading
from pathlib import Path
from typing import Any

import httpx

from gateway_config import (
    DEFAULT_KEY,
    HASHED_SECRET,
    IP_KEY,
    POWER_KEY,
    PROVIDER_SECRET,
    chat,
    key_headers,
    main_config,
)
from harness import FakeModel, eventually, free_port, start_gateway, stop, write_json
from redis_server import start_redis_server, stop_redis_server

PATHS = [
    ("GET", "/v1/user/info"),
    ("GET", "/openai/models"),
    ("GET", "/openai/models/power-model"),
    ("GET", "/openai/applications/chat-model"),
    ("GET", "/v1/deployments"),
    ("GET", "/nowhere"),
    ("POST", "/openai/deployments/chat-model/chat/completions"),
    ("POST", "/openai/deployments/power-model/chat/completions"),
    ("POST", "/openai/deployments/dead-model/chat/completions"),
    ("POST", "/openai/deployments/missing/chat/completions"),
]


def test_no_secret_in_logs(work_dir: Path, fake_model: FakeModel) -> None:
    config = main_config(fake_model)
    path = write_json(work_dir / "secrets.json", config)
    gw = start_gateway(work_dir, [path], log_level="DEBUG")
    wrong = "wrong-key-that-is-not-configured"
    credentials = [DEFAULT_KEY, POWER_KEY, HASHED_SECRET, IP_KEY, wrong]
    try:
        with httpx.Client(base_url=gw.url, timeout=30) as client:
            for key in credentials:
                header_sets = [
                    {"Api-Key": key},
                    {"Authorization": f"Bearer {key}"},
                    {"x-api-key": key},
                    {"Api-Key": key, "Authorization": "Bearer other-token-xyz"},
                    {"Authorization": f"Basic {key}"},
                ]
                for headers in header_sets:
                    for method, url in PATHS:
                        body = chat(stream=True) if method == "POST" else None
                        client.request(method, url, headers=headers, json=body)
            # A broken reload logs its problems; the key names in it must stay hidden.
            config["keys"][DEFAULT_KEY] = {"role": "no-project"}
            write_json(path, config)
            gw.process.send_signal(signal.SIGHUP)
            eventually(lambda: "Failed to reload config" in gw.output())
    finally:
        stop(gw.process)

    log = gw.output()
    assert "call project=" in log  # the DEBUG access lines were written...
    secrets = [*credentials, PROVIDER_SECRET, "second-secret", "other-token-xyz"]
    for secret in secrets:  # ...and name keys only by fingerprint
        assert secret not in log, f"a secret leaked into the log: {secret[:6]}..."
    # Not even the full digest, which a `sha256:` config entry would accept.
    for secret in credentials:
        assert hashlib.sha256(secret.encode()).hexdigest() not in log


# --- every credential through every endpoint, then logs, metrics and answers searched ----------

ADMIN_KEY = "secret-admin-key-0123456789abcdef"
ADDON_TOKEN = "addon-token-secret-0123456789abcdef"
REDIS_PASSWORD = "redis-password-secret-0123456789"
WRONG_KEY = "wrong-key-that-is-not-configured-0123"
UPSTREAM_KEYS = [PROVIDER_SECRET, "second-secret"]

ENDPOINTS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/health", None),
    ("GET", "/version", None),
    ("GET", "/openapi.json", None),
    ("GET", "/metrics", None),
    ("GET", "/v1/user/info", None),
    ("GET", "/v1/user/limits", None),
    ("GET", "/v1/user/usage", None),
    ("GET", "/openai/models", None),
    ("GET", "/openai/models/chat-model", None),
    ("GET", "/openai/deployments", None),
    ("GET", "/openai/deployments/chat-model", None),
    ("GET", "/openai/applications", None),
    ("GET", "/openai/applications/echo-app", None),
    ("GET", "/openai/assistants", None),
    ("GET", "/openai/addons", None),
    ("GET", "/v1/deployments", None),
    ("GET", "/v1/deployments/chat-model", None),
    ("GET", "/v1/deployments/chat-model/limits", None),
    ("GET", "/v1/deployments/chat-model/configuration", None),
    ("GET", "/nowhere", None),
    ("OPTIONS", "/openai/models", None),
    ("POST", "/openai/deployments/chat-model/chat/completions", chat()),
    ("POST", "/openai/deployments/chat-model/chat/completions", chat(stream=True)),
    ("POST", "/openai/deployments/embedding-model/embeddings", {"input": "hi"}),
    ("POST", "/openai/deployments/power-model/chat/completions", chat()),
    ("POST", "/openai/deployments/auth-model/chat/completions", chat()),
    ("POST", "/openai/deployments/dead-model/chat/completions", chat()),
    ("POST", "/openai/deployments/missing/chat/completions", chat()),
    ("POST", "/openai/deployments/echo-app/chat/completions", chat()),
    ("POST", "/openai/deployments/helper-assistant/chat/completions", chat(model="chat-model")),
    ("POST", "/v1/chat-model/rate", {"responseId": "r", "rate": True}),
    ("POST", "/v1/deployments/chat-model/tokenize", {"inputs": []}),
    ("POST", "/v1/deployments/chat-model/truncate_prompt", {"inputs": []}),
    ("POST", "/v1/ops/config/reload", None),
]


def header_sets(key: str) -> list[dict[str, str]]:
    return [
        {"Api-Key": key},
        {"Authorization": f"Bearer {key}"},
        {"x-api-key": key},
        {"Api-Key": key, "Authorization": "Bearer other-token-xyz"},
        {"Authorization": f"Basic {key}"},
    ]


def everywhere_config(fake: FakeModel) -> dict[str, Any]:
    config = main_config(fake)
    config["keys"][ADMIN_KEY] = {"project": "proj-admin", "roles": ["admin"]}
    config["addons"]["search-addon"]["token"] = ADDON_TOKEN
    return config


def exercise(
    client: httpx.Client, keys: list[str], answers: list[bytes], endpoints: Any = None
) -> None:
    for key in keys:
        for headers in header_sets(key):
            for method, url, body in endpoints or ENDPOINTS:
                response = client.request(method, url, headers=headers, json=body)
                answers.append(response.content)
                answers.append(repr(dict(response.headers)).encode())


def oversized_header_requests(port: int, secrets: list[str]) -> None:
    """aiohttp refuses these itself; its own log message would quote the header's first bytes."""
    for secret in secrets:
        for line in (f"Api-Key: {secret}", f"Authorization: Bearer {secret}"):
            head = f"GET /v1/user/info HTTP/1.1\r\nHost: x\r\n{line}{'z' * 9000}\r\n\r\n"
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(head.encode())
                sock.settimeout(10)
                with contextlib.suppress(OSError):
                    while sock.recv(65536):
                        pass


def in_flight_per_request_key(
    client: httpx.Client, fake: FakeModel
) -> tuple[str, threading.Thread]:
    """A slow stream in the background; the per-request key its hop got, read at the upstream."""
    fake.clear()
    headers = key_headers(DEFAULT_KEY) | {
        "X-Fake-Chunks": "40",
        "X-Fake-Chunk-Delay-Ms": "250",
    }

    def run() -> None:
        with client.stream(
            "POST",
            "/openai/deployments/chat-model/chat/completions",
            headers=headers,
            json=chat(stream=True),
        ) as response:
            for _ in response.iter_bytes():
                pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    eventually(lambda: bool(fake.requests()))
    recorded = {k.lower(): v for k, v in fake.last()["headers"]}
    return recorded["api-key"], thread


def metrics_text(port: int) -> str | None:
    """The separate metrics port's `/metrics`, when this Tollgate has metrics."""
    if importlib.util.find_spec("tollgate.observability.metrics") is None:
        return None
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert response.status_code == 200
    return response.text


def assert_nothing_leaked(texts: dict[str, str], secrets: list[str]) -> None:
    for where, text in texts.items():
        for secret in secrets:
            assert secret not in text, f"a secret leaked into {where}: {secret[:6]}..."
            # Not even the full digest, which a `sha256:` config entry would accept.
            digest = hashlib.sha256(secret.encode()).hexdigest()
            assert digest not in text, f"a secret's SHA-256 leaked into {where}: {secret[:6]}..."


def test_every_credential_through_every_endpoint_leaks_nowhere(
    work_dir: Path, fake_model: FakeModel
) -> None:
    metrics_port = free_port()
    gw = start_gateway(
        work_dir,
        [everywhere_config(fake_model)],
        settings={"metrics": {"port": metrics_port, "host": "127.0.0.1"}},
        log_level="DEBUG",
    )
    keys = [DEFAULT_KEY, POWER_KEY, HASHED_SECRET, IP_KEY, ADMIN_KEY, WRONG_KEY]
    answers: list[bytes] = []
    try:
        with httpx.Client(base_url=gw.url, timeout=30) as client:
            exercise(client, keys, answers)
            # A per-request key, used while its hop is alive, and again after it died.
            per_request_key, stream = in_flight_per_request_key(client, fake_model)
            exercise(client, [per_request_key], answers)
            stream.join(30)
            exercise(client, [per_request_key], answers, ENDPOINTS[4:8])
        oversized_header_requests(gw.port, [*keys, per_request_key])
        metrics = metrics_text(metrics_port)
    finally:
        stop(gw.process)

    log = gw.output()
    assert "call project=" in log or '"project"' in log  # the DEBUG access lines were written
    secrets = [*keys, per_request_key, *UPSTREAM_KEYS, ADDON_TOKEN, "other-token-xyz"]
    texts = {"the log": log, "the answers": b"\n".join(answers).decode("utf-8", "replace")}
    if metrics is not None:
        assert "tollgate" in metrics
        texts["the metrics"] = metrics
    assert_nothing_leaked(texts, secrets)


def test_the_redis_password_leaks_nowhere(work_dir: Path, fake_model: FakeModel) -> None:
    server = start_redis_server(work_dir, password=REDIS_PASSWORD)
    metrics_port = free_port()
    settings = {
        "redis": {
            "singleServerConfig": {
                "address": f"redis://127.0.0.1:{server.port}",
                "password": REDIS_PASSWORD,
                "timeout": 300,
                "connectTimeout": 300,
            }
        },
        "metrics": {"port": metrics_port, "host": "127.0.0.1"},
        "log": {"format": "json"},  # the other format, JSON lines with their own fields
    }
    gw = start_gateway(
        work_dir, [everywhere_config(fake_model)], settings=settings, log_level="DEBUG"
    )
    answers: list[bytes] = []
    try:
        with httpx.Client(base_url=gw.url, timeout=30) as client:
            exercise(client, [DEFAULT_KEY], answers, ENDPOINTS[:25])
            stop_redis_server(server)  # the store fails: errors are logged
            exercise(client, [DEFAULT_KEY], answers, ENDPOINTS[:25])
            eventually(lambda: client.get("/health").json()["status"] == "degraded")
        metrics = metrics_text(metrics_port)
    finally:
        stop(gw.process)
        stop_redis_server(server)
    log = gw.output()
    assert '"logger":"tollgate.access"' in log.replace(" ", "")  # JSON access lines written
    assert "unreachable" in log  # the store failure was logged
    texts = {"the log": log, "the answers": b"\n".join(answers).decode()}
    if metrics is not None:
        texts["the metrics"] = metrics
    assert_nothing_leaked(texts, [REDIS_PASSWORD, DEFAULT_KEY])
