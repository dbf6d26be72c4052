"""Tests of the fake model server, run as a real subprocess and spoken to over HTTP."""

from __future__ import annotations

import base64
import json
import os
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
CHAT = "/openai/deployments/gpt-fake/chat/completions"
READY_PREFIX = "fake model listening on http://"


def _start(*extra: str) -> tuple[subprocess.Popen[str], str]:
    """Start the fake model on a port the OS picks and wait for its ready line."""
    env = dict(os.environ)
    # Works whether or not the package is installed in the interpreter running the tests.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tollgate.fake_model", "--port", "0", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            if line.startswith(READY_PREFIX):
                return proc, line[line.index("http://") :].strip()
            if not line and proc.poll() is not None:
                break
    _stop(proc)
    stderr = proc.stderr.read() if proc.stderr else ""
    raise RuntimeError(f"fake model did not start: {stderr}")


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[subprocess.Popen[str], str]]:
    proc, url = _start()
    try:
        yield proc, url
    finally:
        _stop(proc)


@pytest.fixture
def base_url(server: tuple[subprocess.Popen[str], str]) -> str:
    return server[1]


@pytest.fixture
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=10) as c:
        yield c


def _events(lines: list[str]) -> list[str]:
    return [line[len("data: ") :] for line in lines if line.startswith("data: ")]


