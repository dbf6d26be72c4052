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
    import openai

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


# --- Usage as OpenAI reports it, or never ------------------------------------------------------

RESPONSES = "/openai/v1/responses"
MESSAGES = "/anthropic/v1/messages"
_JSON_CT = "application/json"


def _stream_chunks(
    client: httpx.Client, path: str, body: dict[str, Any], headers: dict[str, str]
) -> list[str]:
    with client.stream("POST", path, json=body, headers=headers) as resp:
        assert resp.status_code == 200
        return _events(list(resp.iter_lines()))


def _named_events(client: httpx.Client, path: str, body: Any, **kw: Any) -> list[tuple[str, Any]]:
    """(event name, data) of an SSE stream with `event:` lines; checks the framing."""
    with client.stream("POST", path, json=body, **kw) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    return _parse_named(raw)


def _parse_named(raw: str) -> list[tuple[str, Any]]:
    assert raw.endswith("\n\n")
    out: list[tuple[str, Any]] = []
    for block in raw[:-2].split("\n\n"):
        name_line, data_line = block.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: ")
        data = json.loads(data_line[len("data: ") :])
        assert data["type"] == name_line[len("event: ") :]  # the name repeats the type
        out.append((data["type"], data))
    return out


@pytest.mark.parametrize(
    ("path", "body"),
    [(CHAT, _chat_body("one two", stream=True)), ("/v1/completions", {"prompt": "one two"})],
)
def test_usage_on_request_is_absent_unless_asked(
    client: httpx.Client, path: str, body: dict[str, Any]
) -> None:
    body = {**body, "stream": True}
    headers = {"X-Fake-Usage": "on-request"}
    events = _stream_chunks(client, path, body, headers)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) == 1 + 5 + 1  # role (or empty first) event, five words, finish
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    # A plain answer has usage whatever the mode, as OpenAI's does.
    plain = client.post(path, json={**body, "stream": False}, headers=headers).json()
    assert plain["usage"]["total_tokens"] == 7


@pytest.mark.parametrize(
    ("path", "body"),
    [(CHAT, _chat_body("one two", stream=True)), ("/v1/completions", {"prompt": "one two"})],
)
def test_usage_on_request_as_openai_sends_it(
    client: httpx.Client, path: str, body: dict[str, Any]
) -> None:
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    events = _stream_chunks(client, path, body, {"X-Fake-Usage": "on-request"})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) == 1 + 5 + 1 + 1
    *with_choices, usage_chunk = chunks
    assert all(c["usage"] is None and len(c["choices"]) == 1 for c in with_choices)
    assert with_choices[-1]["choices"][0]["finish_reason"] == "stop"
    assert usage_chunk["choices"] == []
    assert usage_chunk["id"] == with_choices[0]["id"]
    assert usage_chunk["usage"]["prompt_tokens"] == 2
    assert usage_chunk["usage"]["completion_tokens"] == 5
    assert usage_chunk["usage"]["total_tokens"] == 7
    # The default mode keeps today's shape even when asked: usage in the finish event.
    events = _stream_chunks(client, path, body, {"X-Fake-Usage": "always"})
    final = json.loads(events[-2])
    assert final["choices"][0]["finish_reason"] == "stop"
    assert final["usage"]["total_tokens"] == 7


def test_usage_never_in_any_api(client: httpx.Client) -> None:
    never = {"X-Fake-Usage": "never"}
    for path, body in (
        (CHAT, _chat_body("x")),
        ("/v1/completions", {"prompt": "x"}),
        ("/v1/embeddings", {"input": "x"}),
        (MESSAGES, {"model": "c", "max_tokens": 9, "messages": [{"role": "user", "content": "x"}]}),
    ):
        data = client.post(path, json=body, headers=never).json()
        assert "usage" not in data, path
        assert client.post(path, json=body).json()["usage"], path  # and with usage by default
    assert client.post(RESPONSES, json={"input": "x"}, headers=never).json()["usage"] is None
    stream_options = {"include_usage": True}
    for path, body in (
        (CHAT, _chat_body("x", stream=True, stream_options=stream_options)),
        ("/v1/completions", {"prompt": "x", "stream": True, "stream_options": stream_options}),
    ):
        chunks = [json.loads(e) for e in _stream_chunks(client, path, body, never)[:-1]]
        assert len(chunks) == 7 and all("usage" not in c for c in chunks)
    events = _named_events(client, RESPONSES, {"input": "x", "stream": True}, headers=never)
    assert events[-1][0] == "response.completed"
    assert all(data.get("response", {}).get("usage") is None for _, data in events)
    body = {"model": "c", "max_tokens": 9, "stream": True, "messages": []}
    events = _named_events(client, MESSAGES, body, headers=never)
    assert [name for name, _ in events][-2:] == ["message_delta", "message_stop"]
    assert "usage" not in events[0][1]["message"] and "usage" not in events[-2][1]
    resp = client.post(CHAT, json=_chat_body("x"), headers={"X-Fake-Usage": "sometimes"})
    assert resp.status_code == 400


