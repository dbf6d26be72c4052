"""Bucket names: DIAL's EncryptionService, byte for byte (compatibility C82).

A bucket's location (`Keys/<project>/`, `Users/<user>/`) never appears in a URL; clients see its
name, the location encrypted and Base58-encoded. DIAL derives an AES-256 key with
PBKDF2-HMAC-SHA256 (password `encryption.secret`, salt the UTF-8 bytes of `encryption.key`,
3000 iterations) and encrypts with AES-CBC, PKCS#7 padding and a fixed IV, so the same location
always has the same name, and any instance holding the pair can turn a name back into its
location. Decryption is also the check that a name is genuine: a name nobody encrypted fails
its padding or its UTF-8 and is refused.

DIAL refuses to start without both settings; Tollgate needs neither (compatibility C82). Without
them, `load_or_create` reads a pair from the resource store (`platform/encryption.json`), or
makes a random one and stores it, so one instance needs nothing and every instance on one store
gives the same bucket names. An operator who wants the names DIAL gives (the same buckets seen
through DIAL and Tollgate, or moved from one to the other) sets `encryption.secret` and
`encryption.key` to DIAL's values; they then win over the stored pair.
"""

from __future__ import annotations

import hashlib
import secrets
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import orjson
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from tollgate.settings import SettingsError
from tollgate.storage.store import PreconditionFailed, ResourceStore

ITERATIONS = 3000
KEY_BYTES = 32  # AES-256
# DIAL's fixed IV: bytes [25, -13, -25, -119, -42, 117, -118, -128, -101, 20, -103, -81, -48,
# -23, -54, -113] in Java's signed notation.
IV = bytes.fromhex("19f3e789d6758a809b1499afd0e9ca8f")
ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"  # Bitcoin's Base58
_DIGITS = {ch: index for index, ch in enumerate(ALPHABET)}
# A name longer than this is refused unread: Base58 decoding costs the square of the length, and
# a bucket location of DIAL's 900-byte path limit encrypts to about 1,250 characters.
MAX_NAME_CHARS = 2048
CACHE_SIZE = 1024  # locations (and names) remembered per cipher
STORED_PAIR_KEY = "platform/encryption.json"
SECRET_SETTING = "encryption.secret"
KEY_SETTING = "encryption.key"
OBSOLETE_SETTINGS = ("password", "salt")


def base58_encode(data: bytes) -> str:
    """Bitcoin's Base58: the bytes as one big-endian number, each leading zero byte as `1`."""
    zeros = len(data) - len(data.lstrip(b"\0"))
    number = int.from_bytes(data, "big")
    digits: list[str] = []
    while number:
        number, digit = divmod(number, 58)
        digits.append(ALPHABET[digit])
    return "1" * zeros + "".join(reversed(digits))


