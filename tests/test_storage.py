"""The resource store's contract, run against both providers: the filesystem folder and a real
S3-protocol server (moto, tests/s3_server.py) through obstore; change notices in process and
over a private redis-server. No part of a store is mocked."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from redis_server import RedisServer, start_redis_server, stop_redis_server
from s3_server import ACCESS_KEY, SECRET_KEY, S3Server, start_s3_server, stop_s3_server
from tollgate.settings import RedisSettings, SettingsError
from tollgate.storage import (
    Change,
    InvalidKey,
    LocalNotices,
    NotFound,
    PreconditionFailed,
    ResourceStore,
    StorageSettings,
    StoreUnavailable,
    Subscription,
    build_notices,
    build_store,
)
from tollgate.storage.filesystem import FilesystemStore

PROVIDERS = ("filesystem", "s3")
pytestmark = pytest.mark.e2e  # a real S3 server process (and a redis-server) for the module


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = start_s3_server(tmp_path_factory.mktemp("s3"))
    yield server
    stop_s3_server(server)


def s3_settings(server: S3Server, bucket: str, **more: Any) -> dict[str, Any]:
    return {
        "provider": "aws-s3",
        "bucket": bucket,
        "endpoint": server.endpoint,
        "identity": ACCESS_KEY,
        "credential": SECRET_KEY,
        **more,
    }


def raw_settings(provider: str, tmp_path: Path, s3: S3Server | None, **more: Any) -> dict[str, Any]:
    """A settings document with a `storage` section for `provider`; a fresh bucket on S3."""
    if provider == "filesystem":
        storage = {"provider": "filesystem", "bucket": "dial", **more}
        return {"storage": storage, "limits": {"embedded": {"file": str(tmp_path / "u.sqlite")}}}
    assert s3 is not None
    bucket = f"t-{uuid.uuid4().hex[:20]}"
    s3.create_bucket(bucket)
    return {"storage": s3_settings(s3, bucket, **more)}


@pytest.fixture(params=PROVIDERS)
def provider(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def settings_doc(provider: str, tmp_path: Path, request: pytest.FixtureRequest) -> dict[str, Any]:
    s3 = request.getfixturevalue("s3_server") if provider == "s3" else None
    return raw_settings(provider, tmp_path, s3)


@pytest_asyncio.fixture
async def store(settings_doc: dict[str, Any], tmp_path: Path) -> AsyncIterator[ResourceStore]:
    resource_store = build_store(StorageSettings.from_raw(settings_doc), tmp_path)
    yield resource_store
    await resource_store.close()


# --- the S3 server itself ---------------------------------------------------------------------


def test_s3_server_honours_preconditions(s3_server: S3Server) -> None:
    """The race tests mean something only if the server checks the conditions itself (asked
    with boto3, AWS's own client, which moto installs; not through the code under test)."""
    import boto3
    from botocore.exceptions import ClientError

    s3 = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name="us-east-1",
    )
    bucket = f"pre-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(bucket)
    first = s3.put_object(Bucket=bucket, Key="k", Body=b"one")
    assert first["ETag"] == f'"{md5(b"one")}"'
    for condition in ({"IfNoneMatch": "*"}, {"IfMatch": '"0123"'}):
        with pytest.raises(ClientError) as refused:
            s3.put_object(Bucket=bucket, Key="k", Body=b"two", **condition)  # type: ignore[arg-type]
        assert refused.value.response["Error"]["Code"] == "PreconditionFailed"
    s3.put_object(Bucket=bucket, Key="k", Body=b"two", IfMatch=first["ETag"])
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"two"
    s3.close()


# --- get / put / delete -----------------------------------------------------------------------