def test_request_log_shows_stream_options(client: httpx.Client) -> None:
    client.delete("/_fake/requests")
    body = _chat_body("x", stream=True, stream_options={"include_usage": True})
    _stream_chunks(client, CHAT, body, {"X-Fake-Usage": "on-request"})
    assert json.loads(client.get("/_fake/requests").json()[-1]["body"]) == body


def test_server_wide_usage_mode() -> None:
    proc, url = _start("--usage", "on-request")
    try:
        with httpx.Client(base_url=url, timeout=10) as c:
            plain = _stream_chunks(c, CHAT, _chat_body("x", stream=True), {})
            assert all("usage" not in json.loads(e) for e in plain[:-1])
            asked = _chat_body("x", stream=True, stream_options={"include_usage": True})
            last = json.loads(_stream_chunks(c, CHAT, asked, {})[-2])
            assert last["choices"] == [] and last["usage"]["total_tokens"] == 6
            # A request's header still rules over the server's mode.
            always = _stream_chunks(
                c, CHAT, _chat_body("x", stream=True), {"X-Fake-Usage": "always"}
            )
            assert json.loads(always[-2])["usage"]["total_tokens"] == 6
    finally:
        _stop(proc)


def test_build_app_refuses_an_unknown_usage_mode() -> None:
    from tollgate import fake_model

    with pytest.raises(ValueError):
        fake_model.build_app(usage="sometimes")  # type: ignore[arg-type]


def test_cached_and_reasoning_tokens_in_chat(client: httpx.Client) -> None:
    headers = {"X-Fake-Cached-Tokens": "100", "X-Fake-Reasoning-Tokens": "7"}
    usage = client.post(CHAT, json=_chat_body("one two"), headers=headers).json()["usage"]
    assert usage == {
        "prompt_tokens": 102,  # cached tokens are part of the prompt, as OpenAI counts them
        "completion_tokens": 12,
        "total_tokens": 114,
        "prompt_tokens_details": {"cached_tokens": 100},
        "completion_tokens_details": {"reasoning_tokens": 7},
    }


# --- The OpenAI Responses API ------------------------------------------------------------------


def test_responses_plain(client: httpx.Client) -> None:
    body = {"model": "gpt-r", "input": "one two three", "instructions": "be brief"}
    resp = client.post(RESPONSES, json=body)
    assert resp.status_code == 200
    data = resp.json()
    assert data["object"] == "response" and data["id"].startswith("resp_")
    assert data["status"] == "completed" and data["model"] == "gpt-r"
    assert data["instructions"] == "be brief"
    [message] = data["output"]
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["content"] == [
        {"type": "output_text", "text": "Hello from the fake model.", "annotations": []}
    ]
    assert data["usage"] == {
        "input_tokens": 5,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 5,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 10,
    }
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "a b"}]},
        {"type": "function_call_output", "call_id": "c", "output": "c d e"},
    ]
    headers = {"X-Fake-Cached-Tokens": "40", "X-Fake-Reasoning-Tokens": "3", "X-Fake-Chunks": "2"}
    usage = client.post(RESPONSES, json={"input": items}, headers=headers).json()["usage"]
    assert usage == {
        "input_tokens": 45,
        "input_tokens_details": {"cached_tokens": 40},
        "output_tokens": 5,
        "output_tokens_details": {"reasoning_tokens": 3},
        "total_tokens": 50,
    }


def test_responses_stream_events(client: httpx.Client) -> None:
    events = _named_events(client, RESPONSES, {"model": "m", "input": "hi there", "stream": True})
    names = [name for name, _ in events]
    assert names == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 5,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    created = events[0][1]["response"]
    assert created["status"] == "in_progress" and created["usage"] is None
    deltas = [data["delta"] for name, data in events if name == "response.output_text.delta"]
    assert "".join(deltas) == "Hello from the fake model."
    assert events[9][1]["text"] == "Hello from the fake model."
    item_id = events[2][1]["item"]["id"]
    assert all(data["item_id"] == item_id for _, data in events[3:11])
    completed = events[-1][1]["response"]
    assert completed["id"] == created["id"] and completed["status"] == "completed"
    assert completed["usage"]["input_tokens"] == 2
    assert completed["usage"]["output_tokens"] == 5
    assert completed["usage"]["total_tokens"] == 7
    # No data: [DONE] in this API: the stream ends with response.completed.


