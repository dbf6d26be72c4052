"""One call path: what every kind of hop (deployment, feature, interceptor, route) gets from the
one hop engine, tried against a real gateway process, the fake model and a raw-socket upstream
that misbehaves on purpose.

- a client that stops reading a stream is disconnected on every kind of hop (the write-stall
  watch), not only on deployment calls;
- route refusals reach the limit-rejection metrics (the admission's refusal hook);
- no upstream answer is read whole without a bound: a large one is relayed as it arrives;
- the upstream's reason phrase is never copied, and the headers its `Connection` names (or the
  client's) are dropped;
- compressed request bodies are refused before anything is inflated, `100-continue` is answered
  only after authentication and the size check, and route paths that could escape the route are
  refused.
"""

from __future__ import annotations

import contextlib
import gzip
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from harness import FakeModel, Gateway, free_port, start_gateway, stop

pytestmark = pytest.mark.e2e

KEY = "call-path-key-0123456789abcdef"
LIMITED_KEY = "call-path-limited-0123456789abcdef"
WRITE_STALL_MS = 1000
STREAM_BODY = orjson.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": True})
CHAT_BODY = orjson.dumps({"messages": [{"role": "user", "content": "hi"}]})
BIG = 64 * 1024 * 1024  # declared by the raw upstream; far more than it ever sends
FIRST_PART = 256 * 1024


class RawUpstream:
    """A loopback HTTP server whose answer is written by hand: `answer(request_bytes, sock)`.

    Each connection is served in a thread of its own; `requests` keeps what arrived.
    """

    def __init__(self, answer: Callable[[bytes, socket.socket], None]) -> None:
        self.answer = answer
        self.requests: list[bytes] = []
        self.release = threading.Event()  # what a paused answer waits for
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._closing = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def url(self, path: str = "/v1/chat/completions") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _serve(self) -> None:
        while not self._closing:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            data = b""
            with contextlib.suppress(OSError):
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, rest = data.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(rest) < length:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    rest += chunk
                self.requests.append(head + b"\r\n\r\n" + rest)
                self.answer(data, conn)

    def close(self) -> None:
        self._closing = True
        self.release.set()
        self._server.close()


def paused_big_answer(upstream: RawUpstream) -> Callable[[bytes, socket.socket], None]:
    """Declares a 64 MiB JSON body, sends its first 256 KiB, then waits to be released."""

    def answer(_: bytes, conn: socket.socket) -> None:
        head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {BIG}\r\n\r\n"
        conn.sendall(head.encode() + b"[" + b" " * (FIRST_PART - 1))
        upstream.release.wait(30)

    return answer


@pytest.fixture(scope="module")
def raw_big() -> Iterator[RawUpstream]:
    upstream = RawUpstream(lambda data, conn: None)
    upstream.answer = paused_big_answer(upstream)
    yield upstream
    upstream.close()


def hostile_answer(data: bytes, conn: socket.socket) -> None:
    """A status line with a control character in its reason phrase, and a header that the
    answer's own `Connection` header nominates as hop-by-hop."""
    body = b'{"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}'
    conn.sendall(
        b"HTTP/1.1 200 OK\x7fX-Evil: 1\r\n"
        b"Content-Type: application/json\r\n"
        b"Connection: keep-alive, X-Secret\r\n"
        b"X-Secret: upstream-internal\r\n"
        b"X-Kept: yes\r\n" + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    )


@pytest.fixture(scope="module")
def raw_hostile() -> Iterator[RawUpstream]:
    upstream = RawUpstream(hostile_answer)
    yield upstream
    upstream.close()


@pytest.fixture(scope="module")
def gateway(
    work_dir: Path, fake_model: FakeModel, raw_big: RawUpstream, raw_hostile: RawUpstream
) -> Iterator[Gateway]:
    config = {
        "models": {
            "chat-model": {"type": "chat", "endpoint": fake_model.endpoint("chat-model")},
            "guarded-model": {
                "type": "chat",
                "endpoint": fake_model.endpoint("guarded-model"),
                "interceptors": ["streamer"],
            },
            "big-model": {
                "type": "chat",
                "endpoint": raw_big.url(),
                "features": {"tokenizeEndpoint": raw_big.url("/tokenize")},
            },
            "hostile-model": {"type": "chat", "endpoint": raw_hostile.url()},
        },
        # An interceptor that answers by itself (the fake model streams back): its stream is
        # relayed to the client as it comes.
        "interceptors": {"streamer": {"endpoint": fake_model.endpoint("streamer")}},
        "routes": {
            "stream-route": {
                "paths": ["/v1/streams"],
                "methods": ["POST"],
                "upstreams": [{"endpoint": fake_model.endpoint("route-model")}],
            },
            "limited-route": {
                "paths": ["/v1/limited"],
                "methods": ["GET"],
                "response": {"status": 200, "body": "{}"},
            },
            "vector-route": {
                "paths": ["/v1/vector_store(/[^/]+)*$"],
                "methods": ["GET"],
                "rewritePath": True,
                "upstreams": [{"endpoint": raw_hostile.url("/")}],
            },
        },
        "roles": {"limited": {"limits": {"limited-route": {"requestDay": "1"}}}},
        "keys": {
            KEY: {"project": "call-path", "role": "default"},
            LIMITED_KEY: {"project": "call-path-limited", "roles": ["limited"]},
        },
    }
    metrics_port = free_port()
    settings = {
        "server": {"writeStallTimeout": WRITE_STALL_MS},
        "metrics": {"port": metrics_port, "host": "127.0.0.1"},
    }
    gw = start_gateway(work_dir, [config], settings=settings)
    gw.metrics_port = metrics_port  # type: ignore[attr-defined]
    yield gw
    stop(gw.process)
    assert "Traceback" not in gw.output()