async def test_put_get_head_delete(store: ResourceStore) -> None:
    assert await store.get("Users/alice/files/a.txt") is None
    assert await store.head("Users/alice/files/a.txt") is None
    before = datetime.now(UTC) - timedelta(seconds=5)
    etag = await store.put("Users/alice/files/a.txt", b"hello")
    assert etag == md5(b"hello")  # DIAL's ETag rule on both providers (compatibility C80)
    blob = await store.get("Users/alice/files/a.txt")
    assert blob is not None
    assert (blob.key, blob.data, blob.etag, blob.size) == (
        "Users/alice/files/a.txt",
        b"hello",
        etag,
        5,
    )
    assert before <= blob.last_modified <= datetime.now(UTC) + timedelta(seconds=5)
    head = await store.head("Users/alice/files/a.txt")
    assert head is not None and (head.size, head.etag) == (5, etag)
    await store.delete("Users/alice/files/a.txt")
    assert await store.get("Users/alice/files/a.txt") is None
    with pytest.raises(NotFound):
        await store.delete("Users/alice/files/a.txt")
    # Unicode, spaces: stored decoded, as DIAL's keys are (compatibility C80)
    await store.put("Users/alice/files/report v2 ü.pdf", b"\x00\x01")
    blob = await store.get("Users/alice/files/report v2 ü.pdf")
    assert blob is not None and blob.data == b"\x00\x01"
    assert (await store.put("empty", b"")) == md5(b"")
    empty = await store.get("empty")
    assert empty is not None and empty.data == b""


async def test_etag_changes_with_every_new_content(store: ResourceStore) -> None:
    seen = set()
    for n in range(5):
        etag = await store.put("k", f"version {n}".encode())
        assert etag not in seen
        seen.add(etag)
        blob = await store.get("k")
        assert blob is not None and blob.etag == etag
    # The same bytes again: the same ETag (a content digest, as S3's and DIAL's).
    assert await store.put("k", b"version 4") == etag