def test_responses_knobs(client: httpx.Client) -> None:
    body = {"input": "x", "stream": True}
    events = _named_events(client, RESPONSES, body, headers={"X-Fake-Chunks": "9"})
    assert sum(name == "response.output_text.delta" for name, _ in events) == 9
    assert events[-1][1]["response"]["usage"]["output_tokens"] == 9
    lines: list[str] = []
    headers = {"X-Fake-Drop-After": "2", "X-Fake-Chunk-Delay-Ms": "10"}
    with (
        pytest.raises(httpx.RemoteProtocolError),
        client.stream("POST", RESPONSES, json=body, headers=headers) as resp,
    ):
        lines.extend(resp.iter_lines())
    names = [line[len("event: ") :] for line in lines if line.startswith("event: ")]
    assert names[-1] == "response.output_text.delta" and len(names) == 4 + 2
    resp = client.post(RESPONSES, json=body, headers={"X-Fake-Status": "429"})
    assert resp.status_code == 429
    assert resp.json() == {"error": {"message": "fake failure", "code": "429"}}
    assert (
        client.post(RESPONSES, content=b"[", headers={"Content-Type": _JSON_CT}).status_code == 400
    )


def test_responses_items(client: httpx.Client) -> None:
    created = client.post(RESPONSES, json={"input": "x"}).json()
    path = f"{RESPONSES}/{created['id']}"
    assert client.get(path).json() == created
    assert client.post(path + "/cancel").status_code == 400  # not a background response
    assert client.delete(path).json() == {
        "id": created["id"],
        "object": "response",
        "deleted": True,
    }
    missing = client.get(path)
    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == f"Response with id '{created['id']}' not found."

    queued = client.post(RESPONSES, json={"input": "x", "background": True}).json()
    assert queued["status"] == "queued" and queued["usage"] is None and queued["background"]
    done = client.get(f"{RESPONSES}/{queued['id']}").json()
    assert done["status"] == "completed" and done["usage"]["total_tokens"] == 6
    cancelled = client.post(f"{RESPONSES}/{queued['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"

    streamed = _named_events(client, RESPONSES, {"input": "x", "stream": True})
    ident = streamed[0][1]["response"]["id"]
    with client.stream("GET", f"{RESPONSES}/{ident}?starting_after=8&stream=true") as resp:
        replay = _parse_named(resp.read().decode())
    assert replay == streamed[9:]


# --- The Anthropic Messages API ----------------------------------------------------------------


def _anthropic_body(*contents: str, **extra: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": c} for c in contents]
    return {"model": "claude-f", "max_tokens": 64, "messages": messages, **extra}


def test_anthropic_plain(client: httpx.Client) -> None:
    body = _anthropic_body("one two", system="you are terse")
    data = client.post(MESSAGES, json=body).json()
    assert data["type"] == "message" and data["role"] == "assistant"
    assert data["id"].startswith("msg_") and data["model"] == "claude-f"
    assert data["content"] == [{"type": "text", "text": "Hello from the fake model."}]
    assert data["stop_reason"] == "end_turn" and data["stop_sequence"] is None
    usage = data["usage"]
    assert (usage["input_tokens"], usage["output_tokens"]) == (5, 5)
    assert usage["cache_creation_input_tokens"] == usage["cache_read_input_tokens"] == 0
    headers = {"X-Fake-Cached-Tokens": "2048", "X-Fake-Cache-Write-Tokens": "300"}
    blocks = [{"type": "text", "text": "a b c"}]
    usage = client.post(MESSAGES, json=_anthropic_body(blocks), headers=headers).json()["usage"]
    # Anthropic's input_tokens leave the cached tokens out.
    assert usage["input_tokens"] == 3
    assert usage["cache_read_input_tokens"] == 2048
    assert usage["cache_creation_input_tokens"] == 300
    assert usage["cache_creation"]["ephemeral_5m_input_tokens"] == 300


def test_anthropic_stream_events(client: httpx.Client) -> None:
    headers = {"X-Fake-Cached-Tokens": "10"}
    events = _named_events(client, MESSAGES, _anthropic_body("hi", stream=True), headers=headers)
    names = [name for name, _ in events]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 5,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] == 1 and start["usage"]["cache_read_input_tokens"] == 10
    assert events[1][1]["content_block"] == {"type": "text", "text": ""}
    text = "".join(data["delta"]["text"] for name, data in events if name == "content_block_delta")
    assert text == "Hello from the fake model."
    assert all(data["delta"]["type"] == "text_delta" for _, data in events[3:8])
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] == "end_turn"
    assert delta["usage"] == {"output_tokens": 5}
    headers = {"X-Fake-Delta-Usage": "full", "X-Fake-Chunks": "3", "X-Fake-Cached-Tokens": "10"}
    events = _named_events(client, MESSAGES, _anthropic_body("hi", stream=True), headers=headers)
    assert events[-2][1]["usage"] == {
        "input_tokens": 1,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 10,
        "output_tokens": 3,
    }


