"""Hostile and broken clients, over raw sockets on loopback: slow and endless bodies, oversized
headers and bodies, half-closed connections, thousands of idle connections.

Each case is a bounded loop (a fixed number of bytes, connections or seconds); the gateway must
answer with a clear error or close the connection, keep its memory bounded, and keep serving
a normal call meanwhile.
"""

from __future__ import annotations

import contextlib
import resource
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from harness import FakeModel, Gateway, start_gateway, stop

KEY = "hostile-test-key-0123456789abcdef"
MAX_BODY = 64 * 1024
BODY_TIMEOUT_MS = 1500
KEEP_ALIVE_MS = 3000
WRITE_STALL_MS = 1000
IDLE_CONNECTIONS = 3000
CHAT_PATH = "/openai/deployments/chat-model/chat/completions"
CHAT_BODY = orjson.dumps({"messages": [{"role": "user", "content": "Say hello"}]})


@pytest.fixture(scope="module")
def gateway(work_dir: Path, fake_model: FakeModel) -> Iterator[Gateway]:
    # Room for the idle connections in this process and in the gateway (which inherits it).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * IDLE_CONNECTIONS + 512
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    config = {
        "models": {"chat-model": {"type": "chat", "endpoint": fake_model.endpoint("chat-model")}},
        "keys": {KEY: {"project": "hostile", "role": "default"}},
    }
    settings = {
        "resources": {"maxSize": MAX_BODY},
        "server": {
            "bodyReadTimeout": BODY_TIMEOUT_MS,
            "keepAliveTimeout": KEEP_ALIVE_MS,
            "writeStallTimeout": WRITE_STALL_MS,
        },
    }
    gw = start_gateway(work_dir, [config], settings=settings)
    yield gw
    stop(gw.process)
    assert "Traceback" not in gw.output()


def connect(gw: Gateway, timeout: float = 15) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=timeout)
    return sock


