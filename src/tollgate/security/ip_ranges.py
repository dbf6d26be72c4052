"""Client IP ranges of a key and the client address behind proxies (compatibility C11)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class IpRanges:
    """A precomputed set of CIDR ranges; an empty set admits no address."""

    __slots__ = ("_v4", "_v6")

    def __init__(self, cidrs: Iterable[str]) -> None:
        networks = [ipaddress.ip_network(cidr, strict=False) for cidr in cidrs]
        self._v4 = tuple(n for n in networks if isinstance(n, ipaddress.IPv4Network))
        self._v6 = tuple(n for n in networks if isinstance(n, ipaddress.IPv6Network))

    def admits(self, address: str) -> bool:
        """DIAL compares bytes under the mask: IPv4 never matches an IPv6 range and vice versa."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv4Address):
            return any(ip in network for network in self._v4)
        return any(ip in network for network in self._v6)


def forwarded_for(headers: Mapping[str, str]) -> list[str]:
    """Every `X-Forwarded-For` line of `headers`, in order (aiohttp's multidict keeps them all;
    a plain mapping holds one)."""
    getall = getattr(headers, "getall", None)
    if getall is not None:
        lines: list[str] = getall("X-Forwarded-For", [])
        return lines
    line = headers.get("X-Forwarded-For")
    return [] if line is None else [line]


def client_address(
    peer: str | None, forwarded_for: Sequence[str] | str | None, proxy_count: int
) -> str:
    """The caller's address: the socket peer, or the `X-Forwarded-For` element `len - proxyCount`.

    `forwarded_for` is every `X-Forwarded-For` line, in order: they are one comma-separated list
    (RFC 9110 5.3, as proxies treat them). A proxy that appends a line of its own (HAProxy's
    `option forwardfor`) leaves the client's forged line first, so reading only the first line
    let a client choose its address. Elements are stripped of spaces (DIAL does not strip them,
    which makes `"a, b"` unusable; we take the evident intent).
    """
    if isinstance(forwarded_for, str):
        forwarded_for = (forwarded_for,)
    if not forwarded_for or proxy_count <= 0:
        return peer or ""
    parts = [part for line in forwarded_for for part in line.split(",")]
    index = len(parts) - proxy_count
    if index < 0:
        return peer or ""
    return parts[index].strip()