def test_anthropic_errors_and_knobs(client: httpx.Client) -> None:
    resp = client.post(MESSAGES, json=_anthropic_body("x"), headers={"X-Fake-Status": "529"})
    assert resp.status_code == 529
    assert resp.json() == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "fake failure"},
    }
    bad = client.post(MESSAGES, content=b"{", headers={"Content-Type": _JSON_CT})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert client.post("/_fake/faults", json={"status": 429, "times": 1}).status_code == 204
    faulty = client.post(MESSAGES, json=_anthropic_body("x"))
    assert faulty.status_code == 429
    assert faulty.json()["error"] == {"type": "rate_limit_error", "message": "fake fault"}
    lines: list[str] = []
    with (
        pytest.raises(httpx.RemoteProtocolError),
        client.stream(
            "POST",
            MESSAGES,
            json=_anthropic_body("x", stream=True),
            headers={"X-Fake-Drop-After": "1", "X-Fake-Chunks": "20"},
        ) as stream,
    ):
        lines.extend(stream.iter_lines())
    names = [line[len("event: ") :] for line in lines if line.startswith("event: ")]
    assert names == ["message_start", "content_block_start", "ping", "content_block_delta"]


def test_anthropic_count_tokens(client: httpx.Client) -> None:
    body = _anthropic_body("one two", "three", system=[{"type": "text", "text": "four five"}])
    resp = client.post(MESSAGES + "/count_tokens", json=body)
    assert resp.status_code == 200
    assert resp.json() == {"input_tokens": 5}


# --- The real SDKs, pointed straight at the fake -----------------------------------------------


def test_openai_sdk_responses(base_url: str) -> None:
    import openai

    oa = openai.OpenAI(base_url=base_url + "/openai/v1", api_key="sk-test", max_retries=0)
    response = oa.responses.create(model="gpt-r", input="one two three")
    assert response.output_text == "Hello from the fake model."
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (3, 5)
    assert response.usage.input_tokens_details.cached_tokens == 0
    assert oa.responses.retrieve(response.id).id == response.id
    stream = oa.responses.create(
        model="gpt-r", input=[{"role": "user", "content": "hi"}], stream=True
    )
    events = list(stream)
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == "Hello from the fake model."
    assert events[-1].type == "response.completed"
    assert events[-1].response.usage.total_tokens == 6
    with oa.responses.stream(model="gpt-r", input="a b") as helper:
        assert helper.get_final_response().output_text == "Hello from the fake model."


def test_anthropic_sdk_messages(base_url: str, client: httpx.Client) -> None:
    import anthropic

    client.delete("/_fake/requests")
    an = anthropic.Anthropic(base_url=base_url + "/anthropic", api_key="ak-test", max_retries=0)
    message = an.messages.create(
        model="claude-f", max_tokens=64, messages=[{"role": "user", "content": "one two"}]
    )
    assert message.content[0].text == "Hello from the fake model."
    assert (message.usage.input_tokens, message.usage.output_tokens) == (2, 5)
    with an.messages.stream(
        model="claude-f",
        max_tokens=64,
        messages=[{"role": "user", "content": "x"}],
        extra_headers={"X-Fake-Cached-Tokens": "12"},
    ) as stream:
        assert "".join(stream.text_stream) == "Hello from the fake model."
        final = stream.get_final_message()
    assert final.usage.output_tokens == 5 and final.usage.cache_read_input_tokens == 12
    raw = an.messages.create(
        model="claude-f", max_tokens=64, messages=[{"role": "user", "content": "x"}], stream=True
    )
    assert [event.type for event in raw][-2:] == ["message_delta", "message_stop"]
    count = an.messages.count_tokens(
        model="claude-f", messages=[{"role": "user", "content": "one two three"}]
    )
    assert count.input_tokens == 3
    with pytest.raises(anthropic.RateLimitError) as caught:
        an.messages.create(
            model="claude-f",
            max_tokens=8,
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"X-Fake-Status": "429"},
        )
    assert caught.value.body["error"]["type"] == "rate_limit_error"
    # The log keeps the SDK's own headers: its version and its credential (x-api-key in older
    # SDKs, a bearer token in newer ones).
    records = client.get("/_fake/requests").json()
    assert [r["path"] for r in records][-2:] == [MESSAGES + "/count_tokens", MESSAGES]
    headers = {name.lower(): value for name, value in records[0]["headers"]}
    assert headers["anthropic-version"]
    assert headers.get("x-api-key") == "ak-test" or headers["authorization"] == "Bearer ak-test"