async def test_if_none_match_creates_only(store: ResourceStore) -> None:
    etag = await store.put("keys/a", b"first", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        await store.put("keys/a", b"second", if_none_match=True)
    blob = await store.get("keys/a")
    assert blob is not None and (blob.data, blob.etag) == (b"first", etag)


async def test_if_match_replaces_only_that_version(store: ResourceStore) -> None:
    with pytest.raises(PreconditionFailed):  # a missing object matches no ETag
        await store.put("keys/b", b"x", if_match=md5(b"x"))
    with pytest.raises(PreconditionFailed):
        await store.put("keys/b", b"x", if_match="*")
    assert await store.get("keys/b") is None
    first = await store.put("keys/b", b"one")
    second = await store.put("keys/b", b"two", if_match=first)
    with pytest.raises(PreconditionFailed):
        await store.put("keys/b", b"three", if_match=first)
    blob = await store.get("keys/b")
    assert blob is not None and (blob.data, blob.etag) == (b"two", second)
    third = await store.put("keys/b", b"three", if_match="*")
    assert third == md5(b"three")


async def test_delete_if_match(store: ResourceStore) -> None:
    etag = await store.put("keys/c", b"one")
    with pytest.raises(PreconditionFailed):
        await store.delete("keys/c", if_match=md5(b"other"))
    assert await store.get("keys/c") is not None
    await store.delete("keys/c", if_match=etag)
    assert await store.get("keys/c") is None
    with pytest.raises(NotFound):
        await store.delete("keys/c", if_match=etag)


async def test_concurrent_writers_with_one_etag_exactly_one_wins(store: ResourceStore) -> None:
    for round_ in range(5):
        etag = await store.put("race", f"base {round_}".encode())
        results = await asyncio.gather(
            *(store.put("race", f"writer {n}".encode(), if_match=etag) for n in range(8)),
            return_exceptions=True,
        )
        winners = [r for r in results if isinstance(r, str)]
        assert len(winners) == 1, results
        assert all(isinstance(r, PreconditionFailed) for r in results if not isinstance(r, str))
        blob = await store.get("race")
        assert blob is not None and blob.etag == winners[0]
    created = await asyncio.gather(
        *(store.put("once", f"c{n}".encode(), if_none_match=True) for n in range(8)),
        return_exceptions=True,
    )
    assert sum(isinstance(r, str) for r in created) == 1


async def _increment(store: ResourceStore, key: str, times: int) -> int:
    """Compare-and-set increments of a counter; returns how many tries lost a race."""
    lost = 0
    for _ in range(times):
        while True:
            blob = await store.get(key)
            assert blob is not None
            try:
                await store.put(key, str(int(blob.data) + 1).encode(), if_match=blob.etag)
                break
            except PreconditionFailed:
                lost += 1
    return lost


async def test_compare_and_set_loses_no_update(store: ResourceStore) -> None:
    await store.put("counter", b"0")
    lost = await asyncio.gather(*(_increment(store, "counter", 10) for _ in range(4)))
    blob = await store.get("counter")
    assert blob is not None and int(blob.data) == 40
    assert sum(lost) > 0  # the writers did race


INCREMENTER = """
import asyncio, json, sys
from pathlib import Path
from tollgate.storage import PreconditionFailed, StorageSettings, build_store

async def main():
    store = build_store(StorageSettings.from_raw(json.loads(sys.argv[1])), Path(sys.argv[2]))
    sys.stdout.write("ready\\n"); sys.stdout.flush()
    sys.stdin.readline()  # start together
    lost = 0
    for _ in range(int(sys.argv[3])):
        while True:
            blob = await store.get("counter")
            try:
                await store.put("counter", str(int(blob.data) + 1).encode(), if_match=blob.etag)
                break
            except PreconditionFailed:
                lost += 1
    await store.close()
    print(lost)

asyncio.run(main())
"""


async def test_compare_and_set_across_processes(
    store: ResourceStore, settings_doc: dict[str, Any], tmp_path: Path
) -> None:
    """Two processes on one folder (or one bucket) increment one counter: nothing is lost."""
    await store.put("counter", b"0")
    times = 25
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                INCREMENTER,
                json.dumps(settings_doc),
                str(tmp_path),
                str(times),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for process in processes:
            assert process.stdout is not None and process.stdout.readline() == "ready\n"
        for process in processes:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        outputs = [
            await asyncio.to_thread(process.communicate, timeout=120) for process in processes
        ]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert [process.returncode for process in processes] == [0, 0], outputs
    blob = await store.get("counter")
    assert blob is not None and int(blob.data) == 2 * times


@pytest.mark.parametrize("provider", ["filesystem"])
async def test_readers_never_see_a_partial_object(store: ResourceStore, provider: str) -> None:
    """Tollgate's own atomic write (the filesystem provider). An object store's writes are the
    service's: S3 never shows part of an object, but the S3-protocol test server (moto) does,
    for a GET during a PUT (an empty body, or the ETag of no bytes, about 1 run in 8), so
    against it this would test moto, not Tollgate."""
    size = 8 * 1024 * 1024
    versions = [bytes([65 + n]) * size for n in range(3)]
    tags = {md5(v): v[:1] for v in versions}
    await store.put("big", versions[0])
    done = asyncio.Event()
    reads = 0

    async def writer() -> None:
        for n in range(1, 9):
            await store.put("big", versions[n % 3])
        done.set()

    async def reader() -> None:
        nonlocal reads
        while not done.is_set():
            blob = await store.get("big")
            assert blob is not None
            assert len(blob.data) == size
            first = blob.data[:1]
            assert blob.data.count(first) == size, "a mix of two versions"
            assert tags[blob.etag] == first  # the ETag is that of the bytes read
            reads += 1

    await asyncio.gather(writer(), reader(), reader())
    assert reads > 0


BAD_KEYS = (
    "",
    "../escape",
    "a/../../escape",
    "a/..",
    "/etc/passwd",
    "a\\..\\b",
    "a\x00b",
    "a\nb",
    "a//b",
    "a/",
    ".",
    "..",
    "a/./b",
    ".tollgate-locks/00",
    "x" * 1025,
)


@pytest.mark.parametrize("key", BAD_KEYS)
async def test_keys_that_escape_or_break_the_store_are_refused(
    store: ResourceStore, key: str
) -> None:
    with pytest.raises(InvalidKey):
        await store.put(key, b"x")
    with pytest.raises(InvalidKey):
        await store.get(key)
    with pytest.raises(InvalidKey):
        await store.delete(key)


async def test_listing_refuses_escaping_folders(store: ResourceStore) -> None:
    for folder in ("../", "/", "a/../../", "a\\b/"):
        with pytest.raises(InvalidKey):
            await store.list(folder)


def test_filesystem_keys_stay_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    store = FilesystemStore(root)

    async def attempts() -> None:
        for key in BAD_KEYS:
            with pytest.raises(InvalidKey):
                await store.put(key, b"escaped")
        await store.close()

    asyncio.run(attempts())
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and root not in p.parents]
    assert outside == []
    assert [p for p in root.rglob("*") if p.is_file() and ".tollgate-locks" not in p.parts] == []