def head(path: str, length: int, extra: str = "", key: str = KEY) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Api-Key: {key}"]
    lines += ["Content-Type: application/json", f"Content-Length: {length}"]
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode("latin-1")


def stalls_until_cut(gw: Gateway, path: str) -> None:
    """A client with a tiny receive window that never reads a long stream from `path` must be
    disconnected by the gateway (`server.writeStallTimeout`)."""
    word = "x" * 6000
    before = gw.output().count("took none of a stream")
    extra = f"X-Fake-Reply: {word}\r\nX-Fake-Chunks: 3000\r\n"
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: tiny window
    sock.connect(("127.0.0.1", gw.port))
    with sock:
        sock.sendall(head(path, len(STREAM_BODY), extra) + STREAM_BODY)
        deadline = time.monotonic() + 20
        while gw.output().count("took none of a stream") == before:
            assert time.monotonic() < deadline, f"the stalled client of {path} was never cut"
            time.sleep(0.1)
        received = 0
        with contextlib.suppress(OSError):
            sock.settimeout(10)
            while chunk := sock.recv(65536):
                received += len(chunk)
    assert received < 3000 * len(word)  # cut off, not the whole stream


def test_an_interceptor_stream_that_the_client_stops_reading_is_cut(gateway: Gateway) -> None:
    stalls_until_cut(gateway, "/openai/deployments/guarded-model/chat/completions")


def test_a_route_stream_that_the_client_stops_reading_is_cut(gateway: Gateway) -> None:
    stalls_until_cut(gateway, "/v1/streams")


def test_route_refusals_reach_the_limit_rejection_metrics(gateway: Gateway) -> None:
    url = f"{gateway.url}/v1/limited"
    assert httpx.get(url, headers={"Api-Key": LIMITED_KEY}).status_code == 200
    refused = httpx.get(url, headers={"Api-Key": LIMITED_KEY})
    assert refused.status_code == 429
    scrape = httpx.get(f"http://127.0.0.1:{gateway.metrics_port}/metrics").text  # type: ignore[attr-defined]
    lines = [
        line
        for line in scrape.splitlines()
        if line.startswith("tollgate_limit_rejections_total{")
        and 'project="call-path-limited"' in line
        and 'deployment="limited-route"' in line
    ]
    assert lines, scrape
    assert float(lines[0].rsplit(" ", 1)[1]) >= 1


def first_bytes_arrive(gw: Gateway, path: str, upstream: RawUpstream) -> int:
    """How much of the raw upstream's paused 64 MiB answer reached the client while the
    upstream still holds the rest back: a bounded relay passes it on at once."""
    upstream.release.clear()
    received = 0
    try:
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
            sock.sendall(head(path, len(CHAT_BODY)) + CHAT_BODY)
            with contextlib.suppress(TimeoutError):
                while received < FIRST_PART:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    received += len(chunk)
    finally:
        upstream.release.set()
    return received


def test_a_large_deployment_answer_is_relayed_as_it_arrives(
    gateway: Gateway, raw_big: RawUpstream
) -> None:
    received = first_bytes_arrive(
        gateway, "/openai/deployments/big-model/chat/completions", raw_big
    )
    assert received >= FIRST_PART // 2


def test_a_large_feature_answer_is_relayed_as_it_arrives(
    gateway: Gateway, raw_big: RawUpstream
) -> None:
    received = first_bytes_arrive(gateway, "/v1/deployments/big-model/tokenize", raw_big)
    assert received >= FIRST_PART // 2


def test_the_upstream_reason_phrase_and_nominated_headers_are_not_relayed(
    gateway: Gateway, raw_hostile: RawUpstream
) -> None:
    response = httpx.post(
        f"{gateway.url}/openai/deployments/hostile-model/chat/completions",
        headers={"Api-Key": KEY, "Content-Type": "application/json"},
        content=CHAT_BODY,
    )
    assert response.status_code == 200
    assert response.reason_phrase == "OK"
    assert "X-Evil" not in response.headers
    assert "X-Secret" not in response.headers  # its Connection header named it
    assert response.headers["X-Kept"] == "yes"
    assert "Traceback" not in gateway.output()