def request_head(
    method: str = "POST",
    path: str = CHAT_PATH,
    *,
    length: int | None = len(CHAT_BODY),
    chunked: bool = False,
    extra: str = "",
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Api-Key: {KEY}"]
    lines.append("Content-Type: application/json")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    elif length is not None:
        lines.append(f"Content-Length: {length}")
    head = "\r\n".join(lines) + "\r\n" + extra + "\r\n"
    return head.encode("latin-1")


def read_response(sock: socket.socket, timeout: float = 15) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response from a raw socket (Content-Length or read-to-close bodies)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a full response head: {data[:200]!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        length = int(headers["content-length"])
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    else:
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                body += chunk
    return status, headers, body


def error_message(headers: dict[str, str], body: bytes) -> str:
    assert headers["content-type"].startswith("application/json"), body
    message: str = orjson.loads(body)["error"]["message"]
    return message


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True when the peer closes the connection (EOF or reset) within `timeout` seconds."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


def normal_call(gw: Gateway) -> None:
    response = httpx.post(
        gw.url + CHAT_PATH,
        content=CHAT_BODY,
        headers={"Api-Key": KEY, "Content-Type": "application/json"},
        timeout=15,
    )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# --- slow and endless bodies ------------------------------------------------------------------


def test_a_body_that_never_comes_times_out_with_408(gateway: Gateway) -> None:
    with connect(gateway) as sock:
        sock.sendall(request_head(length=1000) + b'{"messages": ')
        status, headers, body = read_response(sock)  # server.bodyReadTimeout, not forever
    assert status == 408
    assert error_message(headers, body) == "Failed to receive body"
    normal_call(gateway)


def test_a_trickling_body_times_out_with_408(gateway: Gateway) -> None:
    with connect(gateway) as sock:
        sock.sendall(request_head(length=10_000))
        answer: tuple[int, dict[str, str], bytes] | None = None
        sock.settimeout(0.2)
        for _ in range(100):  # one byte every 0.2 s, for 20 s at most
            try:
                sock.sendall(b" ")
                peek = sock.recv(65536, socket.MSG_PEEK)
            except TimeoutError:
                continue
            except OSError:
                break
            if peek:
                break
        answer = read_response(sock)
    status, headers, body = answer
    assert status == 408
    assert error_message(headers, body) == "Failed to receive body"


def test_a_chunked_body_over_the_limit_is_refused_with_413(gateway: Gateway) -> None:
    chunk = b"x" * 8192
    framed = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    with connect(gateway) as sock:
        sock.sendall(request_head(chunked=True))
        with contextlib.suppress(OSError):  # the gateway may stop reading once it has answered
            for _ in range(4 * MAX_BODY // len(chunk)):  # up to 4 times the limit, then stop
                sock.sendall(framed)
        status, headers, body = read_response(sock)
    assert status == 413
    assert error_message(headers, body) == "Request body is too large"
    normal_call(gateway)


def test_a_declared_length_over_the_limit_is_refused_before_any_body(gateway: Gateway) -> None:
    with connect(gateway) as sock:
        sock.sendall(request_head(length=10 * 1024 * 1024 * 1024))
        status, headers, body = read_response(sock)
    assert status == 413
    assert error_message(headers, body) == "Request body is too large"


def test_an_endless_chunked_body_on_any_path_ends_in_a_bounded_time(gateway: Gateway) -> None:
    """A path that never reads its body (404 here) still answers, and the rest of an endless
    body does not keep the connection open forever."""
    chunk = b"y" * 8192
    framed = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    with connect(gateway) as sock:
        sock.sendall(request_head(path="/nowhere", chunked=True))
        status, headers, body = read_response(sock)
        assert status == 404
        assert error_message(headers, body) == "No route"
        closed = False
        with contextlib.suppress(OSError):
            sock.settimeout(0.05)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                sock.sendall(framed)
                with contextlib.suppress(TimeoutError):
                    if sock.recv(1) == b"":
                        break
        closed = True
    assert closed
    normal_call(gateway)


# --- headers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        "X-Huge: " + "h" * 20_000 + "\r\n",  # one header line over server.maxHeaderSize
        "".join(f"X-Many-{i}: v\r\n" for i in range(300)),  # over server.maxHeaders
    ],
    ids=["huge-header", "too-many-headers"],
)
def test_oversized_headers_are_refused_cleanly(gateway: Gateway, extra: str) -> None:
    with connect(gateway) as sock:
        sock.sendall(request_head(extra=extra) + CHAT_BODY)
        status, _, _ = read_response(sock)
        assert status in (400, 431)
        assert closed_by_peer(sock, 10)
    normal_call(gateway)


def test_a_huge_request_line_is_refused_cleanly(gateway: Gateway) -> None:
    with connect(gateway) as sock:
        sock.sendall(request_head(path="/" + "p" * 20_000) + CHAT_BODY)
        status, _, _ = read_response(sock)
        assert status in (400, 414, 431)
    normal_call(gateway)


# --- half-closed and dropped connections ------------------------------------------------------


def requests_used(gw: Gateway) -> int:
    response = httpx.get(
        gw.url + "/v1/deployments/chat-model/limits", headers={"Api-Key": KEY}, timeout=15
    )
    used: int = response.json()["dayRequestStats"]["used"]
    return used


def test_a_half_closed_client_is_a_client_gone_and_its_call_still_counts(
    gateway: Gateway,
) -> None:
    """aiohttp (like nginx) takes a client's FIN as the client leaving: the connection is
    closed at once, and the call it sent is still charged (DECISIONS 9)."""
    before = requests_used(gateway)
    with connect(gateway) as sock:
        sock.sendall(request_head() + CHAT_BODY)
        sock.shutdown(socket.SHUT_WR)  # done sending
        assert closed_by_peer(sock, 10)
    deadline = time.monotonic() + 10
    while requests_used(gateway) != before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert requests_used(gateway) == before + 1
    normal_call(gateway)


def test_a_client_that_half_closes_mid_body_does_not_hurt_the_gateway(gateway: Gateway) -> None:
    with connect(gateway) as sock:
        sock.sendall(request_head(length=1000) + b'{"messages": [')
        sock.shutdown(socket.SHUT_WR)
        try:
            status, headers, body = read_response(sock)
        except ConnectionError:
            pass  # closing the connection without an answer is a clear answer too
        else:
            assert status in (400, 422)
            if status == 422:
                assert error_message(headers, body) == "Failed to receive body"
    normal_call(gateway)


def test_clients_that_vanish_mid_request_leave_nothing_behind(gateway: Gateway) -> None:
    for cut in (10, 60, len(request_head()) + 5):
        for _ in range(20):
            with connect(gateway) as sock:
                sock.sendall((request_head(length=len(CHAT_BODY)) + CHAT_BODY)[:cut])
                # Closed with a reset, as a crashed client or a dropped network would.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    normal_call(gateway)


# --- many idle connections --------------------------------------------------------------------


def test_thousands_of_idle_connections_keep_memory_bounded(gateway: Gateway) -> None:
    normal_call(gateway)
    before = rss_kib(gateway.process.pid)
    sockets: list[socket.socket] = []
    try:
        for index in range(IDLE_CONNECTIONS):
            sock = connect(gateway, timeout=10)
            if index % 3 == 1:
                sock.sendall(b"POST " + CHAT_PATH.encode() + b" HTTP/1.1\r\nHost: x\r\n")
            elif index % 3 == 2:
                sock.sendall(request_head(length=2000) + b"{")
            sockets.append(sock)
        # The gateway keeps serving others meanwhile.
        for _ in range(5):
            normal_call(gateway)
        during = rss_kib(gateway.process.pid)
        # Generous: 3000 connections, a third with half a request head, a third with a
        # half-received body, within 96 MiB more than an idle gateway.
        assert during - before < 96 * 1024, (before, during)
        # Idle and half-sent connections are closed by the gateway (server.keepAliveTimeout,
        # server.bodyReadTimeout): none is kept forever.
        deadline = time.monotonic() + KEEP_ALIVE_MS / 1000 + 20
        for sock in sockets:
            remaining = max(0.1, deadline - time.monotonic())
            assert closed_by_peer(sock, remaining)
    finally:
        for sock in sockets:
            sock.close()
    normal_call(gateway)


def test_a_slow_request_head_is_cut_off(gateway: Gateway) -> None:
    """Slow-loris on the headers: a byte now and then does not keep the connection open."""
    with connect(gateway) as sock:
        sock.sendall(b"GET /v1/user/info HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        sock.settimeout(0.25)
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < KEEP_ALIVE_MS / 1000 + 20:
            try:
                sock.sendall(b"a")
                if sock.recv(65536) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except OSError:
                closed = True
                break
    assert closed


def test_expect_100_continue_gets_an_interim_answer_before_the_body(gateway: Gateway) -> None:
    """curl sends `Expect: 100-continue` before bodies over 1 KiB and waits for `100 Continue`
    before it sends the body: the gateway answers it at once, then the call proceeds."""
    with connect(gateway) as sock:
        sock.sendall(request_head(extra="Expect: 100-continue\r\n"))
        sock.settimeout(5)
        interim = b""
        while b"\r\n\r\n" not in interim:
            chunk = sock.recv(1)
            assert chunk, "closed before the interim answer"
            interim += chunk
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n"), interim
        sock.sendall(CHAT_BODY)
        status, _, body = read_response(sock)
    assert status == 200, body
    assert orjson.loads(body)["choices"][0]["message"]["content"]


def test_an_unknown_expectation_is_refused(gateway: Gateway) -> None:
    with connect(gateway) as sock:
        sock.sendall(request_head(extra="Expect: teapot\r\n") + CHAT_BODY)
        status, headers, body = read_response(sock)
    assert status == 417
    assert error_message(headers, body) == "Expectation failed"


def test_a_client_that_stops_reading_a_stream_is_disconnected(gateway: Gateway) -> None:
    """A client that takes none of a streamed answer (`server.writeStallTimeout`) is cut off
    instead of holding its call, its upstream connection and the waiting chunks forever."""
    word = "x" * 6000
    body = orjson.dumps({"messages": [{"role": "user", "content": "Say hello"}], "stream": True})
    head = request_head(length=len(body), extra=f"X-Fake-Reply: {word}\r\nX-Fake-Chunks: 3000\r\n")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: tiny window
    sock.connect(("127.0.0.1", gateway.port))
    with sock:
        sock.sendall(head + body)
        deadline = time.monotonic() + 20
        while "took none of a stream" not in gateway.output():
            assert time.monotonic() < deadline, "the stalled client was never disconnected"
            time.sleep(0.1)
        # Meanwhile and after, others are served.
        assert httpx.post(
            f"{gateway.url}{CHAT_PATH}", headers={"Api-Key": KEY}, json={"messages": []}
        ).status_code in (200, 400)
        received = 0
        with contextlib.suppress(OSError):
            sock.settimeout(10)
            while chunk := sock.recv(65536):
                received += len(chunk)
    assert received < 3000 * len(word)  # cut off, not the whole stream
