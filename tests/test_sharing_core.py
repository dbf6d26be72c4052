"""The sharing records (compatibility C88) on a real filesystem store: newest DIAL's limit
rules, the URLs a grant covers, invitation ids, and the group commit — concurrent changes of
one record each applied exactly once in fewer writes, a refusal that leaves the rest of its
batch alone, a writer cancelled mid-write whose batch the next writer takes over.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from tollgate.config.schema import Role
from tollgate.errors import GatewayError
from tollgate.resources.encryption import BucketCipher
from tollgate.resources.paths import parse_url
from tollgate.resources.sharing import (
    HOUR_MS,
    UNLIMITED,
    OwnerRecord,
    Sharing,
    covering_urls,
    effective_limit,
)
from tollgate.storage.filesystem import FilesystemStore

CIPHER = BucketCipher("password", "salt")
MINE = "3CcedGxCx23EwiVbVmscVktScRyf46KypuBQ65miviST"  # Keys/EPM-RTC-GPT/
OWNER = "Keys/EPM-RTC-GPT/"


def roles(**share: dict[str, Any]) -> dict[str, Role]:
    return {name: Role.model_validate({"share": value}) for name, value in share.items()}


def test_the_effective_limit_is_dials() -> None:
    table = roles(
        small={"CONVERSATION": {"max_accepted_users": 1, "invitation_ttl": 100}},
        big={"CONVERSATION": {"maxAcceptedUsers": "3", "invitationTtl": -1}},
        defaulted={"CONVERSATION": {}},
        apps={"APPLICATION": {"max_accepted_users": 2}},
    )
    one = effective_limit(table, ["small"], "CONVERSATION", None)
    assert (one.max_accepted_users, one.ttl_ms) == (1, 100 * HOUR_MS)
    both = effective_limit(table, ["small", "big"], "CONVERSATION", None)
    assert (both.max_accepted_users, both.ttl_ms) == (3, 100 * HOUR_MS)
    # -1 or absent: the type's default, which takes part in the largest.
    mixed = effective_limit(table, ["small", "defaulted"], "CONVERSATION", None)
    assert (mixed.max_accepted_users, mixed.ttl_ms) == (UNLIMITED, 100 * HOUR_MS)
    alone = effective_limit(table, ["defaulted"], "CONVERSATION", None)
    assert (alone.max_accepted_users, alone.ttl_ms) == (UNLIMITED, 72 * HOUR_MS)
    # No role with the type: the default; unknown roles are skipped.
    assert effective_limit(table, ["small", "ghost"], "APPLICATION", None).max_accepted_users == 10
    assert effective_limit(table, ["apps"], "APPLICATION", None).max_accepted_users == 2
    assert effective_limit(table, [], "PROMPT", 60_000).ttl_ms == 60_000  # ttlInSeconds
    assert effective_limit(table, ["small"], "CONVERSATION", 60_000).ttl_ms == 100 * HOUR_MS
    with pytest.raises(GatewayError) as refused:
        effective_limit(table, [], "WIDGET", None)
    assert refused.value.message == "Unsupported resource type: WIDGET"


def test_a_grant_covers_the_resource_and_everything_below_a_shared_folder() -> None:
    item = parse_url(f"conversations/{MINE}/a/b%20c/d", CIPHER)
    assert covering_urls(item) == [
        f"conversations/{MINE}/a/b%20c/d",
        f"conversations/{MINE}/a/b%20c/",
        f"conversations/{MINE}/a/",
        f"conversations/{MINE}/",
    ]
    folder = parse_url(f"files/{MINE}/a/", CIPHER)
    assert covering_urls(folder) == [f"files/{MINE}/a/", f"files/{MINE}/"]
    assert covering_urls(parse_url(f"files/{MINE}/", CIPHER)) == [f"files/{MINE}/"]


def test_invitation_ids_name_their_owner_and_nothing_else_passes() -> None:
    name, invitation_id = Sharing.new_invitation(OWNER, CIPHER)
    assert Sharing.parse_invitation(invitation_id, CIPHER) == (OWNER, name)
    assert Sharing.new_invitation(OWNER, CIPHER)[1] != invitation_id
    forged = [
        MINE,  # a bucket name: the same cipher, not an invitation
        CIPHER.encrypt(f"{OWNER}invitations/short"),
        CIPHER.encrypt(f"public/invitations/{'a' * 32}"),
        CIPHER.encrypt(f"Keys/../invitations/{'a' * 32}"),
        CIPHER.encrypt(f"{OWNER}invitations/{'a' * 31}!"),
        "not-base58",
        "",
    ]
    for value in forged:
        assert Sharing.parse_invitation(value, CIPHER) is None, value


class CountingStore(FilesystemStore):
    """The filesystem store, counting its writes; `gate` (when set) holds each write."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.writes = 0
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def put(self, key: str, data: bytes, **conditions: Any) -> str:
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        self.writes += 1
        return await super().put(key, data, **conditions)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def test_concurrent_changes_are_each_applied_once_in_fewer_writes(tmp_path: Path) -> None:
    store = CountingStore(tmp_path)
    sharing = Sharing(store, now_ms)

    def grant(index: int) -> Any:
        def change(record: OwnerRecord) -> int:
            if index % 7 == 3:
                raise GatewayError(400, f"refused {index}")  # before changing anything
            record.share(f"conversations/{MINE}/c").users[f"Keys/p{index}/"] = ["READ"]
            return index

        return change

    results = await asyncio.gather(
        *(sharing.update_owner(OWNER, grant(i)) for i in range(40)), return_exceptions=True
    )
    for index, result in enumerate(results):
        if index % 7 == 3:
            assert isinstance(result, GatewayError) and result.message == f"refused {index}"
        else:
            assert result == index
    record = await sharing.owner_record(OWNER)
    shared = record.shared(f"conversations/{MINE}/c")
    assert shared is not None
    assert sorted(shared.users) == sorted(f"Keys/p{i}/" for i in range(40) if i % 7 != 3)
    assert store.writes < 40  # batched: the first write alone, then the rest together
    await store.close()


async def test_a_cancelled_writer_hands_its_batch_to_the_next(tmp_path: Path) -> None:
    store = CountingStore(tmp_path)
    sharing = Sharing(store, now_ms)

    def grant(user: str) -> Any:
        def change(record: OwnerRecord) -> None:
            record.share("conversations/x/c").users[user] = ["READ"]

        return change

    store.gate = asyncio.Event()
    first = asyncio.create_task(sharing.update_owner(OWNER, grant("Keys/first/")))
    await store.entered.wait()  # the first writer is in its write, holding the record
    waiting = [
        asyncio.create_task(sharing.update_owner(OWNER, grant(f"Keys/w{i}/"))) for i in range(5)
    ]
    await asyncio.sleep(0.01)
    first.cancel()
    store.gate.set()
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.gather(*waiting)
    record = await sharing.owner_record(OWNER)
    shared = record.shared("conversations/x/c")
    assert shared is not None
    assert sorted(shared.users) == [f"Keys/w{i}/" for i in range(5)]
    await store.close()
