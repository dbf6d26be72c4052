"""SIGTERM: stop accepting, let calls and streams in flight finish within the grace period
(`server.shutdownGracePeriod`), flush the counters, exit 0."""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from harness import FakeModel, Gateway, start_gateway, stop
from redis_server import start_redis_server, stop_redis_server

KEY = "shutdown-test-key-0123456789abcdef"
CHAT_PATH = "/openai/deployments/chat-model/chat/completions"
CHUNKS = 16
CHUNK_DELAY_MS = 250  # a stream of about 4 s


def config(fake: FakeModel) -> dict[str, Any]:
    return {
        "models": {"chat-model": {"type": "chat", "endpoint": fake.endpoint("chat-model")}},
        "keys": {KEY: {"project": "shutdown", "role": "default"}},
        "roles": {"default": {"limits": {"chat-model": {"day": "1000000"}}}},
    }


def start(work_dir: Path, fake: FakeModel, usage_file: Path, grace_ms: int) -> Gateway:
    return start_gateway(
        work_dir,
        [config(fake)],
        settings={"server": {"shutdownGracePeriod": grace_ms}},
        # The same counters file across the restart.
        env={"aidial.limits.embedded.file": str(usage_file)},
    )


def requests_used(stats: dict[str, Any]) -> int:
    """Requests of the sliding hour: a test that runs across midnight keeps them."""
    used: int = stats["hourRequestStats"]["used"]
    return used


def tokens_used(stats: dict[str, Any]) -> int:
    """Tokens of whichever calendar window did not start over while the test ran (a test that
    runs across midnight finds the day's count at 0, not the week's or the month's)."""
    return max(
        int(stats[name]["used"]) for name in ("dayTokenStats", "weekTokenStats", "monthTokenStats")
    )


class SlowStream(threading.Thread):
    """A streaming call read in the background; `started` is set at its first event."""

    def __init__(self, gw: Gateway, chunks: int, chunk_delay_ms: int) -> None:
        super().__init__(daemon=True)
        self.url = gw.url + CHAT_PATH
        self.headers = {
            "Api-Key": KEY,
            "X-Fake-Chunks": str(chunks),
            "X-Fake-Chunk-Delay-Ms": str(chunk_delay_ms),
        }
        self.started = threading.Event()
        self.status: int | None = None
        self.events: list[bytes] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        body = {"messages": [{"role": "user", "content": "tell me"}], "stream": True}
        try:
            with (
                httpx.Client(timeout=60) as client,
                client.stream("POST", self.url, json=body, headers=self.headers) as response,
            ):
                self.status = response.status_code
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[6:].encode())
                        self.started.set()
        except httpx.HTTPError as error:
            self.error = error
        finally:
            self.started.set()

    def content(self) -> str:
        parts = []
        for event in self.events:
            if event == b"[DONE]":
                continue
            for choice in orjson.loads(event).get("choices", []):
                parts.append(choice.get("delta", {}).get("content") or "")
        return "".join(parts)

    def usage(self) -> dict[str, int]:
        for event in reversed(self.events):
            if event != b"[DONE]":
                usage = orjson.loads(event).get("usage")
                if usage:
                    return dict(usage)
        raise AssertionError("the stream carried no usage")


