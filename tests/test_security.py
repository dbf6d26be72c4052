"""Keys, IP ranges and per-request keys as plain objects (spec auth-limits 3)."""

from __future__ import annotations

import hashlib
import ipaddress
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tollgate.security.ip_ranges import IpRanges, client_address
from tollgate.security.keys import digest_of, digest_of_name, fingerprint_of_name
from tollgate.security.per_request_keys import PerRequestKeys
from tollgate.security.principal import Principal

ROOT = Principal("proj", ("r1",), frozenset({"r1"}), "abcd1234")


class TestKeyNames:
    def test_plain_and_hashed_names_mean_the_same_key(self) -> None:
        hexdigest = hashlib.sha256(b"secret").hexdigest()
        assert (
            digest_of_name("secret") == digest_of_name(f"sha256:{hexdigest}") == digest_of("secret")
        )
        assert digest_of_name(f"sha256:{hexdigest.upper()}") == digest_of("secret")

    def test_a_malformed_hash_name_is_a_plain_secret(self) -> None:
        assert digest_of_name("sha256:xyz") == digest_of("sha256:xyz")

    def test_fingerprint_shows_no_secret(self) -> None:
        assert (
            fingerprint_of_name("secret")
            == "sha256:" + hashlib.sha256(b"secret").hexdigest()[:8] + "…"
        )


class TestIpRanges:
    def test_host_bits_are_masked(self) -> None:
        ranges = IpRanges(["198.51.100.14/24"])
        assert ranges.admits("198.51.100.200") and not ranges.admits("198.51.101.1")

    def test_families_never_mix(self) -> None:
        assert not IpRanges(["::/0"]).admits("10.0.0.1")
        assert not IpRanges(["0.0.0.0/0"]).admits("::1")
        assert not IpRanges(["0.0.0.0/0"]).admits("::ffff:10.0.0.1")

    def test_empty_admits_nobody_and_garbage_is_refused(self) -> None:
        assert not IpRanges([]).admits("127.0.0.1")
        assert not IpRanges(["0.0.0.0/0"]).admits("not-an-ip")

    @given(st.ip_addresses(v=4), st.integers(min_value=0, max_value=32))
    def test_matches_the_stdlib(self, address: ipaddress.IPv4Address, prefix: int) -> None:
        network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
        probe = network.broadcast_address
        assert IpRanges([f"{address}/{prefix}"]).admits(str(probe))

    @pytest.mark.parametrize(
        ("forwarded", "proxies", "expected"),
        [
            (None, 1, "1.1.1.1"),
            ("2.2.2.2", 0, "1.1.1.1"),
            ("2.2.2.2", 1, "2.2.2.2"),
            ("9.9.9.9, 2.2.2.2", 1, "2.2.2.2"),
            ("9.9.9.9, 2.2.2.2, 3.3.3.3", 2, "2.2.2.2"),
            ("2.2.2.2", 3, "1.1.1.1"),
        ],
    )
    def test_client_address(self, forwarded: str | None, proxies: int, expected: str) -> None:
        assert client_address("1.1.1.1", forwarded, proxies) == expected


class TestPerRequestKeys:
    def test_mint_resolve_invalidate(self) -> None:
        store = PerRequestKeys(ttl_s=60)
        key, handle = store.mint(ROOT, "app")
        assert len(key) == 32 and set(key) <= set(
            "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_"
        )
        principal = store.resolve_digest(digest_of(key))
        assert principal is not None
        assert (principal.project, principal.roles, principal.source_deployment) == (
            "proj",
            ("r1",),
            "app",
        )
        store.invalidate(handle)
        assert store.resolve_digest(digest_of(key)) is None

    def test_keys_expire(self) -> None:
        store = PerRequestKeys(ttl_s=0.05)
        key, _ = store.mint(ROOT, "app")
        time.sleep(0.06)
        assert store.resolve_digest(digest_of(key)) is None
        assert len(store) == 0

    def test_keys_are_unique(self) -> None:
        store = PerRequestKeys(ttl_s=60)
        keys = {store.mint(ROOT, "app")[0] for _ in range(1000)}
        assert len(keys) == 1000 and len(store) == 1000