def test_headers_the_client_connection_names_are_not_forwarded(
    gateway: Gateway, raw_hostile: RawUpstream
) -> None:
    raw_hostile.requests.clear()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        extra = "Connection: keep-alive, X-Client-Secret\r\nX-Client-Secret: mine\r\n"
        path = "/openai/deployments/hostile-model/chat/completions"
        sock.sendall(head(path, len(CHAT_BODY), extra) + CHAT_BODY)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    assert len(raw_hostile.requests) == 1
    forwarded = raw_hostile.requests[0].lower()
    assert b"x-client-secret" not in forwarded


def test_a_compressed_request_body_is_refused_and_not_forwarded(
    gateway: Gateway, fake_model: FakeModel
) -> None:
    fake_model.clear()
    response = httpx.post(
        f"{gateway.url}/openai/deployments/chat-model/chat/completions",
        headers={"Api-Key": KEY, "Content-Type": "application/json", "Content-Encoding": "gzip"},
        content=gzip.compress(CHAT_BODY),
    )
    assert response.status_code == 415
    assert response.json()["error"]["message"] == "Unsupported Content-Encoding: gzip"
    assert fake_model.requests() == []


def interim_answer(gw: Gateway, key: str, length: int) -> bytes:
    """What the gateway answers first to a request that expects `100-continue`."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        path = "/openai/deployments/chat-model/chat/completions"
        sock.sendall(head(path, length, "Expect: 100-continue\r\n", key=key))
        return sock.recv(65536)


def test_100_continue_only_after_authentication_and_the_size_check(gateway: Gateway) -> None:
    assert interim_answer(gateway, "not-a-key", len(CHAT_BODY)).startswith(b"HTTP/1.1 401")
    too_big = 1024 * 1024 * 1024
    assert interim_answer(gateway, KEY, too_big).startswith(b"HTTP/1.1 413")
    assert interim_answer(gateway, KEY, len(CHAT_BODY)).startswith(b"HTTP/1.1 100 Continue")


@pytest.mark.parametrize(
    "path",
    [
        "/v1/vector_store/../../private.txt",
        "/v1/vector_store/%2e%2e/%2e%2e/private.txt",
        "/v1/vector_store/..%2f..%2fprivate.txt",
        "/v1/vector_store/%252e%252e/private.txt",
        "/v1/vector_store/a%5c..%5cprivate.txt",
    ],
)
def test_a_route_path_that_could_escape_the_route_is_refused(
    gateway: Gateway, raw_hostile: RawUpstream, path: str
) -> None:
    raw_hostile.requests.clear()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nApi-Key: {KEY}\r\n\r\n".encode())
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b"Invalid path" in answer
    assert raw_hostile.requests == []


def test_a_plain_route_path_still_goes_through(gateway: Gateway, raw_hostile: RawUpstream) -> None:
    raw_hostile.requests.clear()
    response = httpx.get(f"{gateway.url}/v1/vector_store/abc/def", headers={"Api-Key": KEY})
    assert response.status_code == 200
    assert raw_hostile.requests[0].startswith(b"GET /v1/vector_store/abc/def ")


def test_one_slow_upstream_cannot_take_every_pooled_connection(
    work_dir: Path, fake_model: FakeModel
) -> None:
    """Calls abandoned on a slow upstream hold at most `upstream.maxConnectionsPerUpstream` of
    the pool: another caller's call to another upstream still gets a connection."""
    slow = RawUpstream(lambda data, conn: None)
    slow.answer = lambda data, conn: slow.release.wait(30)  # type: ignore[method-assign]
    config = {
        "models": {
            "slow-model": {"type": "chat", "endpoint": slow.url()},
            "chat-model": {"type": "chat", "endpoint": fake_model.endpoint("chat-model")},
        },
        "keys": {KEY: {"project": "call-path", "role": "default"}},
    }
    settings = {
        "upstream": {"maxConnections": 8, "maxConnectionsPerUpstream": 4, "connectTimeout": 3000}
    }
    gw = start_gateway(work_dir, [config], settings=settings)
    try:
        path = "/openai/deployments/slow-model/chat/completions"
        for _ in range(12):  # each client sends its call and goes away at once
            with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
                sock.sendall(head(path, len(CHAT_BODY)) + CHAT_BODY)
        deadline = time.monotonic() + 10
        while len(slow.requests) < 4:  # the slow upstream holds its share of the pool
            assert time.monotonic() < deadline, "the abandoned calls never reached upstream"
            time.sleep(0.05)
        response = httpx.post(
            f"{gw.url}/openai/deployments/chat-model/chat/completions",
            headers={"Api-Key": KEY},
            json={"messages": [{"role": "user", "content": "hi"}]},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        assert len(slow.requests) == 4  # never more than its bound at once
    finally:
        slow.close()
        stop(gw.process)