def refuses_connections(port: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        time.sleep(0.02)
    return False


def limits(gw: Gateway) -> dict[str, Any]:
    response = httpx.get(
        gw.url + "/v1/deployments/chat-model/limits", headers={"Api-Key": KEY}, timeout=15
    )
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def limits_seen_by(gw: Gateway) -> dict[str, Any]:
    """The limits a freshly started gateway reports; it is stopped afterwards."""
    try:
        return limits(gw)
    finally:
        stop(gw.process)


def test_sigterm_lets_a_stream_finish_refuses_new_connections_and_keeps_its_usage(
    work_dir: Path, fake_model: FakeModel
) -> None:
    usage_file = work_dir / "shutdown-usage.sqlite"
    gw = start(work_dir, fake_model, usage_file, grace_ms=30_000)
    try:
        stream = SlowStream(gw, CHUNKS, CHUNK_DELAY_MS)
        stream.start()
        assert stream.started.wait(15)
        gw.process.send_signal(signal.SIGTERM)
        # New connections are refused while the stream is still running.
        assert refuses_connections(gw.port, within_s=3)
        assert stream.is_alive()
        stream.join(30)
        assert not stream.is_alive()
        assert gw.process.wait(30) == 0
    finally:
        stop(gw.process)
    # The stream came through whole.
    assert stream.error is None, stream.error
    assert stream.status == 200
    assert stream.events[-1] == b"[DONE]"
    assert len(stream.content().split()) == CHUNKS
    usage = stream.usage()
    output = gw.output()
    assert "shutting down: new connections refused" in output
    assert "Traceback" not in output

    # Its usage was flushed to the counters file before the exit: a new process sees it.
    stats = limits_seen_by(start(work_dir, fake_model, usage_file, grace_ms=30_000))
    assert requests_used(stats) == 1
    assert tokens_used(stats) == usage["total_tokens"]


def test_a_stream_longer_than_the_grace_period_is_cut_and_the_call_still_counted(
    work_dir: Path, fake_model: FakeModel
) -> None:
    usage_file = work_dir / "shutdown-grace-usage.sqlite"
    gw = start(work_dir, fake_model, usage_file, grace_ms=1000)
    try:
        stream = SlowStream(gw, chunks=200, chunk_delay_ms=200)  # 40 s: past any grace
        stream.start()
        assert stream.started.wait(15)
        gw.process.send_signal(signal.SIGTERM)
        # Within the grace period and the flush, far before the stream's 40 s.
        assert gw.process.wait(30) == 0
        stream.join(30)
    finally:
        stop(gw.process)
    assert b"[DONE]" not in stream.events  # cut
    assert "Traceback" not in gw.output()

    stats = limits_seen_by(start(work_dir, fake_model, usage_file, grace_ms=30_000))
    # The call is charged (settled on the way out) with the usage the upstream had reported
    # when it was cut: none yet here, as the fake model reports usage at the end.
    assert requests_used(stats) == 1
    assert tokens_used(stats) == 0


def test_an_idle_gateway_stops_at_once_with_exit_code_0(
    work_dir: Path, fake_model: FakeModel
) -> None:
    gw = start(work_dir, fake_model, work_dir / "shutdown-idle.sqlite", grace_ms=30_000)
    try:
        # A keep-alive connection left open does not hold the shutdown for the grace period.
        with httpx.Client(base_url=gw.url, timeout=15) as client:
            assert client.get("/v1/user/info", headers={"Api-Key": KEY}).status_code == 200
            gw.process.send_signal(signal.SIGTERM)
            assert gw.process.wait(20) == 0  # well before the 30 s grace period
    finally:
        stop(gw.process)


# --- with Redis: the charges still in flight, and the replay queue ----------------------------


def start_with_redis(work_dir: Path, fake: FakeModel, redis_port: int, state_file: Path) -> Gateway:
    settings = {
        "redis": {
            "singleServerConfig": {
                "address": f"redis://127.0.0.1:{redis_port}",
                "timeout": 300,
                "connectTimeout": 300,
            }
        },
        "limits": {"onStoreFailure": "local"},
    }
    return start_gateway(
        work_dir,
        [config(fake)],
        settings=settings,
        env={"aidial.limits.embedded.file": str(state_file)},
    )


def test_sigterm_with_redis_settles_the_stream_in_redis(
    work_dir: Path, fake_model: FakeModel
) -> None:
    server = start_redis_server(work_dir)
    try:
        gw = start_with_redis(work_dir, fake_model, server.port, work_dir / "redis-a.sqlite")
        try:
            stream = SlowStream(gw, CHUNKS, CHUNK_DELAY_MS)
            stream.start()
            assert stream.started.wait(15)
            gw.process.send_signal(signal.SIGTERM)
            stream.join(30)
            assert gw.process.wait(30) == 0
        finally:
            stop(gw.process)
        assert stream.events[-1] == b"[DONE]"
        # Another instance on the same Redis sees the call and its tokens.
        stats = limits_seen_by(
            start_with_redis(work_dir, fake_model, server.port, work_dir / "redis-b.sqlite")
        )
    finally:
        stop_redis_server(server)
    assert requests_used(stats) == 1
    assert tokens_used(stats) == stream.usage()["total_tokens"]


def test_sigterm_while_redis_is_down_keeps_the_queue_for_the_next_start(
    work_dir: Path, fake_model: FakeModel
) -> None:
    state_file = work_dir / "redis-replay.sqlite"
    server = start_redis_server(work_dir)
    port = server.port
    gw = start_with_redis(work_dir, fake_model, port, state_file)
    try:
        stop_redis_server(server)  # the store goes away before the call
        stream = SlowStream(gw, 8, 100)
        stream.start()
        stream.join(30)
        assert stream.events[-1] == b"[DONE]"
        gw.process.send_signal(signal.SIGTERM)
        assert gw.process.wait(30) == 0  # within its 5 s of trying to replay
    finally:
        stop(gw.process)
    assert "limits store not up to date at shutdown" in gw.output()

    # Redis is back (empty): the next start replays what the last one counted alone.
    server = start_redis_server(work_dir, port=port)
    try:
        again = start_with_redis(work_dir, fake_model, port, state_file)
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if httpx.get(again.url + "/health").json()["limits"].get("pendingReplay") == 0:
                    break
                time.sleep(0.1)
        finally:
            stop(again.process)
        stats = limits_seen_by(
            start_with_redis(work_dir, fake_model, port, work_dir / "redis-c.sqlite")
        )
    finally:
        stop_redis_server(server)
    assert requests_used(stats) == 1
    assert tokens_used(stats) == stream.usage()["total_tokens"]
