"""Hardening outside the relay (issue 11): client addresses behind proxies (item 1) and the
credentials the reload answer shows (item 7). Real processes, raw HTTP where headers matter."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import FakeModel, Gateway, start_gateway, stop

TEN_KEY = "xff-key-ten-0123456789"


@pytest.fixture(scope="module")
def proxied(work_dir: Path, fake_model: FakeModel) -> Iterator[Gateway]:
    config = {
        "models": {"m": {"endpoint": fake_model.endpoint("m")}},
        "keys": {
            TEN_KEY: {"project": "p", "role": "r", "allowedIpAddressRanges": ["10.0.0.0/8"]},
        },
        "roles": {"r": {"limits": {"m": {}}}},
    }
    gw = start_gateway(work_dir, [config], env={"aidial.apiKeyValidation.proxyCount": "1"})
    yield gw
    stop(gw.process)


def raw_get(port: int, path: str, headers: list[tuple[str, str]]) -> tuple[int, bytes]:
    """One HTTP/1.1 request with exactly these header lines (repeated names kept); the status
    and the body of the answer."""
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.mark.parametrize(
    ("lines", "status"),
    [
        # The client forges 10.1.2.3; the proxy appends the address it saw on a line of its own.
        (["10.1.2.3", "198.51.100.7"], 403),
        (["10.1.2.3, 10.9.9.9", "198.51.100.7"], 403),
        # The proxy saw 10.1.2.3: whatever the client claimed before does not matter.
        (["198.51.100.7", "10.1.2.3"], 200),
        (["198.51.100.7"], 403),
        (["10.1.2.3"], 200),
    ],
)
def test_every_forwarded_for_line_is_read_as_one_list(
    proxied: Gateway, lines: list[str], status: int
) -> None:
    headers = [("Api-Key", TEN_KEY)] + [("X-Forwarded-For", line) for line in lines]
    got, body = raw_get(proxied.port, "/v1/user/info", headers)
    assert got == status, body
    if status == 403:
        assert b"198.51.100.7" in body or b"10.9.9.9" in body  # the address it judged