# --- listings ---------------------------------------------------------------------------------

ORDER_KEYS = ("a-c/x", "a.b", "a/b", "a/b/c", "ab", "a/z/1", "b", "a/b-c")


async def test_listing_pages_in_key_order(store: ResourceStore) -> None:
    keys = [f"Users/u{n % 7}/files/f{n:03d}/obj{n % 3}" for n in range(60)]
    keys += [f"Users/{k}" for k in ORDER_KEYS if k != "a/b"]  # a key cannot be a folder too
    for key in keys:
        await store.put(key, key.encode())
    await store.put("Other/x", b"not listed")
    listed: list[str] = []
    token = None
    pages = 0
    while True:
        page = await store.list("Users/", limit=7, token=token)
        assert len(page.objects) <= 7 and page.folders == ()
        listed += [info.key for info in page.objects]
        pages += 1
        token = page.next_token
        if token is None:
            break
    assert listed == sorted(keys)
    assert pages == -(-len(keys) // 7)
    sizes = {info.key: info.size for info in await store.list_all("Users")}
    assert sizes == {key: len(key.encode()) for key in keys}


async def test_listing_one_folder(store: ResourceStore) -> None:
    for key in ("f/a", "f/b/c", "f/b/d", "f/c-d", "f/e/f/g", "g/x"):
        await store.put(key, b"1")
    page = await store.list("f", recursive=False)
    assert [info.key for info in page.objects] == ["f/a", "f/c-d"]
    assert page.folders == ("f/b/", "f/e/")
    first = await store.list("f/", recursive=False, limit=2)
    assert ([i.key for i in first.objects], first.folders) == (["f/a"], ("f/b/",))
    rest = await store.list("f/", recursive=False, limit=2, token=first.next_token)
    assert ([i.key for i in rest.objects], rest.folders, rest.next_token) == (
        ["f/c-d"],
        ("f/e/",),
        None,
    )
    root = await store.list("", recursive=False)
    assert (root.objects, root.folders) == ((), ("f/", "g/"))
    missing = await store.list("nothing/here/")
    assert (missing.objects, missing.folders, missing.next_token) == ((), (), None)


async def test_delete_leaves_no_empty_folders(store: ResourceStore) -> None:
    await store.put("d/e/f/g", b"1")
    await store.put("d/h", b"1")
    await store.delete("d/e/f/g")
    page = await store.list("d/", recursive=False)
    assert ([i.key for i in page.objects], page.folders) == (["d/h"], ())
    if isinstance(store, FilesystemStore):
        assert not (store.root / "d" / "e").exists()


async def test_listing_many_keys(store: ResourceStore) -> None:
    """More keys under one prefix than one S3 listing request returns (1,000)."""
    keys = [f"keys/platform/key-{n:05d}" for n in range(1100)]
    for start in range(0, len(keys), 100):
        await asyncio.gather(*(store.put(key, b"{}") for key in keys[start : start + 100]))
    started = time.perf_counter()
    listed = await store.list_all("keys/platform/", limit=500)
    elapsed = time.perf_counter() - started
    assert [info.key for info in listed] == keys
    assert elapsed < 10, elapsed


# --- prefix, layout, settings ------------------------------------------------------------------


async def test_prefix_partitions_one_bucket(provider: str, tmp_path: Path, request: Any) -> None:
    s3 = request.getfixturevalue("s3_server") if provider == "s3" else None
    doc = raw_settings(provider, tmp_path, s3)
    stores = []
    for prefix in ("staging", "prod"):
        section = {**doc["storage"], "prefix": prefix}
        stores.append(build_store(StorageSettings.from_raw({**doc, "storage": section}), tmp_path))
    staging, prod = stores
    await staging.put("keys/a", b"staging")
    await prod.put("keys/a", b"prod")
    blob = await staging.get("keys/a")
    assert blob is not None and blob.data == b"staging"
    assert [i.key for i in await prod.list_all("")] == ["keys/a"]
    if provider == "filesystem":
        # jclouds' layout, as DIAL's filesystem provider: <folder>/<bucket>/<prefix>/<key>
        assert (
            tmp_path / "tollgate-storage" / "dial" / "prod" / "keys" / "a"
        ).read_bytes() == b"prod"
    for one in stores:
        await one.close()


def test_storage_settings_defaults_and_dial_names(tmp_path: Path) -> None:
    defaults = StorageSettings.from_raw({})
    assert (defaults.provider, defaults.bucket, defaults.prefix) == ("filesystem", "dial", None)
    assert defaults.folder == "tollgate-storage"
    beside = StorageSettings.from_raw({"limits": {"embedded": {"file": "/var/lib/tg/usage.db"}}})
    assert beside.folder == "/var/lib/tg/tollgate-storage"
    dial = StorageSettings.from_raw(
        {
            "storage": {
                "provider": "aws-s3",
                "bucket": "b",
                "prefix": "env1",
                "endpoint": "http://127.0.0.1:9",
                "identity": "AKIA",
                "credential": "very-secret-value",
                "createBucket": "false",
                "maxUploadedFileSize": 1000,
                "overrides": {"jclouds.filesystem.basedir": "data", "jclouds.regions": "eu-west-1"},
            }
        }
    )
    assert (dial.create_bucket, dial.max_uploaded_file_size, dial.folder) == (False, 1000, "data")
    assert dial.secret == "very-secret-value"
    for text in (repr(dial), str(dial), dial.model_dump_json()):
        assert "very-secret-value" not in text
    store = build_store(dial, tmp_path)
    assert "very-secret-value" not in repr(store)


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        ({"provider": "minio"}, "setting storage.provider: expected one of"),
        ({"prefix": "a/b"}, "setting storage.prefix: must be one folder name"),
        ({"bucket": "a/b"}, "setting storage.bucket: expected a bucket name"),
        ({"createBucket": "maybe"}, "setting storage.createBucket: expected true or false"),
        ({"maxUploadedFileSize": 0}, "setting storage.maxUploadedFileSize:"),
        ({"overrides": []}, "setting storage.overrides: expected an object"),
    ],
)
def test_storage_settings_problems(section: dict[str, Any], problem: str) -> None:
    with pytest.raises(SettingsError) as caught:
        StorageSettings.from_raw({"storage": section})
    assert str(caught.value).startswith(problem), str(caught.value)
    with pytest.raises(SettingsError, match="setting storage: expected an object"):
        StorageSettings.from_raw({"storage": "filesystem"})