def _chat_body(*contents: str, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": c} for c in contents], **extra}


def test_ready_line_and_health(base_url: str, client: httpx.Client) -> None:
    assert base_url.startswith("http://127.0.0.1:")
    resp = client.get("/health")
    assert resp.status_code == 200
    assert resp.text == "ok"


def test_chat_non_streaming_default(client: httpx.Client) -> None:
    resp = client.post(CHAT, json=_chat_body("one two three", "four five"))
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/json")
    data = resp.json()
    assert data["object"] == "chat.completion"
    assert data["id"]
    assert isinstance(data["created"], int)
    assert data["model"] == "gpt-fake"  # the deployment id, as the body names no model
    choice = data["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Hello from the fake model."}
    assert choice["finish_reason"] == "stop"
    assert data["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 5,
        "total_tokens": 10,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def test_chat_reply_header_and_model_from_body(client: httpx.Client) -> None:
    body = _chat_body("a b", model="my-model")
    resp = client.post("/v1/chat/completions", json=body, headers={"X-Fake-Reply": "x y z"})
    data = resp.json()
    assert data["model"] == "my-model"
    assert data["choices"][0]["message"]["content"] == "x y z"
    assert data["usage"]["prompt_tokens"] == 2
    assert data["usage"]["completion_tokens"] == 3
    assert data["usage"]["total_tokens"] == 5


def test_chat_prompt_tokens_minimum_and_multipart(client: httpx.Client) -> None:
    resp = client.post(CHAT, json={"messages": [{"role": "user", "content": ""}]})
    assert resp.json()["usage"]["prompt_tokens"] == 1
    parts = [{"type": "text", "text": "one two"}, {"type": "image_url", "image_url": {}}]
    resp = client.post(CHAT, json={"messages": [{"role": "user", "content": parts}]})
    assert resp.json()["usage"]["prompt_tokens"] == 2


def test_repeated_requests_are_answered_consistently(client: httpx.Client) -> None:
    # The fast path caches answers by request; different prompts must not share one.
    first = client.post(CHAT, json=_chat_body("one")).json()
    again = client.post(CHAT, json=_chat_body("one")).json()
    other = client.post(CHAT, json=_chat_body("one two three")).json()
    assert first["usage"]["prompt_tokens"] == again["usage"]["prompt_tokens"] == 1
    assert other["usage"]["prompt_tokens"] == 3
    other_path = client.post("/openai/deployments/b/chat/completions", json=_chat_body("one"))
    assert other_path.json()["model"] == "b"


def test_chat_streaming(client: httpx.Client) -> None:
    body = _chat_body("hi there", stream=True)
    with client.stream("POST", CHAT, json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = list(resp.iter_lines())
    events = _events(lines)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content_chunks = chunks[1:-1]
    assert len(content_chunks) == 5  # one per word of the default reply
    text = "".join(c["choices"][0]["delta"]["content"] for c in content_chunks)
    assert text == "Hello from the fake model."
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    final = chunks[-1]
    assert final["choices"][0]["finish_reason"] == "stop"
    assert final["usage"]["prompt_tokens"] == 2
    assert final["usage"]["completion_tokens"] == 5
    assert final["usage"]["total_tokens"] == 7
    assert "usage" not in content_chunks[0]


def test_stream_events_arrive_separately(client: httpx.Client) -> None:
    headers = {"X-Fake-Chunk-Delay-Ms": "150", "X-Fake-Reply": "a b c"}
    arrivals: list[float] = []
    start = time.monotonic()
    with client.stream("POST", CHAT, json=_chat_body("x", stream=True), headers=headers) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic() - start)
    assert len(arrivals) == 6  # role, three words, final, [DONE]
    # The first event came long before the last: the body was streamed, not buffered.
    assert arrivals[-1] - arrivals[0] >= 0.5


def test_stream_chunk_count_and_no_usage(client: httpx.Client) -> None:
    headers = {"X-Fake-Chunks": "12", "X-Fake-No-Usage": "1"}
    with client.stream("POST", CHAT, json=_chat_body("x", stream=True), headers=headers) as resp:
        events = _events(list(resp.iter_lines()))
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) == 1 + 12 + 1
    assert all("usage" not in c for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert len(text.split()) == 12
    non_stream = client.post(CHAT, json=_chat_body("x"), headers={"X-Fake-Chunks": "7"}).json()
    assert non_stream["usage"]["completion_tokens"] == 7
    assert len(non_stream["choices"][0]["message"]["content"].split()) == 7


def test_stream_drop_after(client: httpx.Client) -> None:
    headers = {"X-Fake-Drop-After": "2", "X-Fake-Chunk-Delay-Ms": "20"}
    lines: list[str] = []
    with (
        pytest.raises(httpx.RemoteProtocolError),
        client.stream("POST", CHAT, json=_chat_body("x", stream=True), headers=headers) as resp,
    ):
        for line in resp.iter_lines():
            lines.append(line)
    events = _events(lines)
    assert "[DONE]" not in events
    chunks = [json.loads(e) for e in events]
    assert len(chunks) == 3  # role + two content chunks
    assert all("usage" not in c for c in chunks)
    # The server survives the abrupt close.
    assert client.get("/health").status_code == 200


def test_fake_status(client: httpx.Client) -> None:
    for path in (CHAT, "/v1/embeddings", "/v1/completions"):
        resp = client.post(path, json={}, headers={"X-Fake-Status": "503"})
        assert resp.status_code == 503
        assert resp.json() == {"error": {"message": "fake failure", "code": "503"}}
    resp = client.post(CHAT, json=_chat_body("x", stream=True), headers={"X-Fake-Status": "429"})
    assert resp.status_code == 429
    assert resp.json()["error"]["code"] == "429"


def test_fake_delay(client: httpx.Client) -> None:
    start = time.monotonic()
    resp = client.post(CHAT, json=_chat_body("x"), headers={"X-Fake-Delay-Ms": "300"})
    assert resp.status_code == 200
    assert time.monotonic() - start >= 0.29


def test_bad_requests(client: httpx.Client) -> None:
    resp = client.post(CHAT, content=b"{not json", headers={"Content-Type": "application/json"})
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "400"
    resp = client.post(CHAT, json=_chat_body("x"), headers={"X-Fake-Status": "abc"})
    assert resp.status_code == 400


def test_unknown_path(client: httpx.Client) -> None:
    resp = client.post("/v1/models/whatever", json={})
    assert resp.status_code == 404
    assert resp.json() == {"error": {"message": "fake model: unknown path", "code": "404"}}


def test_embeddings(client: httpx.Client) -> None:
    resp = client.post("/openai/deployments/emb/embeddings", json={"input": "one two three"})
    data = resp.json()
    assert data["object"] == "list"
    assert data["model"] == "emb"
    assert len(data["data"]) == 1
    item = data["data"][0]
    assert item["object"] == "embedding"
    assert item["index"] == 0
    assert len(item["embedding"]) == 8
    assert all(isinstance(v, float) for v in item["embedding"])
    assert data["usage"] == {"prompt_tokens": 3, "total_tokens": 3}

    resp = client.post("/v1/embeddings", json={"input": ["a", "b c", "a"], "model": "m"})
    data = resp.json()
    assert [d["index"] for d in data["data"]] == [0, 1, 2]
    assert data["data"][0]["embedding"] == data["data"][2]["embedding"]  # deterministic
    assert data["data"][0]["embedding"] != data["data"][1]["embedding"]
    assert data["usage"]["prompt_tokens"] == 4  # words over all inputs


def test_embeddings_base64(client: httpx.Client) -> None:
    body = {"input": "a", "encoding_format": "base64"}
    encoded = client.post("/v1/embeddings", json=body).json()["data"][0]["embedding"]
    plain = client.post("/v1/embeddings", json={"input": "a"}).json()["data"][0]["embedding"]
    decoded = struct.unpack("<8f", base64.b64decode(encoded))
    assert decoded == pytest.approx(plain, abs=1e-6)


def test_legacy_completions(client: httpx.Client) -> None:
    resp = client.post("/v1/completions", json={"model": "c", "prompt": "one two"})
    data = resp.json()
    assert data["object"] == "text_completion"
    assert data["choices"][0]["text"] == "Hello from the fake model."
    assert data["usage"]["prompt_tokens"] == 2
    assert data["usage"]["completion_tokens"] == 5
    body = {"prompt": "x", "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as resp:
        events = _events(list(resp.iter_lines()))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Hello from the fake model."
    assert chunks[-1]["usage"]["total_tokens"] == 6


def test_recording(client: httpx.Client) -> None:
    assert client.delete("/_fake/requests").status_code == 204
    assert client.get("/_fake/requests").json() == []
    headers = {"X-Trace": "first", "x-trace": "second", "Api-Key": "k"}
    body = json.dumps(_chat_body("hello")).encode()
    resp = client.post(
        CHAT + "?api-version=2024-02-01",
        content=body,
        headers=[*headers.items(), ("Content-Type", "application/json")],
    )
    assert resp.status_code == 200
    client.get("/health")  # control endpoints are not recorded
    records = client.get("/_fake/requests").json()
    assert len(records) == 1
    rec = records[0]
    assert rec["method"] == "POST"
    assert rec["path"] == CHAT
    assert rec["query_string"] == "api-version=2024-02-01"
    assert rec["body"] == body.decode()
    names = [name for name, _ in rec["headers"]]
    # Order and spelling are kept as sent, repeated headers included.
    assert names.index("X-Trace") < names.index("x-trace") < names.index("Api-Key")
    assert ["Api-Key", "k"] in rec["headers"]
    assert isinstance(rec["client_port"], int)


def test_faults(client: httpx.Client) -> None:
    def add(**fault: Any) -> httpx.Response:
        return client.post("/_fake/faults", json=fault)

    assert add(upstream="http://a", status=429, retryAfter=7, times=2).status_code == 204
    assert add(status=503, bodyDelayMs=50).status_code == 204
    through_a = {"X-UPSTREAM-ENDPOINT": "http://a"}
    for _ in range(2):  # the first matching fault applies, as often as `times` says
        resp = client.post(CHAT, json=_chat_body("x"), headers=through_a)
        assert resp.status_code == 429 and resp.headers["Retry-After"] == "7"
        assert resp.json() == {"error": {"message": "fake fault", "code": "429"}}
    assert client.post(CHAT, json=_chat_body("x"), headers=through_a).status_code == 503
    assert client.post(CHAT, json=_chat_body("x")).status_code == 503
    assert client.delete("/_fake/faults").status_code == 204
    assert client.post(CHAT, json=_chat_body("x"), headers=through_a).status_code == 200

    assert add(disconnect=True, times=1).status_code == 204
    with pytest.raises(httpx.RemoteProtocolError):
        client.post(CHAT, json=_chat_body("x"))
    assert add(delayMs=300, times=1).status_code == 204
    start = time.monotonic()
    assert client.post(CHAT, json=_chat_body("x")).json()["object"] == "chat.completion"
    assert time.monotonic() - start >= 0.29
    for bad in ({"status": 42}, {"times": 0}, {"colour": "red"}, [1]):
        resp = client.post("/_fake/faults", json=bad)
        assert resp.status_code == 400
    assert client.post(CHAT, json=_chat_body("x")).status_code == 200


def test_recording_keeps_last_200(client: httpx.Client) -> None:
    client.delete("/_fake/requests")
    for i in range(205):
        client.post(f"/v1/chat/completions?n={i}", json=_chat_body("x"))
    records = client.get("/_fake/requests").json()
    assert len(records) == 200
    assert records[0]["query_string"] == "n=5"
    assert records[-1]["query_string"] == "n=204"


def test_openai_client_compat(base_url: str) -> None:
    openai = pytest.importorskip("openai")
    oa = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    completion = oa.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "one two"}]
    )
    assert completion.choices[0].message.content == "Hello from the fake model."
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 2
    stream = oa.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}], stream=True
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == "Hello from the fake model."
    emb = oa.embeddings.create(model="e", input=["a", "b"])
    assert [len(d.embedding) for d in emb.data] == [8, 8]
    with pytest.raises(openai.RateLimitError):
        oa.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"X-Fake-Status": "429"},
        )


def test_no_record_and_clean_shutdown() -> None:
    proc, url = _start("--no-record")
    try:
        with httpx.Client(base_url=url, timeout=10) as c:
            c.post(CHAT, json=_chat_body("x"))
            assert c.get("/_fake/requests").json() == []
    finally:
        _stop(proc)
    assert proc.returncode == 0
