"""Buckets, their names and resource paths (compatibility C82, C83, C84): DIAL's encryption
test vectors, the embedded default pair, `GET /v1/bucket`'s body, and hostile resource URLs
that must be refused with DIAL's message or stay inside their bucket."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import pytest

from tollgate.resources.encryption import (
    STORED_PAIR_KEY,
    BucketCipher,
    base58_decode,
    base58_encode,
    bucket_cipher,
    cipher_from_settings,
    load_or_create,
)
from tollgate.settings import SettingsError
from tollgate.storage.filesystem import FilesystemStore

# DIAL Core's test settings: secret `password`, key `salt`.
CIPHER = BucketCipher("password", "salt")
VECTORS = [
    ("Keys/EPM-RTC-GPT/", "3CcedGxCx23EwiVbVmscVktScRyf46KypuBQ65miviST"),
    ("Keys/EPM-RTC-RAIL/", "7G9WZNcoY26Vy9D7bEgbv6zqbJGfyDp9KZyEbJR4XMZt"),
    ("Users/user/", "Tv2SsFTR7PQ1rWgFkdZqtk"),
    ("Users/admin/", "4X25dj1mja51jykqxsXnCH"),
]


# --- encryption ------------------------------------------------------------------------------


@pytest.mark.parametrize(("location", "name"), VECTORS)
def test_dial_vectors(location: str, name: str) -> None:
    assert BucketCipher("password", "salt").encrypt(location) == name
    assert BucketCipher("password", "salt").decrypt(name) == location
    # Cached answers are the same answers.
    assert CIPHER.encrypt(location) == name
    assert CIPHER.encrypt(location) == name
    assert CIPHER.decrypt(name) == location


@pytest.mark.parametrize(
    "text", ["", "a", "Keys/p/", "Users/ünïcødé ✓/", "x" * 15, "x" * 16, "x" * 17, "k" * 900]
)
def test_round_trip(text: str) -> None:
    cipher = BucketCipher("s", "k")
    name = cipher.encrypt(text)
    assert name.isalnum()
    assert BucketCipher("s", "k").decrypt(name) == text
    assert BucketCipher("other", "k").decrypt(name) != text


def test_base58() -> None:
    for data in (b"", b"\0", b"\0\0\1", b"\xff" * 20, secrets.token_bytes(33)):
        assert base58_decode(base58_encode(data)) == data
    assert base58_encode(b"\0\0") == "11"
    assert base58_encode(b"hello world") == "StV1DL6CwTryKyV"
    assert base58_decode("0OIl") is None


@pytest.mark.parametrize(
    "name",
    [
        "",
        "public",
        "testbucket",
        "0",
        "O0Il",  # not Base58
        "3CcedGxCx23EwiVbVmscVktScRyf46KypuBQ65miviS",  # truncated
        "3CcedGxCx23EwiVbVmscVktScRyf46KypuBQ65miviST1",  # one character more
        "13CcedGxCx23EwiVbVmscVktScRyf46KypuBQ65miviST",  # a leading zero byte more
        "3CcedGxCx23EwiVbVmscVktScRyf46KypuBQ65miviSU",  # last character changed
        "3Cced+xCx23EwiVbVmscVktScRyf46KypuBQ65miviST",
        "Tv2SsFTR7PQ1rWgFkdZqtk/",
        "Tv2SsFTR7PQ1rWgFkdZqt\u0000",
        "z" * 5000,  # refused unread
    ],
)
def test_decrypt_failures(name: str) -> None:
    assert CIPHER.decrypt(name) is None


def test_random_names_do_not_decrypt() -> None:
    # A random 16- or 32-byte block passes PKCS#7 about once in 256 tries, then UTF-8 rarely;
    # whatever decrypts must at least round-trip.
    cipher = BucketCipher("s", "k")
    for _ in range(500):
        name = base58_encode(secrets.token_bytes(secrets.choice((1, 15, 16, 32, 48))))
        text = cipher.decrypt(name)
        assert text is None or cipher.encrypt(text) == name


def test_cipher_repr_hides_the_key() -> None:
    assert "password" not in repr(CIPHER)
    with pytest.raises(ValueError):
        BucketCipher("", "k")


def test_cipher_from_settings() -> None:
    assert cipher_from_settings({}) is None
    assert cipher_from_settings({"encryption": {}}) is None
    assert cipher_from_settings({"encryption": {"secret": "", "key": ""}}) is None
    cipher = cipher_from_settings({"encryption": {"secret": "password", "key": "salt"}})
    assert cipher is not None
    assert cipher.encrypt("Keys/EPM-RTC-GPT/") == VECTORS[0][1]


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"secret": "s"}, "setting encryption.key: Encryption key is not set"),
        ({"key": "k"}, "setting encryption.secret: Encryption secret is not set"),
        ({"secret": "s", "key": "k", "password": "p"}, "Unsupported encryption properties"),
        ({"salt": "x"}, "Unsupported encryption properties"),
        ({"secret": 5, "key": "k"}, "setting encryption.secret: expected a string"),
        ("text", "setting encryption: expected an object"),
    ],
)
def test_cipher_settings_errors(section: object, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        cipher_from_settings({"encryption": section})


async def test_load_or_create(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path)
    first, second = await asyncio.gather(load_or_create(store), load_or_create(store))
    assert first.encrypt("Keys/p/") == second.encrypt("Keys/p/")
    # A later start reads the same pair.
    again = await load_or_create(FilesystemStore(tmp_path))
    assert again.encrypt("Keys/p/") == first.encrypt("Keys/p/")
    assert again.decrypt(first.encrypt("Users/u/")) == "Users/u/"
    # Two stores, two pairs.
    other = await load_or_create(FilesystemStore(tmp_path / "other"))
    assert other.encrypt("Keys/p/") != first.encrypt("Keys/p/")


async def test_many_callers_agree(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path)
    ciphers = await asyncio.gather(*(load_or_create(store) for _ in range(8)))
    assert len({cipher.encrypt("Keys/p/") for cipher in ciphers}) == 1


class _LosingStore(FilesystemStore):
    """A store on which another instance writes its pair between our read and our write."""

    async def put(
        self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False
    ) -> str:
        await super().put(key, b'{"secret": "theirs", "key": "their-key"}', if_none_match=True)
        return await super().put(key, data, if_match=if_match, if_none_match=if_none_match)


async def test_the_loser_of_the_race_reads_the_winner(tmp_path: Path) -> None:
    cipher = await load_or_create(_LosingStore(tmp_path))
    assert cipher.encrypt("Keys/p/") == BucketCipher("theirs", "their-key").encrypt("Keys/p/")
    again = await load_or_create(FilesystemStore(tmp_path))
    assert again.encrypt("Keys/p/") == cipher.encrypt("Keys/p/")


async def test_settings_win_over_the_stored_pair(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path)
    stored = await bucket_cipher({}, store)
    configured = await bucket_cipher({"encryption": {"secret": "password", "key": "salt"}}, store)
    assert configured.encrypt("Keys/EPM-RTC-GPT/") == VECTORS[0][1]
    assert stored.encrypt("Keys/EPM-RTC-GPT/") != VECTORS[0][1]


async def test_corrupt_stored_pair_is_not_replaced(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path)
    await store.put(STORED_PAIR_KEY, b'{"secret": "s"}')
    with pytest.raises(SettingsError, match=r"platform/encryption\.json"):
        await load_or_create(store)
    assert (await store.get(STORED_PAIR_KEY)) is not None