async def test_unreachable_object_store_is_unavailable(tmp_path: Path) -> None:
    from harness import free_port

    settings = StorageSettings.from_raw(
        {"storage": s3_settings_for(f"http://127.0.0.1:{free_port()}")}
    )
    store = build_store(settings, tmp_path)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await store.get("k")
    with pytest.raises(StoreUnavailable):
        await store.put("k", b"x", if_none_match=True)
    assert time.monotonic() - started < 30


def s3_settings_for(endpoint: str) -> dict[str, Any]:
    return {
        "provider": "s3",
        "bucket": "b",
        "endpoint": endpoint,
        "identity": "a",
        "credential": "b",
    }


async def test_filesystem_io_does_not_stall_the_event_loop(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path / "root")
    big = b"x" * (64 * 1024 * 1024)
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    await store.put("big", big)
    blob = await store.get("big")
    stop.set()
    await tick
    await store.close()
    assert blob is not None and blob.size == len(big)
    assert len(gaps) > 3
    # The loop kept ticking while 64 MiB were written, fsynced, read and hashed.
    assert max(gaps) < 0.25, max(gaps)


async def test_failed_conditional_put_leaves_no_temporary_file(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path / "root")
    await store.put("a/b", b"1")
    with pytest.raises(PreconditionFailed):
        await store.put("a/b", b"2", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        await store.put("a/b", b"2", if_match="0")
    assert sorted(p.name for p in (tmp_path / "root" / "a").iterdir()) == ["b"]
    await store.close()


# --- change notices ---------------------------------------------------------------------------


async def _next(subscription: Subscription, timeout: float = 2.0) -> Change:
    return await asyncio.wait_for(anext(subscription), timeout)


async def test_local_notices() -> None:
    notices = LocalNotices("one")
    first, second = await notices.subscribe(), await notices.subscribe()
    waiting = [asyncio.ensure_future(_next(first)), asyncio.ensure_future(_next(second))]
    change = notices.change("keys/platform/a", "UPDATE", "etag1")
    await notices.publish(change)
    assert [await w for w in waiting] == [change, change]
    assert (change.sender, change.action) == ("one", "UPDATE")
    await notices.close()
    with pytest.raises(StopAsyncIteration):
        await _next(first)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis_server(tmp_path_factory.mktemp("redis"))
    yield server
    stop_redis_server(server)


@pytest.mark.redis
async def test_redis_notices_reach_every_instance(redis_server: RedisServer) -> None:
    redis = RedisSettings.model_validate(
        {"singleServerConfig": {"address": f"redis://127.0.0.1:{redis_server.port}"}}
    )
    storage = StorageSettings.from_raw({"storage": {"prefix": "env1"}})
    instances = [build_notices(redis, storage, f"pod-{n}") for n in range(3)]
    subscriptions = [await notices.subscribe() for notices in instances]
    waiting = [asyncio.ensure_future(_next(s, 5.0)) for s in subscriptions]
    assert instances[0].channel == "tollgate:storage:env1/changes"  # type: ignore[attr-defined]
    sent = instances[1].change("keys/platform/k1", "DELETE", None)
    started = time.perf_counter()
    await instances[1].publish(sent)
    received = [await w for w in waiting]
    latency = time.perf_counter() - started
    assert received == [sent, sent, sent]
    assert received[0].sender == "pod-1"
    assert latency < 1.0, latency  # every instance hears of the change within a second
    for subscription in subscriptions:
        await subscription.aclose()
    for notices in instances:
        await notices.close()


@pytest.mark.redis
async def test_redis_notices_publish_fails_when_redis_is_down() -> None:
    from harness import free_port

    redis = RedisSettings.model_validate(
        {"singleServerConfig": {"address": f"redis://127.0.0.1:{free_port()}"}}
    )
    notices = build_notices(redis, StorageSettings.from_raw({}))
    with pytest.raises(StoreUnavailable):
        await notices.publish(notices.change("k", "CREATE", "e"))
    await notices.close()


def test_change_notice_json_round_trip() -> None:
    change = Change("Users/a/b", "CREATE", "abc", 1234, "pod")
    assert Change.from_json(change.to_json()) == change
    with pytest.raises(ValueError):
        Change.from_json(b'{"key": "k", "action": "EXPLODE"}')


@pytest.mark.redis
async def test_redis_subscription_survives_a_redis_restart(tmp_path: Path) -> None:
    from harness import free_port

    port = free_port()
    server = start_redis_server(tmp_path / "r", port=port)
    redis = RedisSettings.model_validate(
        {"singleServerConfig": {"address": f"redis://127.0.0.1:{port}"}}
    )
    storage = StorageSettings.from_raw({})
    listener, writer = build_notices(redis, storage, "a"), build_notices(redis, storage, "b")
    subscription = await listener.subscribe()
    try:
        stop_redis_server(server)
        server = start_redis_server(tmp_path / "r", port=port)
        sent = writer.change("keys/platform/k", "UPDATE", "e2")
        # The listener resubscribes on its own; publish until it hears (a notice sent while it
        # was away is lost by design: the next scan catches it).
        deadline = time.monotonic() + 10
        received = None
        while received is None and time.monotonic() < deadline:
            with contextlib.suppress(StoreUnavailable):
                await writer.publish(sent)
            with contextlib.suppress(TimeoutError):
                received = await _next(subscription, 0.5)
        assert received == sent
    finally:
        await subscription.aclose()
        await listener.close()
        await writer.close()
        stop_redis_server(server)
