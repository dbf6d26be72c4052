"""DIAL's resource API: buckets first (issue 14, in progress; compatibility C83).

`GET /v1/bucket` answers the caller's bucket name: DIAL's encryption of `Keys/<project>/` (and,
for a per-request key, the application's bucket and its `appdata` folder in the caller's).
The cipher comes from `encryption.secret` and `encryption.key`, or from the pair kept in the
resource store (made on the first start, shared by every instance on the store).
"""

from __future__ import annotations

import logging
import re

import orjson
from aiohttp import web

from tollgate.errors import GatewayError
from tollgate.resources.buckets import bucket_answer
from tollgate.resources.encryption import BucketCipher, bucket_cipher
from tollgate.security.principal import Principal
from tollgate.settings import SettingsError
from tollgate.storage.store import ResourceStore, StorageError

log = logging.getLogger("tollgate.resources")

BUCKET = re.compile(r"/+v1/bucket")


def store_unavailable() -> GatewayError:
    return GatewayError(503, "Resource store is not available")


class ResourcesApi:
    """The resource endpoints; the bucket cipher is read (or made) once, at start or at the
    first call that needs it, so that an unreachable store at start-up heals by itself."""

    def __init__(self, store: ResourceStore, raw_settings: object) -> None:
        self.store = store
        self._raw = raw_settings
        self._cipher: BucketCipher | None = None

    async def start(self) -> None:
        try:
            await self.cipher()
        except GatewayError:
            log.error(
                "the bucket encryption pair could not be read from the resource store; "
                "GET /v1/bucket answers 503 until it can"
            )

    async def cipher(self) -> BucketCipher:
        if self._cipher is None:
            try:
                self._cipher = await bucket_cipher(self._raw, self.store)  # type: ignore[arg-type]
            except (StorageError, SettingsError) as exc:
                log.warning("bucket encryption pair: %s", exc)
                raise store_unavailable() from None
        return self._cipher

    @staticmethod
    def handles(path: str) -> bool:
        return BUCKET.fullmatch(path) is not None

    async def handle(self, request: web.Request, principal: Principal, path: str) -> web.Response:
        if request.method != "GET":
            raise GatewayError(405, "Method is not allowed", headers={"Allow": "GET"})
        answer = bucket_answer(principal, await self.cipher())
        return web.Response(body=orjson.dumps(answer), content_type="application/json")
