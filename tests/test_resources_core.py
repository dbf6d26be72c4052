"""Buckets, their names and resource paths (compatibility C82, C83, C84): DIAL's encryption
test vectors, the embedded default pair, `GET /v1/bucket`'s body, and hostile resource URLs
that must be refused with DIAL's message or stay inside their bucket."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tollgate.errors import GatewayError
from tollgate.resources.buckets import (
    appdata_path,
    bucket_answer,
    initiator_location,
    location_of,
    user_location,
)
from tollgate.resources.encryption import (
    STORED_PAIR_KEY,
    BucketCipher,
    base58_decode,
    base58_encode,
    bucket_cipher,
    cipher_from_settings,
    load_or_create,
)
from tollgate.resources.paths import ResourcePath, parse_url
from tollgate.security.principal import Principal
from tollgate.settings import SettingsError
from tollgate.storage.filesystem import FilesystemStore
from tollgate.storage.store import check_folder, check_key

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


# --- buckets ---------------------------------------------------------------------------------

PROJECT_KEY = Principal(
    project="EPM-RTC-GPT", roles=("r",), role_set=frozenset({"r"}), key_fingerprint="abcd1234"
)
PER_REQUEST_KEY = Principal(
    project="EPM-RTC-GPT",
    roles=("r",),
    role_set=frozenset({"r"}),
    key_fingerprint="abcd1234",
    source_deployment="EPM-RTC-RAIL",
)
GPT, RAIL = VECTORS[0][1], VECTORS[1][1]


def test_bucket_of_a_project_key() -> None:
    assert initiator_location(PROJECT_KEY) == "Keys/EPM-RTC-GPT/"
    assert user_location(PROJECT_KEY) == "Keys/EPM-RTC-GPT/"
    assert appdata_path(PROJECT_KEY) is None
    assert bucket_answer(PROJECT_KEY, CIPHER) == {"bucket": GPT}


def test_bucket_of_a_per_request_key() -> None:
    # DIAL's FileApiTest: the key given to EPM-RTC-RAIL by a call of project EPM-RTC-GPT.
    assert initiator_location(PER_REQUEST_KEY) == "Keys/EPM-RTC-GPT/"
    assert user_location(PER_REQUEST_KEY) == "Keys/EPM-RTC-RAIL/"
    assert appdata_path(PER_REQUEST_KEY) == "appdata/EPM-RTC-RAIL"
    assert bucket_answer(PER_REQUEST_KEY, CIPHER) == {
        "bucket": RAIL,
        "appdata": f"{GPT}/appdata/EPM-RTC-RAIL",
    }
    # `via` gives the same principal as the tuple built by hand.
    assert bucket_answer(PROJECT_KEY.via("EPM-RTC-RAIL"), CIPHER) == bucket_answer(
        PER_REQUEST_KEY, CIPHER
    )


def test_appdata_of_a_custom_application() -> None:
    principal = Principal(
        project="p",
        roles=("r",),
        role_set=frozenset({"r"}),
        key_fingerprint="abcd1234",
        source_deployment=f"applications/{GPT}/my app@1",
    )
    answer = bucket_answer(principal, CIPHER)
    assert answer["appdata"] == f"{CIPHER.encrypt('Keys/p/')}/appdata/applications/{GPT}/my%20app@1"
    assert location_of(answer["bucket"], CIPHER) == f"Keys/applications/{GPT}/my app@1/"


@pytest.mark.parametrize(
    ("text", "location"),
    [
        ("Keys/p/", "Keys/p/"),
        ("Users/alice/", "Users/alice/"),
        ("Keys/applications/b/app/", "Keys/applications/b/app/"),
        ("public/", None),
        ("Keys/p", None),
        ("Keys//", None),
        ("Keys/../", None),
        ("Keys/./", None),
        ("Keys/a/../", None),
        ("Users/a\\b/", None),
        ("Users/a\x00/", None),
        ("Keys/.tollgate-lock/", None),
        ("platform/", None),
        ("invitation-id", None),
        ("", None),
    ],
)
def test_location_of(text: str, location: str | None) -> None:
    assert location_of(CIPHER.encrypt(text), CIPHER) == location
    assert location_of("public", CIPHER) == "public/"
    assert location_of("testbucket", CIPHER) is None


# --- paths -----------------------------------------------------------------------------------


def test_parse_an_item() -> None:
    path = parse_url(f"conversations/{GPT}/folder/sub/conversation%201%40", CIPHER)
    assert path == ResourcePath(
        "conversations",
        GPT,
        "Keys/EPM-RTC-GPT/",
        ("folder", "sub", "conversation 1@"),
        False,
    )
    assert path.url == f"conversations/{GPT}/folder/sub/conversation%201@"
    assert path.storage_key == "Keys/EPM-RTC-GPT/conversations/folder/sub/conversation 1@"
    assert (path.name, path.parent_path) == ("conversation 1@", "folder/sub")
    assert path.resource_type == "CONVERSATION"
    assert not path.is_folder and not path.is_root


def test_parse_folders_and_the_root() -> None:
    root = parse_url(f"files/{GPT}/", CIPHER)
    assert root.is_root and root.is_folder
    assert (root.name, root.parent_path) == (None, None)
    assert root.url == f"files/{GPT}/"
    assert root.storage_key == "Keys/EPM-RTC-GPT/files/"
    folder = parse_url(f"files/{GPT}/a/b%2Bc/", CIPHER)
    assert folder.segments == ("a", "b+c") and folder.is_folder
    assert (folder.name, folder.parent_path) == ("b+c", "a")
    assert folder.url == f"files/{GPT}/a/b+c/"
    assert folder.storage_key == "Keys/EPM-RTC-GPT/files/a/b+c/"
    top = parse_url(f"prompts/{GPT}/p", CIPHER)
    assert (top.name, top.parent_path) == ("p", None)
    public = parse_url("applications/public/team/app", CIPHER)
    assert public.storage_key == "public/applications/team/app"
    assert public.url == "applications/public/team/app"


def test_canonical_url_re_encodes() -> None:
    path = parse_url(f"files/{GPT}/%7e%41 ü%2b/x%25y", CIPHER)
    assert path.segments == ("~A ü+", "x%y")
    assert path.url == f"files/{GPT}/~A%20%C3%BC+/x%25y"
    assert parse_url(path.url, CIPHER) == path


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("files", "Url has less than two segments: files"),
        ("files/", "Url has less than two segments: files/"),
        ("", "Url has less than two segments: "),
        (f"files/{GPT}", f"Url must start with resource/bucket/, but: files/{GPT}"),
        (f"toolsets/{GPT}/x", "Unsupported resource type: toolsets"),
        (f"invitations/{GPT}/x", "Unsupported resource type: invitations"),
        ("files/testbucket/", "Url has invalid bucket: files/testbucket/"),
        ("files//x", "Url has invalid bucket: files//x"),
        (f"files/{GPT}%20/x", f"Url has invalid bucket: files/{GPT}%20/x"),
        (f"files/{CIPHER.encrypt('platform/')}/x", None),
    ],
)
def test_url_errors(url: str, message: str | None) -> None:
    with pytest.raises(GatewayError) as caught:
        parse_url(url, CIPHER)
    assert caught.value.status == 400
    if message is not None:
        assert caught.value.message == message
    else:
        assert caught.value.message.startswith("Url has invalid bucket: ")


INVALID = "Invalid path provided "
DOT = "Resource name and/or parent folders must not end with .(dot)"
TOO_LONG = "Resource path exceeds max allowed size: 900"
# Hostile paths after `files/<bucket>/`: the message DIAL's rules give, or None where the
# path is accepted (and must then stay inside the bucket).
HOSTILE: list[tuple[str, str | None]] = [
    ("..", INVALID + ".."),
    (".", INVALID + "."),
    ("../x", INVALID + "../x"),
    ("a/../../b", INVALID + "a/../../b"),
    ("a/./b", INVALID + "a/./b"),
    ("../", INVALID + "../"),
    ("%2e%2e", INVALID + "%2e%2e"),
    ("%2E%2E/x", INVALID + "%2E%2E/x"),
    ("a/%2e%2e/b", INVALID + "a/%2e%2e/b"),
    (".%2e", INVALID + ".%2e"),
    ("%2e.", INVALID + "%2e."),
    ("%2e", INVALID + "%2e"),
    ("..%2f", INVALID + "..%2f"),
    ("..%2Fx", INVALID + "..%2Fx"),
    ("%2F", INVALID + "%2F"),
    ("a%2Fb", INVALID + "a%2Fb"),
    ("a%2f..%2fb", INVALID + "a%2f..%2fb"),
    ("a\\b", INVALID + "a\\b"),
    ("..\\x", INVALID + "..\\x"),
    ("%5C", INVALID + "%5C"),
    ("a%5c..%5cb", INVALID + "a%5c..%5cb"),
    ("a\x00b", INVALID + "a\x00b"),
    ("%00", INVALID + "%00"),
    ("a%00.txt", INVALID + "a%00.txt"),
    ("%0a", INVALID + "%0a"),
    ("%0D%0Ax", INVALID + "%0D%0Ax"),
    ("a\tb", INVALID + "a\tb"),
    ("%7f", INVALID + "%7f"),
    ("%C0%AE%C0%AE", INVALID + "%C0%AE%C0%AE"),
    ("%C0%AE", INVALID + "%C0%AE"),
    ("%E0%80%AE%E0%80%AE", INVALID + "%E0%80%AE%E0%80%AE"),
    ("%C0%AF", INVALID + "%C0%AF"),
    ("%ff", INVALID + "%ff"),
    ("%", INVALID + "%"),
    ("a%2", INVALID + "a%2"),
    ("%zz", INVALID + "%zz"),
    ("a//b", INVALID + "a//b"),
    ("/a", INVALID + "/a"),
    ("a//", INVALID + "a//"),
    ("//", INVALID + "//"),
    ("{", INVALID + "{"),
    ("a}", INVALID + "a}"),
    ("%7B%7D", INVALID + "%7B%7D"),
    ("\ud800", INVALID + "\ud800"),
    ("%ED%A0%80", INVALID + "%ED%A0%80"),  # an encoded surrogate
    (".tollgate-lock", INVALID + ".tollgate-lock"),
    ("a?b=1", "Wrong path provided a?b=1"),
    ("x/a#frag", "Wrong path provided a#frag"),
    ("x" * 901, TOO_LONG),
    ("a/" * 450 + "b", TOO_LONG),
    # Accepted: ordinary names, kept as given.
    ("\u2025", None),  # ‥
    ("\u2025/x", None),
    ("\uff0e\uff0e", None),  # two FULLWIDTH FULL STOPs
    ("%EF%BC%8E%EF%BC%8E", None),  # the same, encoded
    ("%252e%252e", None),  # the name `%2e%2e`
    ("%25", None),
    ("...", None),  # refused on write (ends with a dot)
    ("a.", None),
    (".a", None),
    ("a..b", None),
    ("a b+c", None),
    ("%E2%80%AE", None),  # RIGHT-TO-LEFT OVERRIDE: not a control character below 0x20
]


@pytest.mark.parametrize(("relative", "message"), HOSTILE)
def test_hostile_paths(relative: str, message: str | None) -> None:
    for group in ("files", "conversations"):
        url = f"{group}/{GPT}/{relative}"
        if message is not None:
            with pytest.raises(GatewayError) as caught:
                parse_url(url, CIPHER)
            assert (caught.value.status, caught.value.message) == (400, message)
            continue
        path = parse_url(url, CIPHER)
        _assert_inside(path, "Keys/EPM-RTC-GPT/", group)


def _assert_inside(path: ResourcePath, location: str, group: str) -> None:
    assert path.location == location
    assert path.storage_key.startswith(location + group + "/")
    assert all(segment not in (".", "..", "") for segment in path.segments)
    assert all("/" not in segment and "\\" not in segment for segment in path.segments)
    if path.is_folder:
        check_folder(path.storage_key)
    else:
        check_key(path.storage_key)
    assert parse_url(path.url, CIPHER) == path


def test_length_limit_counts_the_whole_key_in_bytes() -> None:
    room = 900 - len(b"Keys/EPM-RTC-GPT/files/")
    assert parse_url(f"files/{GPT}/{'x' * room}", CIPHER).name == "x" * room
    with pytest.raises(GatewayError, match=TOO_LONG):
        parse_url(f"files/{GPT}/{'x' * (room + 1)}", CIPHER)
    # Two bytes a character once decoded.
    with pytest.raises(GatewayError, match=TOO_LONG):
        parse_url(f"files/{GPT}/{'ü' * (room // 2 + 1)}", CIPHER)


@pytest.mark.parametrize(
    "relative", ["a.", "a./b", "x/y./z", "...", "a/b.", "%2e%2e%2e", "f%2E/x", "ends/."]
)
def test_trailing_dot_on_write(relative: str) -> None:
    url = f"files/{GPT}/{relative}"
    with pytest.raises(GatewayError) as caught:
        parse_url(url, CIPHER, write=True)
    assert caught.value.status == 400
    if relative == "ends/.":
        assert caught.value.message == INVALID + relative
        return
    assert caught.value.message == DOT
    assert parse_url(url, CIPHER).segments[-1]  # a read is allowed (it finds nothing)


def test_write_of_ordinary_names() -> None:
    path = parse_url(f"files/{GPT}/.hidden/a.b/c", CIPHER, write=True)
    assert path.storage_key == "Keys/EPM-RTC-GPT/files/.hidden/a.b/c"


_PIECES = [
    *"ab.%/\\{}?#+ 2eEfF05cC",
    *("%2e", "%2E", "%2f", "%2F", "%5c", "%00", "%C0%AE", "..", "\u2025", "\uff0e", "\x00"),
    *("\n", "\u00fc", "%25", "%C3%BC", "\ud800"),
]
_URL_TEXT = st.lists(st.sampled_from(_PIECES), max_size=24).map("".join)


@settings(max_examples=600, deadline=None)
@given(
    group=st.sampled_from(["files", "conversations", "prompts", "applications"]),
    bucket=st.sampled_from([GPT, RAIL, "public"]),
    relative=_URL_TEXT,
    write=st.booleans(),
)
def test_any_accepted_url_stays_inside_its_bucket(
    group: str, bucket: str, relative: str, write: bool
) -> None:
    try:
        path = parse_url(f"{group}/{bucket}/{relative}", CIPHER, write=write)
    except GatewayError as exc:
        assert exc.status == 400
        return
    location = "public/" if bucket == "public" else CIPHER.decrypt(bucket)
    assert location is not None
    _assert_inside(path, location, group)
    assert len(path.storage_key.encode("utf-8")) <= 900


@settings(max_examples=300, deadline=None)
@given(relative=st.text(max_size=60))
def test_any_text_is_refused_or_inside(relative: str) -> None:
    try:
        path = parse_url(f"files/{GPT}/{relative}", CIPHER)
    except GatewayError as exc:
        assert exc.status == 400
        return
    _assert_inside(path, "Keys/EPM-RTC-GPT/", "files")
