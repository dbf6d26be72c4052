"""Hostile HTTP at the protocol level, against a real `tollgate serve` over raw sockets on
loopback: request smuggling, duplicate credential headers, encoded and overlong deployment ids,
and upstreams that send invalid SSE, huge headers or never end.

The gateway must answer a clear 4xx (or close the connection), never forward a smuggled
request upstream, never answer 500 and never log a traceback; and it keeps serving others.
Every loop is bounded (bytes, chunks or seconds).
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from harness import FakeModel, Gateway, start_gateway, stop

pytestmark = pytest.mark.e2e

KEY = "protocol-key-first-0123456789abcdef"
OTHER_KEY = "protocol-key-second-0123456789abcdef"
CHAT_PATH = "/openai/deployments/chat-model/chat/completions"
CHAT_BODY = orjson.dumps({"messages": [{"role": "user", "content": "Say hello"}]})
STREAM_BODY = orjson.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": True})
MARK = "SMUGGLED-7f3a"  # in the body of every smuggled request: upstream must never see it
SMUGGLED_BODY = orjson.dumps({"messages": [{"role": "user", "content": MARK}]})
SMUGGLED = (
    f"POST {CHAT_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nApi-Key: {KEY}\r\n"
    f"Content-Type: application/json\r\nContent-Length: {len(SMUGGLED_BODY)}\r\n\r\n"
).encode() + SMUGGLED_BODY
ENDLESS_SECONDS = 90  # the endless upstream's bound: far longer than any test waits
# A stream whose client left is read on for its usage for at most this long (relay.py's
# DRAIN_TIMEOUT_S, compatibility C60), then the upstream connection is closed.
DRAIN_BOUND_S = 30
MEGABYTE = 1024 * 1024
# A response's status line, wherever it starts (a pipelined answer follows a body directly).
STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


# --- a raw upstream ------------------------------------------------------------------------------


class RawUpstream:
    """A loopback HTTP server that answers by hand, chosen by the request path's last segment
    before `/chat/completions` (`/<behaviour>/chat/completions`). A thread per connection."""

    def __init__(self) -> None:
        self.answers: dict[str, Callable[[socket.socket], None]] = {
            "garbage-sse": self._garbage_sse,
            "unterminated-sse": self._unterminated_sse,
            "huge-line-sse": self._huge_line_sse,
            "huge-headers": self._huge_headers,
            "huge-header-line": self._huge_header_line,
            "endless-sse": self._endless_sse,
        }
        self.endless_ended = threading.Event()  # the gateway stopped taking the endless answer
        self.endless_sent = 0
        self._closing = threading.Event()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def endpoint(self, behaviour: str) -> str:
        return f"http://127.0.0.1:{self.port}/{behaviour}/chat/completions"

    def close(self) -> None:
        self._closing.set()
        self._server.close()

    def _serve(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(30)
            data = b""
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
                    return
                rest += chunk
            path = head.split(b" ")[1].decode()
            self.answers[path.strip("/").split("/")[0]](conn)

    @staticmethod
    def _sse_head(extra: bytes = b"") -> bytes:
        return (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n" + extra + b"\r\n"
        )

    @staticmethod
    def _chunk(data: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(data), data)

    def _garbage_sse(self, conn: socket.socket) -> None:
        events = [
            b"this is not an event\n\n",
            b"data: {not json\n\n",
            b":\x00\xff\xfe binary comment\n\n",
            b"event: \x01\x02\ndata: \xff\xfe\n\n",
            b'data: {"choices": "not a list", "usage": {"prompt_tokens": "x"}}\n\n',
            b'data: {"usage": {"prompt_tokens": 1e400, "completion_tokens": -5}}\n\n',
            b"data: [DONE]\n\n",
        ]
        conn.sendall(self._sse_head() + b"".join(self._chunk(e) for e in events) + b"0\r\n\r\n")

    def _unterminated_sse(self, conn: socket.socket) -> None:
        chunk = b'data: {"choices": [{"index": 0, "delta": {"content": "cut"}}]}'  # no newline
        conn.sendall(self._sse_head() + self._chunk(chunk) + b"0\r\n\r\n")

    def _huge_line_sse(self, conn: socket.socket) -> None:
        line = b'data: {"choices": [{"index": 0, "delta": {"content": "'
        line += b"m" * MEGABYTE + b'"}}]}\n\n'
        conn.sendall(self._sse_head() + self._chunk(line) + self._chunk(b"data: [DONE]\n\n"))
        conn.sendall(b"0\r\n\r\n")

    def _huge_headers(self, conn: socket.socket) -> None:
        headers = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"f" * 1000) for i in range(100))
        body = b'{"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}'
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            + headers
            + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )

    def _huge_header_line(self, conn: socket.socket) -> None:
        body = b'{"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}'
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Filler: "
            + b"f" * (100 * 1024)
            + b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )

    def _endless_sse(self, conn: socket.socket) -> None:
        """Events without end, paced (about 5 MB/s) and bounded by ENDLESS_SECONDS; sets
        `endless_ended` when the gateway closes the connection."""
        event = self._chunk(b'data: {"choices": [{"index": 0, "delta": {"content": "more"}}]}\n\n')
        deadline = time.monotonic() + ENDLESS_SECONDS
        try:
            conn.sendall(self._sse_head())
            while time.monotonic() < deadline and not self._closing.is_set():
                conn.sendall(event * 64)
                self.endless_sent += 64
                time.sleep(0.001)
        except OSError:
            self.endless_ended.set()


# --- fixtures and helpers -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw() -> Iterator[RawUpstream]:
    upstream = RawUpstream()
    yield upstream
    upstream.close()


@pytest.fixture(scope="module")
def gateway(work_dir: Path, fake_model: FakeModel, raw: RawUpstream) -> Iterator[Gateway]:
    models = {name: {"type": "chat", "endpoint": raw.endpoint(name)} for name in raw.answers}
    models["chat-model"] = {"type": "chat", "endpoint": fake_model.endpoint("chat-model")}
    config = {
        "models": models,
        "keys": {
            KEY: {"project": "protocol-first", "role": "default"},
            OTHER_KEY: {"project": "protocol-second", "role": "default"},
        },
    }
    gw = start_gateway(work_dir, [config], settings={"server": {"writeStallTimeout": 5000}})
    yield gw
    stop(gw.process)
    assert "Traceback" not in gw.output()


def send(gw: Gateway, data: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes, then read until the gateway closes or stays quiet for a second."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(data)
        received = b""
        sock.settimeout(1)
        deadline = time.monotonic() + timeout
        with contextlib.suppress(OSError):  # a quiet second (TimeoutError) or a reset
            while time.monotonic() < deadline:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
    return received


def statuses(answer: bytes) -> list[int]:
    """The status of every response in what one connection received (bodies searched too:
    a smuggled request's answer would appear as a second status line)."""
    return [int(status) for status in STATUS_LINE.findall(answer)]


def head(
    method: str = "POST",
    path: str = CHAT_PATH,
    extra: str = "",
    *,
    key: str | None = KEY,
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    if key is not None:
        lines.append(f"Api-Key: {key}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode("latin-1")


def chunked(*pieces: bytes, size: Callable[[bytes], bytes] = lambda p: b"%x" % len(p)) -> bytes:
    return b"".join(size(p) + b"\r\n" + p + b"\r\n" for p in pieces) + b"0\r\n\r\n"


def normal_call(gw: Gateway) -> None:
    response = httpx.post(
        gw.url + CHAT_PATH,
        content=CHAT_BODY,
        headers={"Api-Key": KEY, "Content-Type": "application/json"},
        timeout=15,
    )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]


def smuggled_upstream(fake: FakeModel) -> list[str]:
    return [record["body"] for record in fake.requests() if MARK in record["body"]]


# --- request smuggling ----------------------------------------------------------------------------

FRAMED = chunked(CHAT_BODY)

SMUGGLING = {
    # CL.TE: a front end that reads Content-Length sees one request; one that reads chunked
    # sees the smuggled one after the `0` chunk, or the reverse (TE.CL).
    "cl-and-te": head(extra=f"Content-Length: {len(FRAMED)}\r\nTransfer-Encoding: chunked\r\n")
    + FRAMED
    + SMUGGLED,
    "te-and-cl": head(extra="Transfer-Encoding: chunked\r\nContent-Length: 4\r\n")
    + FRAMED
    + SMUGGLED,
    "te-and-cl-zero": head(extra="Content-Length: 0\r\nTransfer-Encoding: chunked\r\n")
    + FRAMED
    + SMUGGLED,
    "two-content-lengths": head(
        extra=f"Content-Length: {len(CHAT_BODY)}\r\nContent-Length: {len(CHAT_BODY) + 5}\r\n"
    )
    + CHAT_BODY
    + SMUGGLED,
    "content-length-list": head(extra=f"Content-Length: {len(CHAT_BODY)}, {len(SMUGGLED)}\r\n")
    + CHAT_BODY
    + SMUGGLED,
    "content-length-sign": head(extra=f"Content-Length: +{len(CHAT_BODY)}\r\n")
    + CHAT_BODY
    + SMUGGLED,
    "obs-fold": head(extra=f"Content-Length: {len(CHAT_BODY)}\r\nX-Folded: a\r\n b\r\n")
    + CHAT_BODY
    + SMUGGLED,
    "obs-fold-transfer-encoding": head(
        extra=f"Content-Length: {len(CHAT_BODY)}\r\nX-Folded: a\r\n Transfer-Encoding: chunked\r\n"
    )
    + FRAMED
    + SMUGGLED,
    "space-before-colon": head(
        extra=f"Transfer-Encoding : chunked\r\nContent-Length: {len(CHAT_BODY)}\r\n"
    )
    + CHAT_BODY
    + SMUGGLED,
    "obfuscated-transfer-encoding": head(extra="Transfer-Encoding: xchunked\r\n")
    + FRAMED
    + SMUGGLED,
    "chunk-size-negative": head(extra="Transfer-Encoding: chunked\r\n")
    + chunked(CHAT_BODY, size=lambda p: b"-%x" % len(p))
    + SMUGGLED,
    "chunk-size-oversized": head(extra="Transfer-Encoding: chunked\r\n")
    + b"f" * 20
    + b"\r\n"
    + CHAT_BODY
    + b"\r\n0\r\n\r\n"
    + SMUGGLED,
    "chunk-size-overflow-to-small": head(extra="Transfer-Encoding: chunked\r\n")
    + chunked(CHAT_BODY, size=lambda p: b"1" + b"0" * 15 + b"%x" % len(p))
    + SMUGGLED,
    "chunk-size-non-hex": head(extra="Transfer-Encoding: chunked\r\n")
    + chunked(CHAT_BODY, size=lambda p: b"zz")
    + SMUGGLED,
    "chunk-size-0x-prefix": head(extra="Transfer-Encoding: chunked\r\n")
    + chunked(CHAT_BODY, size=lambda p: b"0x%x" % len(p))
    + SMUGGLED,
    "chunk-size-plus-sign": head(extra="Transfer-Encoding: chunked\r\n")
    + chunked(CHAT_BODY, size=lambda p: b"+%x" % len(p))
    + SMUGGLED,
    "chunk-extension-bare-lf": head(extra="Transfer-Encoding: chunked\r\n")
    + chunked(CHAT_BODY, size=lambda p: b"%x;x\n%s" % (len(p), SMUGGLED))
    + SMUGGLED,
    "chunk-wrong-length": head(extra="Transfer-Encoding: chunked\r\n")
    + b"%x\r\n%s\r\n0\r\n\r\n" % (len(CHAT_BODY) - 10, CHAT_BODY)
    + SMUGGLED,
}


@pytest.mark.parametrize("data", list(SMUGGLING.values()), ids=list(SMUGGLING))
def test_an_ambiguously_framed_request_is_refused_and_nothing_is_smuggled(
    gateway: Gateway, fake_model: FakeModel, data: bytes
) -> None:
    fake_model.clear()
    answer = send(gateway, data)
    assert statuses(answer) in ([], [400]), answer[:300]  # one 400, or closed without one
    assert fake_model.requests() == []  # neither the framed call nor the smuggled one
    normal_call(gateway)


@pytest.mark.parametrize(
    "data",
    [
        head(extra=f"Content-Length: {len(CHAT_BODY) + len(SMUGGLED)}\r\n") + CHAT_BODY + SMUGGLED,
        head(extra="Transfer-Encoding: chunked\r\n") + chunked(CHAT_BODY + SMUGGLED),
        head(extra="Transfer-Encoding: chunked\r\n") + chunked(CHAT_BODY, SMUGGLED),
    ],
    ids=["in-a-content-length-body", "in-one-chunk", "in-a-second-chunk"],
)
def test_a_request_hidden_in_a_body_is_only_body(
    gateway: Gateway, fake_model: FakeModel, data: bytes
) -> None:
    """A pipelined request inside the declared body is body bytes (here: bad JSON, 400),
    never a second request."""
    fake_model.clear()
    answer = send(gateway, data)
    assert statuses(answer) == [400], answer[:300]
    assert b"Invalid JSON" in answer
    assert smuggled_upstream(fake_model) == []
    assert fake_model.requests() == []


def test_a_chunk_size_with_extensions_is_decoded_as_hex(
    gateway: Gateway, fake_model: FakeModel
) -> None:
    """Chunk extensions are legal (RFC 9112 7.1.1): the size before `;` is read as hex and the
    extension is dropped, never taken into the body."""
    fake_model.clear()
    half = len(CHAT_BODY) // 2
    body = chunked(
        CHAT_BODY[:half],
        CHAT_BODY[half:],
        size=lambda p: b'%X;name=value;quoted="a;b"' % len(p),
    )
    answer = send(gateway, head(extra="Transfer-Encoding: chunked\r\n") + body)
    assert statuses(answer) == [200], answer[:300]
    forwarded = fake_model.last()
    assert orjson.loads(forwarded["body"]) == orjson.loads(CHAT_BODY)


def test_a_pipelined_request_after_a_complete_one_is_answered_by_the_gateway_in_order(
    gateway: Gateway, fake_model: FakeModel
) -> None:
    """Pipelining is not smuggling: a second request after a correctly framed first one is the
    client's own second call, answered second (the control for the cases above)."""
    fake_model.clear()
    data = head(extra=f"Content-Length: {len(CHAT_BODY)}\r\n") + CHAT_BODY + SMUGGLED
    answer = send(gateway, data)
    assert statuses(answer) == [200, 200], answer[:300]
    bodies = [record["body"] for record in fake_model.requests()]
    assert len(bodies) == 2 and MARK not in bodies[0] and MARK in bodies[1]


def test_a_transfer_coding_other_than_chunked_is_refused(
    gateway: Gateway, fake_model: FakeModel
) -> None:
    fake_model.clear()
    answer = send(gateway, head(extra="Transfer-Encoding: gzip, chunked\r\n") + FRAMED)
    assert statuses(answer) == [501], answer[:300]
    body = answer.partition(b"\r\n\r\n")[2]
    assert b"Unsupported Transfer-Encoding: gzip" in body
    assert fake_model.requests() == []


# --- duplicate credential headers -----------------------------------------------------------------


def project_of(gw: Gateway, extra: str) -> tuple[int, bytes]:
    answer = send(gw, head("GET", "/v1/user/info", "Connection: close\r\n" + extra, key=None))
    status = statuses(answer)
    assert len(status) == 1, answer[:300]
    return status[0], answer.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize(
    "extra",
    [
        f"Api-Key: {KEY}\r\nApi-Key: {OTHER_KEY}\r\n",
        f"Api-Key: not-a-key\r\nApi-Key: {OTHER_KEY}\r\n",
        f"api-key: not-a-key\r\nAPI-KEY: {OTHER_KEY}\r\n",
        f"Api-Key: {KEY}\r\nx-api-key: {OTHER_KEY}\r\n",
        f"Api-Key: not-a-key\r\nx-api-key: {OTHER_KEY}\r\n",
        f"Authorization: Bearer {KEY}\r\nAuthorization: Bearer {OTHER_KEY}\r\n",
        f"Authorization: Bearer not-a-key\r\nAuthorization: Bearer {OTHER_KEY}\r\n",
        f"Api-Key: {KEY}\r\nAuthorization: Bearer {OTHER_KEY}\r\n",
        f"Api-Key: not-a-key\r\nAuthorization: Bearer {OTHER_KEY}\r\n",
    ],
    ids=[
        "two-api-keys",
        "bad-then-good-api-key",
        "bad-then-good-api-key-cased",
        "api-key-and-x-api-key",
        "bad-api-key-and-good-x-api-key",
        "two-authorizations",
        "bad-then-good-authorization",
        "api-key-and-other-bearer",
        "bad-api-key-and-good-bearer",
    ],
)
def test_a_second_credential_never_authenticates(gateway: Gateway, extra: str) -> None:
    status, body = project_of(gateway, extra)
    assert b"protocol-second" not in body
    assert status in (200, 400, 401), body
    if status == 200:  # only the first credential, by DIAL's rule (compatibility C8)
        assert orjson.loads(body)["project"] == "protocol-first"
    else:
        assert orjson.loads(body)["error"]["message"]


def test_api_key_with_another_bearer_is_the_per_request_key_refusal(gateway: Gateway) -> None:
    status, body = project_of(gateway, f"Api-Key: {KEY}\r\nAuthorization: Bearer {OTHER_KEY}\r\n")
    assert status == 400
    assert orjson.loads(body)["error"]["message"] == "Provided API key is not per request key"


@pytest.mark.parametrize(
    "extra",
    [
        f"Api-Key: {KEY}\r\nApi-Key: {OTHER_KEY}\r\n",
        f"Authorization: Bearer {KEY}\r\nAuthorization: Bearer {OTHER_KEY}\r\n",
    ],
    ids=["two-api-keys", "two-authorizations"],
)
def test_two_different_values_of_one_credential_header_are_refused(
    gateway: Gateway, extra: str
) -> None:
    status, body = project_of(gateway, extra)
    assert status == 400, body
    assert orjson.loads(body)["error"]["message"].endswith(
        "is given more than once with different values"
    )


def test_the_same_credential_repeated_is_one_credential(gateway: Gateway) -> None:
    status, body = project_of(gateway, f"Api-Key: {KEY}\r\nApi-Key: {KEY}\r\n")
    assert status == 200, body
    assert orjson.loads(body)["project"] == "protocol-first"


# --- encoded and overlong deployment ids ----------------------------------------------------------

DEPLOYMENT_IDS = {
    "nul": ("chat-model%00", "chat-model\x00"),
    "nul-inside": ("a%00b", "a\x00b"),
    "encoded-slash": ("chat%2fmodel", "chat/model"),
    "encoded-dots": ("%2e%2e", ".."),
    "dot-slash-dot": ("..%2f..%2fchat-model", "../../chat-model"),
    "encoded-unicode": ("%E2%82%AC-model", "\u20ac-model"),
    "invalid-utf8": ("%ff%fe", None),
    "control-chars": ("%0d%0aX-Injected:%201", "\r\nX-Injected: 1"),
    "percent-alone": ("100%", None),
    "4-kib": ("d" * 4096, "d" * 4096),
}


@pytest.mark.parametrize(
    "template",
    [
        "/openai/deployments/{}/chat/completions",
        "/openai/deployments/{}/embeddings",
        "/v1/deployments/{}/limits",
        "/v1/deployments/{}/tokenize",
    ],
    ids=["chat", "embeddings", "limits", "tokenize"],
)
@pytest.mark.parametrize("case", list(DEPLOYMENT_IDS), ids=list(DEPLOYMENT_IDS))
def test_an_encoded_deployment_id_is_an_unknown_application(
    gateway: Gateway, fake_model: FakeModel, template: str, case: str
) -> None:
    encoded, decoded = DEPLOYMENT_IDS[case]
    path = template.format(encoded)
    method = "GET" if path.endswith("/limits") else "POST"
    fake_model.clear()
    answer = send(
        gateway,
        head(method, path, f"Connection: close\r\nContent-Length: {len(CHAT_BODY)}\r\n")
        + CHAT_BODY,
    )
    status = statuses(answer)
    assert status in ([400], [404]), answer[:300]
    body = answer.partition(b"\r\n\r\n")[2]
    assert b"X-Injected" not in answer.partition(b"\r\n\r\n")[0]  # never a header
    if status == [404]:
        message = orjson.loads(body)["error"]["message"]
        assert message.startswith("Unknown application: ")
        if decoded is not None:
            assert message == f"Unknown application: {decoded}"
    assert fake_model.requests() == []


@pytest.mark.parametrize(
    "deployment",
    ["d" * 10240, "%64" * 4000, "\u00fcn\u00efc\u00f8de-model", "\u20ac" * 4000],
    ids=["10-kib", "10-kib-encoded", "raw-unicode", "raw-unicode-12-kib"],
)
def test_an_overlong_or_raw_unicode_deployment_id_is_refused_cleanly(
    gateway: Gateway, fake_model: FakeModel, deployment: str
) -> None:
    fake_model.clear()
    path = f"/openai/deployments/{deployment}/chat/completions"
    data = head(extra=f"Content-Length: {len(CHAT_BODY)}\r\n").replace(
        CHAT_PATH.encode(), path.encode("utf-8")
    )
    answer = send(gateway, data + CHAT_BODY)
    status = statuses(answer)
    assert status in ([400], [404], [414]), answer[:300]  # aiohttp: 400 (line too long, bad char)
    if status == [404]:
        body = answer.partition(b"\r\n\r\n")[2]
        assert orjson.loads(body)["error"]["message"].startswith("Unknown application: ")
    assert fake_model.requests() == []
    normal_call(gateway)


def test_a_percent_encoded_known_id_is_the_same_deployment(
    gateway: Gateway, fake_model: FakeModel
) -> None:
    """`%2d` is `-`: unreserved characters encoded or not name the same deployment."""
    fake_model.clear()
    path = "/openai/deployments/chat%2dmodel/chat/completions"
    answer = send(
        gateway, head(path=path, extra=f"Content-Length: {len(CHAT_BODY)}\r\n") + CHAT_BODY
    )
    assert statuses(answer) == [200], answer[:300]
    assert fake_model.last()["path"] == CHAT_PATH


# --- upstreams that misbehave ---------------------------------------------------------------------


def stream_from(gw: Gateway, model: str, limit: int = 4 * MEGABYTE) -> tuple[int, bytes]:
    """A streamed call to `model`, read to its end (or `limit` bytes) with httpx."""
    received = b""
    url = f"{gw.url}/openai/deployments/{model}/chat/completions"
    with httpx.stream(
        "POST",
        url,
        content=STREAM_BODY,
        headers={"Api-Key": KEY, "Content-Type": "application/json"},
        timeout=20,
    ) as response:
        for chunk in response.iter_bytes():
            received += chunk
            if len(received) >= limit:
                break
        return response.status_code, received


def access_line(gw: Gateway, model: str) -> str:
    deadline = time.monotonic() + 10
    while True:
        lines = [
            line
            for line in gw.output().splitlines()
            if "tollgate.access" in line and f"deployment={model} " in line
        ]
        if lines:
            return lines[-1]
        assert time.monotonic() < deadline, f"no access log line for {model}"
        time.sleep(0.05)


def test_garbage_sse_from_upstream_is_relayed_and_the_call_settled(gateway: Gateway) -> None:
    status, received = stream_from(gateway, "garbage-sse")
    assert status == 200
    assert b"this is not an event" in received  # relayed as it came, not reinterpreted
    assert b"data: [DONE]" in received
    line = access_line(gateway, "garbage-sse")
    assert "status=200" in line
    assert "Traceback" not in gateway.output()
    normal_call(gateway)


def test_an_sse_stream_without_a_final_newline_ends_cleanly(gateway: Gateway) -> None:
    status, received = stream_from(gateway, "unterminated-sse")
    assert status == 200
    assert b'"content": "cut"' in received
    access_line(gateway, "unterminated-sse")
    assert "Traceback" not in gateway.output()
    normal_call(gateway)


def test_a_one_megabyte_sse_line_is_relayed_whole(gateway: Gateway) -> None:
    status, received = stream_from(gateway, "huge-line-sse")
    assert status == 200
    assert received.count(b"m") >= MEGABYTE  # the whole line, not cut or dropped
    assert b"data: [DONE]" in received
    access_line(gateway, "huge-line-sse")
    assert "Traceback" not in gateway.output()
    normal_call(gateway)


def test_one_100_kib_upstream_header_line_is_a_502(gateway: Gateway) -> None:
    response = httpx.post(
        f"{gateway.url}/openai/deployments/huge-header-line/chat/completions",
        content=CHAT_BODY,
        headers={"Api-Key": KEY, "Content-Type": "application/json"},
        timeout=20,
    )
    assert response.status_code == 502, response.text
    assert response.json()["error"]["message"]
    assert "x-filler" not in response.headers
    assert "Traceback" not in gateway.output()
    normal_call(gateway)


def test_100_kib_of_upstream_headers_is_an_answer_or_a_502_never_a_crash(
    gateway: Gateway,
) -> None:
    """100 header lines of 1 KiB each: within the client parser's per-line limits, so relayed
    (or refused with 502); the gateway answers and carries on."""
    response = httpx.post(
        f"{gateway.url}/openai/deployments/huge-headers/chat/completions",
        content=CHAT_BODY,
        headers={"Api-Key": KEY, "Content-Type": "application/json"},
        timeout=20,
    )
    assert response.status_code in (200, 502), response.text
    if response.status_code == 200:
        assert response.json()["usage"]["prompt_tokens"] == 1
    else:
        assert response.json()["error"]["message"]
    assert "status=200" in access_line(gateway, "huge-headers") or response.status_code == 502
    assert "Traceback" not in gateway.output()
    normal_call(gateway)


@pytest.mark.slow
def test_an_endless_upstream_stream_ends_with_its_client(
    gateway: Gateway, raw: RawUpstream
) -> None:
    """An upstream that never ends its stream: the client reads 256 KiB and goes; the gateway
    serves others meanwhile, reads on for the usage for a bounded time only, then closes the
    upstream connection and settles the call."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        path = "/openai/deployments/endless-sse/chat/completions"
        sock.sendall(head(path=path, extra=f"Content-Length: {len(STREAM_BODY)}\r\n") + STREAM_BODY)
        received = b""
        while len(received) < 256 * 1024:
            chunk = sock.recv(65536)
            assert chunk, "the gateway closed the endless stream by itself"
            received += chunk
    assert received.startswith(b"HTTP/1.1 200")
    assert b'"content": "more"' in received
    normal_call(gateway)  # served while the endless upstream is still sending
    assert raw.endless_ended.wait(DRAIN_BOUND_S + 15), "the gateway kept reading the upstream"
    access_line(gateway, "endless-sse")
    normal_call(gateway)
    assert "Traceback" not in gateway.output()
