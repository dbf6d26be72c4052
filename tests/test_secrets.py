"""Secrets never reach the logs: every credential through every endpoint, then a search."""

from __future__ import annotations

import hashlib
import signal
from pathlib import Path

import httpx

from conftest import (
    DEFAULT_KEY,
    HASHED_SECRET,
    IP_KEY,
    POWER_KEY,
    PROVIDER_SECRET,
    chat,
    main_config,
)
from harness import FakeModel, start_gateway, stop, write_json
from test_reload import eventually

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
