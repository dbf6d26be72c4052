"""The Configuration API across instances, end to end: real `tollgate serve` processes.

- Three instances share one Redis (a private redis-server) and one resource store (the
  filesystem provider on one folder). `config.reload` stays at its default (60 s), so a change
  made through one instance can reach the others in under a second only by the change notices
  (Redis pub/sub): a key made, rotated or deleted, a role made, each measured.
- Without Redis, two instances on one folder follow each other by the rescan alone
  (`config.reload` 1 s): the shared-mount mode.
- The same API on the S3 provider (moto's server): the key survives a restart, and no object
  in the bucket holds a secret.
- Races: two creates of one name at once (exactly one wins, the other gets 412), and twenty
  rotations at once over three instances (one current secret, the same everywhere).
- Secrets never leak: every log, every answer this module received (but the two kinds that
  return a secret on purpose, less that one field) and `/metrics` are searched for every secret
  made and for the admin key.

Measured delays are printed (`pytest -s` shows them).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness import (
    FakeModel,
    Gateway,
    start_fake_model,
    start_gateway,
    stop,
)
from redis_server import RedisServer, redis_server_binary, start_redis_server, stop_redis_server
from s3_server import ACCESS_KEY, REGION, SECRET_KEY, start_s3_server, stop_s3_server

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.redis,
    pytest.mark.slow,
    pytest.mark.skipif(redis_server_binary() is None, reason="redis-server is not installed"),
]

ADMIN_KEY = "cluster-admin-key-0123456789abcdef0123"
ADMIN = {"Api-Key": ADMIN_KEY}
PROPAGATION_S = 1.0  # what the notices must achieve
RESCAN_S = 2.5  # what the rescan every second must achieve without Redis (about 2 s)
POLL_S = 0.02
DEADLINE_S = 10.0  # a generous deadline for polling: the assertion is on the delay measured


# --- what this module saw: every answer, every secret, every log ---------------------------


@dataclass
class Seen:
    answers: list[tuple[str, str, int, str, str]] = field(default_factory=list)
    secrets: set[str] = field(default_factory=set)
    logs: list[Path] = field(default_factory=list)

    async def record(self, response: httpx.Response) -> None:
        await response.aread()
        request = response.request
        headers = "\n".join(f"{k}: {v}" for k, v in response.headers.items())
        self.answers.append(
            (request.method, request.url.path, response.status_code, headers, response.text)
        )
        if response.status_code == 200 and _returns_secret(request.method, request.url.path):
            body = response.json()
            if isinstance(body.get("key"), str):
                self.secrets.add(body["key"])
            for result in body.get("results", ()):
                if isinstance(result.get("key"), str):
                    self.secrets.add(result["key"])


SEEN = Seen()


def _returns_secret(method: str, path: str) -> bool:
    """The answers that show a secret on purpose: a key's PUT, a rotation, a bulk apply."""
    return (
        (method == "PUT" and path.startswith("/v1/keys/"))
        or (method == "POST" and path.startswith("/v1/ops/keys/") and path.endswith("/rotate"))
        or (method == "POST" and path == "/v1/admin/apply")
    )


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=30,
        limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
        event_hooks={"response": [SEEN.record]},
    )


def config(fake: FakeModel) -> dict[str, Any]:
    return {
        "models": {
            "m": {"endpoint": fake.endpoint("m"), "userRoles": ["basic"]},
            # `metered` is known from this `userRoles`, so a key may hold it before the API
            # defines the role (and its limits).
            "limited": {"endpoint": fake.endpoint("limited"), "userRoles": ["metered"]},
        },
        "keys": {ADMIN_KEY: {"project": "ops", "role": "admin"}},
        "roles": {"basic": {"limits": {}}, "admin": {}},
    }