def base58_decode(text: str) -> bytes | None:
    """The bytes `text` encodes, or None if a character is not in the alphabet."""
    number = 0
    for ch in text:
        digit = _DIGITS.get(ch)
        if digit is None:
            return None
        number = number * 58 + digit
    zeros = len(text) - len(text.lstrip("1"))
    body = number.to_bytes((number.bit_length() + 7) // 8, "big") if number else b""
    return b"\0" * zeros + body


def derive_key(secret: str, key: str) -> bytes:
    """The AES key DIAL derives from `encryption.secret` and `encryption.key`."""
    return hashlib.pbkdf2_hmac(
        "sha256", secret.encode("utf-8"), key.encode("utf-8"), ITERATIONS, KEY_BYTES
    )


class BucketCipher:
    """Encrypts bucket locations into bucket names and back, as DIAL does.

    The AES key is derived once, when the cipher is made. The same few locations are encrypted
    on every call (a caller's own bucket, its initiator's), so the last `CACHE_SIZE` results of
    each direction are kept; a name that fails to decrypt is not remembered (anyone can send
    one).
    """

    __slots__ = ("_decrypted", "_encrypted", "_key")

    def __init__(self, secret: str, key: str) -> None:
        if not secret or not key:
            raise ValueError("an encryption secret and key are both needed")
        self._key = derive_key(secret, key)
        self._encrypted: OrderedDict[str, str] = OrderedDict()
        self._decrypted: OrderedDict[str, str] = OrderedDict()

    def __repr__(self) -> str:
        return "BucketCipher(...)"  # never the key

    def _cipher(self) -> Cipher[modes.CBC]:
        return Cipher(algorithms.AES(self._key), modes.CBC(IV))

    def encrypt(self, text: str) -> str:
        """The Base58 name of `text` (a bucket location, or any text DIAL encrypts)."""
        cached = self._encrypted.get(text)
        if cached is not None:
            self._encrypted.move_to_end(text)
            return cached
        padder = padding.PKCS7(128).padder()
        plain = padder.update(text.encode("utf-8")) + padder.finalize()
        encryptor = self._cipher().encryptor()
        name = base58_encode(encryptor.update(plain) + encryptor.finalize())
        _remember(self._encrypted, text, name)
        _remember(self._decrypted, name, text)
        return name

    def decrypt(self, name: str) -> str | None:
        """The text `name` encrypts, or None if it is not a name this cipher made (not Base58,
        not whole AES blocks, bad padding, not UTF-8)."""
        cached = self._decrypted.get(name)
        if cached is not None:
            self._decrypted.move_to_end(name)
            return cached
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS:
            return None
        data = base58_decode(name)
        if not data or len(data) % 16:
            return None
        decryptor = self._cipher().decryptor()
        plain = decryptor.update(data) + decryptor.finalize()
        unpadder = padding.PKCS7(128).unpadder()
        try:
            text = (unpadder.update(plain) + unpadder.finalize()).decode("utf-8")
        except ValueError:  # bad padding; UnicodeDecodeError is a ValueError too
            return None
        _remember(self._decrypted, name, text)
        return text


def _remember(cache: OrderedDict[str, str], key: str, value: str) -> None:
    cache[key] = value
    if len(cache) > CACHE_SIZE:
        cache.popitem(last=False)


def _setting(section: Mapping[str, Any], name: str) -> str | None:
    value = section.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise SettingsError(f"setting encryption.{name}: expected a string, got {value!r}")
    return value


def cipher_from_settings(raw: Mapping[str, Any]) -> BucketCipher | None:
    """The cipher of `encryption.secret` and `encryption.key` in the merged static settings
    (`Settings.raw`), or None when neither is set (then `load_or_create` gives one).

    As DIAL: setting only one of them is an error, and so are DIAL's obsolete
    `encryption.password` and `encryption.salt` (DIAL refuses to start with them). An empty
    string counts as unset, as an empty environment variable does.
    """
    section = raw.get("encryption")
    if section is None:
        return None
    if not isinstance(section, Mapping):
        raise SettingsError(f"setting encryption: expected an object, got {section!r}")
    obsolete = [name for name in OBSOLETE_SETTINGS if section.get(name) is not None]
    if obsolete:
        names = ", ".join(f"encryption.{name}" for name in obsolete)
        raise SettingsError(
            f"setting encryption: Unsupported encryption properties ({names}); "
            f"set {SECRET_SETTING} and {KEY_SETTING} instead"
        )
    secret = _setting(section, "secret")
    key = _setting(section, "key")
    if secret is None and key is None:
        return None
    if secret is None:
        raise SettingsError(f"setting {SECRET_SETTING}: Encryption secret is not set")
    if key is None:
        raise SettingsError(f"setting {KEY_SETTING}: Encryption key is not set")
    return BucketCipher(secret, key)


def _stored_pair(data: bytes) -> BucketCipher:
    try:
        pair = orjson.loads(data)
        secret, key = pair["secret"], pair["key"]
        if not isinstance(secret, str) or not isinstance(key, str) or not secret or not key:
            raise TypeError
    except (orjson.JSONDecodeError, KeyError, TypeError):
        # Never replaced silently: a new pair would rename every bucket.
        raise SettingsError(
            f"resource store object {STORED_PAIR_KEY}: expected "
            '{"secret": "...", "key": "..."}; repair it, or set encryption.secret and '
            "encryption.key"
        ) from None
    return BucketCipher(secret, key)


async def load_or_create(store: ResourceStore) -> BucketCipher:
    """The cipher of the pair kept in the store, made (two random 256-bit strings) and stored
    on the first start; when several instances start at once, the first write wins and the
    others read it."""
    for _ in range(3):
        blob = await store.get(STORED_PAIR_KEY)
        if blob is not None:
            return _stored_pair(blob.data)
        pair = {"secret": secrets.token_urlsafe(32), "key": secrets.token_urlsafe(32)}
        try:
            await store.put(STORED_PAIR_KEY, orjson.dumps(pair), if_none_match=True)
        except PreconditionFailed:
            continue  # another instance stored its pair first: read theirs
        return BucketCipher(pair["secret"], pair["key"])
    raise SettingsError(f"resource store object {STORED_PAIR_KEY}: cannot be read or created")


async def bucket_cipher(raw: Mapping[str, Any], store: ResourceStore) -> BucketCipher:
    """The settings' cipher if both settings are given, else the store's pair."""
    cipher = cipher_from_settings(raw)
    return cipher if cipher is not None else await load_or_create(store)
