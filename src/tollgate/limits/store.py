"""Choosing the ledger from static settings (compatibility C58, C59).

No Redis settings: the embedded ledger (memory + SQLite). `redis.singleServerConfig.address` or
`redis.clusterServersConfig.nodeAddresses` (DIAL's Redisson settings): the shared Redis ledger,
with the embedded one (memory only) as the fallback of `limits.onStoreFailure: local`, and the
embedded file (`limits.embedded.file`) holding what that fallback still has to replay.
"""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import urlsplit

from tollgate.limits.ledger import Ledger
from tollgate.limits.memory import MemoryLedger
from tollgate.limits.replay import ReplayQueue
from tollgate.limits.resilient import ResilientLedger
from tollgate.settings import Settings, SettingsError

DEFAULT_TIMEOUT_MS = 1000  # a limits check must not hold a call for Redisson's 3 s
DEFAULT_POOL_SIZE = 64  # Redisson's connectionPoolSize default


def _address(text: Any, setting: str) -> tuple[str, int, bool]:
    if not isinstance(text, str):
        raise SettingsError(f"setting {setting}: expected redis://host:port, got {text!r}")
    url = urlsplit(text if "://" in text else f"redis://{text}")
    if url.scheme not in ("redis", "rediss") or not url.hostname:
        raise SettingsError(f"setting {setting}: expected redis://host:port, got {text!r}")
    return url.hostname, url.port or 6379, url.scheme == "rediss"


def redis_client(settings: Settings) -> Any | None:
    """A client for the configured server (`PipelinedRedis`) or cluster (redis-py's), or None."""
    redis_settings = settings.raw.get("redis")
    if not isinstance(redis_settings, dict):
        return None
    single = redis_settings.get("singleServerConfig") or {}
    cluster = redis_settings.get("clusterServersConfig") or {}
    common = single if single.get("address") else cluster
    timeout_s = float(common.get("timeout", DEFAULT_TIMEOUT_MS)) / 1000
    connect_s = float(common.get("connectTimeout", DEFAULT_TIMEOUT_MS)) / 1000
    if single.get("address"):
        from tollgate.limits.pipelined_redis import PipelinedRedis

        host, port, tls = _address(single["address"], "redis.singleServerConfig.address")
        # One pipelined connection instead of a pool: every command in flight shares it, and
        # Redis answers them in order (`connectionPoolSize` has no use here).
        return PipelinedRedis(
            host,
            port,
            db=int(single.get("database", 0)),
            username=common.get("username"),
            password=common.get("password"),
            tls=tls,
            timeout_s=timeout_s,
            connect_timeout_s=connect_s,
        )
    nodes = cluster.get("nodeAddresses")
    if nodes:
        from redis.asyncio.cluster import ClusterNode, RedisCluster
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        options: dict[str, Any] = {
            "username": common.get("username"),
            "password": common.get("password"),
            "socket_timeout": timeout_s,
            "socket_connect_timeout": connect_s,
            # One immediate retry (a pooled connection may have died with a Redis restart), no
            # back-off: a call must not wait seconds for a store that has a fallback.
            "retry": Retry(NoBackoff(), 1),
        }
        if not isinstance(nodes, list):
            raise SettingsError("setting redis.clusterServersConfig.nodeAddresses: expected a list")
        addresses = [_address(n, "redis.clusterServersConfig.nodeAddresses") for n in nodes]
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port, _ in addresses],
            ssl=any(tls for _, _, tls in addresses),
            max_connections=int(cluster.get("connectionPoolSize", DEFAULT_POOL_SIZE)),
            **options,
        )
    return None


def build_ledger(settings: Settings, client: Any | None) -> Ledger:
    """The ledger for these settings; `client` is `redis_client(settings)`."""
    if client is None:
        return MemoryLedger(settings.usage_file, settings.usage_flush_s)
    from tollgate.limits.redis_ledger import RedisLedger

    on_failure: Literal["local", "closed"] = settings.on_store_failure
    # The embedded ledger's file keeps this instance's replay queue: what it counted alone
    # while Redis was down survives a restart. `closed` queues nothing, but replays a file
    # left by an earlier `local` run.
    queue = ReplayQueue(settings.usage_file, settings.usage_flush_s, create=on_failure == "local")
    return ResilientLedger(
        RedisLedger(client), MemoryLedger(None), on_failure, ping=client.ping, queue=queue
    )


def describe(ledger: Ledger) -> dict[str, Any]:
    """What `/health` says of the store."""
    if isinstance(ledger, ResilientLedger):
        return {
            "store": "redis",
            "healthy": ledger.healthy,
            "onStoreFailure": ledger.on_failure,
            "pendingReplay": ledger.pending,
        }
    return {"store": "embedded", "healthy": True}