def settings(folder: Path, redis: RedisServer | None = None, **more: Any) -> dict[str, Any]:
    tree: dict[str, Any] = {
        "access": {
            "admin": {"rules": [{"function": "EQUAL", "source": "roles", "targets": ["admin"]}]}
        },
        "storage": {"overrides": {"jclouds.filesystem.basedir": str(folder)}},
        **more,
    }
    if redis is not None:
        tree["redis"] = {"singleServerConfig": {"address": f"redis://127.0.0.1:{redis.port}"}}
    return tree


def started(work: Path, configs: list[dict[str, Any]], tree: dict[str, Any]) -> Gateway:
    gateway = start_gateway(work, configs, settings=tree)
    SEEN.logs.append(gateway.log)
    return gateway


async def call(http: httpx.AsyncClient, gw: Gateway, key: str, model: str = "m") -> httpx.Response:
    return await http.post(
        f"{gw.url}/openai/deployments/{model}/chat/completions",
        headers={"Api-Key": key},
        json={"messages": [{"role": "user", "content": "Say hello"}]},
    )


def refused(response: httpx.Response) -> bool:
    return response.status_code == 401 and response.json()["error"]["message"] == "Unknown api key"


async def first_time(
    http: httpx.AsyncClient,
    gateways: list[Gateway],
    key: str,
    since: float,
    check: Any = lambda r: r.status_code == 200,
    model: str = "m",
) -> list[float]:
    """For each gateway, seconds from `since` until a call with `key` satisfies `check`,
    polled every 20 ms; fails after the deadline."""

    async def one(gw: Gateway) -> float:
        while True:
            answer = await call(http, gw, key, model)
            if check(answer):
                return time.monotonic() - since
            assert time.monotonic() - since < DEADLINE_S, (gw.url, answer.status_code, answer.text)
            await asyncio.sleep(POLL_S)

    return list(await asyncio.gather(*(one(gw) for gw in gateways)))


