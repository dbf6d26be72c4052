"""Config reload: on a timer and on SIGHUP; a broken file keeps the previous config serving."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from harness import FakeModel, start_gateway, stop, write_json


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def status(url: str, key: str) -> int:
    return httpx.get(f"{url}/v1/user/info", headers={"Api-Key": key}).status_code


def config_with(key: str, fake: FakeModel) -> dict[str, object]:
    return {
        "models": {"m": {"endpoint": fake.endpoint("m")}},
        "keys": {key: {"project": "p", "role": "r"}},
    }


def test_periodic_reload_and_broken_files(work_dir: Path, fake_model: FakeModel) -> None:
    path = write_json(work_dir / "reloading.json", config_with("first-key-123", fake_model))
    gw = start_gateway(work_dir, [path], env={"aidial.config.reload": "100"})
    try:
        assert status(gw.url, "first-key-123") == 200

        write_json(path, config_with("second-key-123", fake_model))
        eventually(lambda: status(gw.url, "second-key-123") == 200)
        assert status(gw.url, "first-key-123") == 401  # old keys stop working at once

        # Broken JSON: the previous config keeps serving, and the log says why.
        path.write_text('{"keys": {')
        eventually(lambda: "Failed to reload config" in gw.output())
        assert status(gw.url, "second-key-123") == 200

        # Valid JSON, invalid config: nothing of it is applied.
        broken = config_with("third-key-123", fake_model)
        broken["keys"] = {"third-key-123": {"project": "p"}, "fourth-key-123": {"role": "r"}}
        write_json(path, broken)
        eventually(lambda: "Invalid key: at least one role must be assigned" in gw.output())
        assert status(gw.url, "third-key-123") == 401
        assert status(gw.url, "second-key-123") == 200
        assert gw.process.poll() is None

        # Secrets never reach the log, not even from a broken file.
        assert "third-key-123" not in gw.output() and "fourth-key-123" not in gw.output()
    finally:
        stop(gw.process)


def test_sighup_reloads(work_dir: Path, fake_model: FakeModel) -> None:
    path = write_json(work_dir / "hup.json", config_with("hup-one-123", fake_model))
    gw = start_gateway(work_dir, [path])  # default period: a minute
    try:
        path.write_text(json.dumps(config_with("hup-two-123", fake_model)))
        gw.process.send_signal(signal.SIGHUP)
        eventually(lambda: status(gw.url, "hup-two-123") == 200, timeout=5)
        assert status(gw.url, "hup-one-123") == 401
    finally:
        stop(gw.process)


def test_in_flight_stream_keeps_its_config(work_dir: Path, fake_model: FakeModel) -> None:
    path = write_json(work_dir / "flight.json", config_with("flight-key-123", fake_model))
    gw = start_gateway(work_dir, [path], env={"aidial.config.reload": "100"})
    try:
        headers = {
            "Api-Key": "flight-key-123",
            "Content-Type": "application/json",
            "X-Fake-Chunks": "5",
            "X-Fake-Chunk-Delay-Ms": "200",
        }
        body = {"stream": True, "messages": [{"role": "user", "content": "hi"}]}
        with httpx.stream(
            "POST", f"{gw.url}/openai/deployments/m/chat/completions", headers=headers, json=body
        ) as stream:
            chunks = stream.iter_raw()
            next(chunks)
            write_json(path, config_with("other-key-123", fake_model))
            eventually(lambda: status(gw.url, "other-key-123") == 200)
            assert b"[DONE]" in b"".join(chunks)
    finally:
        stop(gw.process)