def fingerprint(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()[:8]


def report(what: str, delays: list[float]) -> None:
    shown = ", ".join(f"{d * 1000:.0f}" for d in delays)
    print(f"\n[propagation] {what}: {shown} ms (max {max(delays) * 1000:.0f} ms)")


# --- three instances, one Redis, one store ------------------------------------------------


@dataclass
class Cluster:
    a: Gateway
    b: Gateway
    c: Gateway
    fake: FakeModel
    redis: RedisServer

    @property
    def all(self) -> list[Gateway]:
        return [self.a, self.b, self.c]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    work = tmp_path_factory.mktemp("cluster")
    redis = start_redis_server(work / "redis")
    fake = start_fake_model(work)
    gateways: list[Gateway] = []
    try:
        tree = settings(work / "shared-store", redis)  # config.reload: the default, 60 s
        for _ in range(3):
            gateways.append(started(work, [config(fake)], tree))
        for gw in gateways:
            health = httpx.get(f"{gw.url}/health").json()
            assert health["limits"]["store"] == "redis" and health["resources"]["healthy"]
        yield Cluster(*gateways, fake=fake, redis=redis)
    finally:
        for gw in gateways:
            stop(gw.process)
        stop(fake.process)
        stop_redis_server(redis)


async def warm(http: httpx.AsyncClient, gateways: list[Gateway]) -> None:
    """Open a connection to each instance first, so the first poll is not a connect."""
    await asyncio.gather(*(http.get(f"{gw.url}/health") for gw in gateways))


async def test_keys_made_rotated_and_deleted_on_one_instance_reach_the_others_within_a_second(
    cluster: Cluster,
) -> None:
    a, peers = cluster.a, [cluster.b, cluster.c]
    async with client() as http:
        await warm(http, cluster.all)
        created: list[float] = []
        secrets = {}
        for index in range(5):
            name = f"prop-{index}"
            since = time.monotonic()
            made = await http.put(
                f"{a.url}/v1/keys/platform/{name}",
                headers=ADMIN,
                json={"project": f"prop-{index}", "roles": ["basic"]},
            )
            assert made.status_code == 200, made.text
            secrets[name] = made.json()["key"]
            assert (await call(http, a, secrets[name])).status_code == 200  # the writer: at once
            created += await first_time(http, peers, secrets[name], since)
        report("created on A, accepted on B and C", created)
        assert max(created) <= PROPAGATION_S

        # A rotation: the new secret reaches B and C; the old one keeps working (the grace).
        old = secrets["prop-0"]
        since = time.monotonic()
        rotated = await http.post(
            f"{a.url}/v1/ops/keys/prop-0/rotate", headers=ADMIN, json={"gracePeriodSeconds": 300}
        )
        assert rotated.status_code == 200, rotated.text
        new = rotated.json()["key"]
        assert new != old and rotated.json()["fingerprint"] == fingerprint(new)
        rotation = await first_time(http, peers, new, since)
        report("rotated on A, new secret accepted on B and C", rotation)
        assert max(rotation) <= PROPAGATION_S
        for gw in cluster.all:
            for secret in (old, new):
                answer = await call(http, gw, secret)
                assert answer.status_code == 200, (gw.url, answer.text)
            shown = await http.get(f"{gw.url}/v1/keys/platform/prop-0", headers=ADMIN)
            assert shown.json()["fingerprint"] == fingerprint(new)
            assert "previousKeyExpiresAt" in shown.json()

        # A deletion: every secret of the key is refused on B and C within a second.
        deleted: list[float] = []
        for name in ("prop-0", "prop-1", "prop-2"):
            since = time.monotonic()
            gone = await http.delete(f"{a.url}/v1/keys/platform/{name}", headers=ADMIN)
            assert gone.status_code == 204
            assert refused(await call(http, a, secrets[name]))
            deleted += await first_time(http, peers, secrets[name], since, refused)
        report("deleted on A, refused on B and C", deleted)
        assert max(deleted) <= PROPAGATION_S
        for gw in cluster.all:  # the old and new secrets of the rotated key are gone too
            assert refused(await call(http, gw, old)) and refused(await call(http, gw, new))
            missing = await http.get(f"{gw.url}/v1/keys/platform/prop-0", headers=ADMIN)
            assert missing.status_code == 404
        for name in ("prop-3", "prop-4"):  # the others are untouched
            for gw in cluster.all:
                assert (await call(http, gw, secrets[name])).status_code == 200


async def test_a_role_made_on_one_instance_limits_a_key_on_another_within_a_second(
    cluster: Cluster,
) -> None:
    a, b, c = cluster.a, cluster.b, cluster.c
    async with client() as http:
        await warm(http, cluster.all)
        made = await http.put(
            f"{a.url}/v1/keys/platform/metered-key",
            headers=ADMIN,
            json={"project": "meter", "roles": ["metered"]},
        )
        assert made.status_code == 200, made.text
        secret = made.json()["key"]
        limits_url = f"{c.url}/v1/deployments/limited/limits"

        async def day_requests() -> httpx.Response:
            return await http.get(limits_url, headers={"Api-Key": secret})

        # The key is on C (no limit yet), and no call has been counted for it.
        deadline = time.monotonic() + DEADLINE_S
        while (answer := await day_requests()).status_code != 200:
            assert time.monotonic() < deadline, answer.text
            await asyncio.sleep(POLL_S)
        assert answer.json()["dayRequestStats"]["total"] != 2

        since = time.monotonic()
        role = await http.put(
            f"{b.url}/v1/roles/platform/metered",
            headers=ADMIN,
            json={"limits": {"limited": {"requestDay": 2}}},
        )
        assert role.status_code == 200, role.text
        while (await day_requests()).json()["dayRequestStats"]["total"] != 2:
            assert time.monotonic() - since < DEADLINE_S
            await asyncio.sleep(POLL_S)
        delay = time.monotonic() - since
        report("role made on B, limit in force on C", [delay])
        assert delay <= PROPAGATION_S
        statuses = [(await call(http, c, secret, "limited")).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        # The counters are Redis's: A refuses the key's next call too.
        assert (await call(http, a, secret, "limited")).status_code == 429
        shown = await http.get(f"{c.url}/v1/roles/platform/metered", headers=ADMIN)
        assert shown.json()["limits"] == {"limited": {"requestDay": 2}}


async def test_two_creates_of_one_name_at_the_same_moment_one_wins(cluster: Cluster) -> None:
    a, b = cluster.a, cluster.b
    async with client() as http:
        await warm(http, [a, b, a, b])
        for index in range(5):
            name = f"race-{index}-{uuid.uuid4().hex[:6]}"
            answers = await asyncio.gather(
                *(
                    http.put(
                        f"{gw.url}/v1/keys/platform/{name}",
                        headers={**ADMIN, "If-None-Match": "*"},
                        json={"project": f"race-{gw.port}", "roles": ["basic"]},
                    )
                    for gw in (a, b)
                )
            )
            statuses = sorted(answer.status_code for answer in answers)
            assert statuses == [200, 412], [answer.text for answer in answers]
            winner = next(answer for answer in answers if answer.status_code == 200)
            loser = next(answer for answer in answers if answer.status_code == 412)
            assert loser.json()["error"]["message"] == "Resource already exists"
            secret = winner.json()["key"]
            await first_time(http, cluster.all, secret, time.monotonic())
            # Everyone holds the winner's version (its ETag and project).
            etags = set()
            for gw in cluster.all:
                shown = await http.get(f"{gw.url}/v1/keys/platform/{name}", headers=ADMIN)
                assert shown.status_code == 200
                etags.add(shown.headers["ETag"])
                assert shown.json()["fingerprint"] == fingerprint(secret)
            assert etags == {winner.headers["ETag"]}


async def test_twenty_rotations_at_once_over_three_instances_leave_one_secret(
    cluster: Cluster,
) -> None:
    async with client() as http:
        await warm(http, cluster.all * 7)
        made = await http.put(
            f"{cluster.a.url}/v1/keys/platform/spin",
            headers=ADMIN,
            json={"project": "spin", "roles": ["basic"]},
        )
        assert made.status_code == 200, made.text
        first = made.json()["key"]
        await first_time(http, cluster.all, first, time.monotonic())
        gateways = [cluster.all[i % 3] for i in range(20)]
        answers = await asyncio.gather(
            *(
                http.post(
                    f"{gw.url}/v1/ops/keys/spin/rotate",
                    headers=ADMIN,
                    json={"gracePeriodSeconds": 0},  # no grace: only the current one may work
                )
                for gw in gateways
            )
        )
        secrets = [first]
        for answer in answers:
            if answer.status_code == 200:
                secrets.append(answer.json()["key"])
            else:  # a clean refusal: DIAL's error body, never a 500
                assert answer.status_code in (409, 412, 503), answer.text
                assert answer.json()["error"]["message"]
        print(f"\n[rotations] statuses: {sorted(a.status_code for a in answers)}")
        assert len(secrets) > 1

        # Every instance comes to hold the same version: the store's.
        deadline = time.monotonic() + DEADLINE_S
        while True:
            shown = [
                await http.get(f"{gw.url}/v1/keys/platform/spin", headers=ADMIN)
                for gw in cluster.all
            ]
            fingerprints = {s.json()["fingerprint"] for s in shown}
            if len(fingerprints) == 1:
                break
            assert time.monotonic() < deadline, f"instances disagree: {fingerprints}"
            await asyncio.sleep(POLL_S)
        current = [s for s in secrets if fingerprint(s) in fingerprints]
        assert len(current) == 1, "exactly one secret is the current one"
        for gw in cluster.all:
            assert (await call(http, gw, current[0])).status_code == 200, gw.url
            for secret in secrets:
                if secret != current[0]:
                    assert refused(await call(http, gw, secret)), (gw.url, fingerprint(secret))


# --- without Redis: one folder, the rescan --------------------------------------------------


async def test_without_redis_instances_on_one_folder_follow_each_other_by_the_rescan(
    tmp_path: Path,
) -> None:
    fake = start_fake_model(tmp_path)
    gateways: list[Gateway] = []
    try:
        tree = settings(tmp_path / "shared-store", config={"reload": 1000})
        for _ in range(2):
            gateways.append(started(tmp_path, [config(fake)], tree))
        a, b = gateways
        async with client() as http:
            since = time.monotonic()
            made = await http.put(
                f"{a.url}/v1/keys/platform/mounted",
                headers=ADMIN,
                json={"project": "mounted", "roles": ["basic"]},
            )
            assert made.status_code == 200, made.text
            secret = made.json()["key"]
            found = await first_time(http, [b], secret, since)
            since = time.monotonic()
            made = await http.put(
                f"{b.url}/v1/keys/platform/mounted-back",
                headers=ADMIN,
                json={"project": "mounted", "roles": ["basic"]},
            )
            back = made.json()["key"]
            found += await first_time(http, [a], back, since)
            since = time.monotonic()
            assert (
                await http.delete(f"{a.url}/v1/keys/platform/mounted", headers=ADMIN)
            ).status_code == 204
            gone = await first_time(http, [b], secret, since, refused)
            report("no Redis, rescan every 1 s: made, accepted on the other", found)
            report("no Redis, rescan every 1 s: deleted, refused on the other", gone)
            assert max(found + gone) <= RESCAN_S
            health = (await http.get(f"{a.url}/health")).json()
            assert health["limits"]["store"] == "embedded" and health["resources"]["keys"] == 1
    finally:
        for gw in gateways:
            stop(gw.process)
        stop(fake.process)


# --- the S3 provider -----------------------------------------------------------------------


async def test_the_api_on_s3_keeps_keys_across_a_restart_and_no_secret_in_the_bucket(
    tmp_path: Path,
) -> None:
    import boto3

    s3 = start_s3_server(tmp_path / "s3")
    fake = start_fake_model(tmp_path)
    gateway: Gateway | None = None
    try:
        storage = s3.new_bucket_storage()
        bucket = storage["bucket"]
        tree = settings(tmp_path / "unused", storage=storage)
        tree["storage"] = storage
        gateway = started(tmp_path, [config(fake)], tree)
        async with client() as http:
            url = f"{gateway.url}/v1/keys/platform"
            made = await http.put(
                f"{url}/on-s3", headers=ADMIN, json={"project": "s3", "roles": ["basic"]}
            )
            assert made.status_code == 200, made.text
            old = made.json()["key"]
            assert (await call(http, gateway, old)).status_code == 200
            shown = await http.get(f"{url}/on-s3", headers=ADMIN)
            assert shown.status_code == 200 and shown.json()["fingerprint"] == fingerprint(old)
            assert shown.headers["ETag"] == made.headers["ETag"]
            rotated = await http.post(
                f"{gateway.url}/v1/ops/keys/on-s3/rotate",
                headers=ADMIN,
                json={"gracePeriodSeconds": 600},
            )
            assert rotated.status_code == 200, rotated.text
            new = rotated.json()["key"]
            doomed = await http.put(
                f"{url}/doomed", headers=ADMIN, json={"project": "s3", "roles": ["basic"]}
            )
            doomed_secret = doomed.json()["key"]
            assert (await call(http, gateway, doomed_secret)).status_code == 200
            assert (await http.delete(f"{url}/doomed", headers=ADMIN)).status_code == 204
            assert refused(await call(http, gateway, doomed_secret))

            stop(gateway.process)
            gateway = started(tmp_path, [config(fake)], tree)
            url = f"{gateway.url}/v1/keys/platform"
            health = (await http.get(f"{gateway.url}/health")).json()
            assert health["resources"] == {**health["resources"], "healthy": True, "keys": 1}
            assert (await call(http, gateway, new)).status_code == 200
            assert (await call(http, gateway, old)).status_code == 200  # the grace persisted
            assert refused(await call(http, gateway, doomed_secret))
            assert (await http.get(f"{url}/doomed", headers=ADMIN)).status_code == 404
            shown = await http.get(f"{url}/on-s3", headers=ADMIN)
            assert shown.json()["fingerprint"] == fingerprint(new)
            assert shown.json()["project"] == "s3" and "previousKeyExpiresAt" in shown.json()

        client_s3 = boto3.client(
            "s3",
            endpoint_url=s3.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        )
        try:
            keys = [
                item["Key"]
                for page in client_s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
                for item in page.get("Contents", ())
            ]
            stored = {k: client_s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}
        finally:
            client_s3.close()
        assert "platform/keys/on-s3" in stored and "platform/keys/doomed" not in stored
        record = json.loads(stored["platform/keys/on-s3"])
        assert record["secretSha256"] == hashlib.sha256(new.encode()).hexdigest()
        for key, data in stored.items():
            for secret in (old, new, doomed_secret, ADMIN_KEY):
                assert secret.encode() not in data, (key, fingerprint(secret))
        assert SECRET_KEY not in gateway.output()  # the store's credential is never logged
    finally:
        if gateway is not None:
            stop(gateway.process)
        stop(fake.process)
        stop_s3_server(s3)


# --- last: nothing leaked ------------------------------------------------------------------


async def test_no_secret_in_any_log_answer_or_metrics(cluster: Cluster) -> None:
    async with client() as http:
        # Secrets of its own, whatever ran before: a PUT, a rotation, a bulk apply, calls.
        made = await http.put(
            f"{cluster.a.url}/v1/keys/platform/leak-check",
            headers=ADMIN,
            json={"project": "leak", "roles": ["basic"]},
        )
        assert made.status_code == 200, made.text
        rotated = await http.post(
            f"{cluster.b.url}/v1/ops/keys/leak-check/rotate", headers=ADMIN, json={}
        )
        assert rotated.status_code == 200, rotated.text
        applied = await http.post(
            f"{cluster.c.url}/v1/admin/apply",
            headers=ADMIN,
            json={
                "manifests": [
                    {
                        "kind": "Key",
                        "name": "keys/platform/leak-bulk",
                        "spec": {"project": "leak", "roles": ["basic"]},
                    }
                ]
            },
        )
        assert applied.status_code == 200, applied.text
        for secret in (made.json()["key"], rotated.json()["key"]):
            await first_time(http, cluster.all, secret, time.monotonic())
            assert refused(await call(http, cluster.a, secret + "x"))
        for gw in cluster.all:
            for path in ("/v1/keys/platform/leak-check", "/v1/metadata/keys/platform/"):
                assert (await http.get(gw.url + path, headers=ADMIN)).status_code == 200
            audit = await http.get(f"{gw.url}/v1/admin/audit", headers=ADMIN)
            assert audit.status_code == 200
            metrics = await http.get(f"{gw.url}/metrics", headers=ADMIN)
            assert metrics.status_code == 200 and "tollgate_" in metrics.text

    secrets = SEEN.secrets | {ADMIN_KEY}
    assert len(secrets) >= 4
    for method, path, status, headers, text in SEEN.answers:
        if status == 200 and _returns_secret(method, path):
            body = json.loads(text)
            body.pop("key", None)
            for result in body.get("results", ()):
                result.pop("key", None)
            text = json.dumps(body)
        for secret in secrets:
            assert secret not in text and secret not in headers, (
                method,
                path,
                status,
                fingerprint(secret),
            )
    for log in SEEN.logs:
        output = log.read_text(errors="replace")
        assert output, log
        for secret in secrets:
            assert secret not in output, (log.name, fingerprint(secret))
    print(
        f"\n[leaks] searched {len(SEEN.answers)} answers and {len(SEEN.logs)} logs "
        f"for {len(secrets)} secrets: none found"
    )
