"""Choosing the ledger from static settings (compatibility C58, C59).

No Redis settings: the embedded ledger (memory + SQLite). `redis.singleServerConfig.address` or
`redis.clusterServersConfig.nodeAddresses` (DIAL's Redisson settings): the shared Redis ledger,
with the embedded one (memory only) as the fallback of `limits.onStoreFailure: local`, and the
embedded file (`limits.embedded.file`) holding what that fallback still has to replay.
"""

from __future__ import annotations

from typing import Any, Literal

from tollgate.limits.ledger import Ledger
from tollgate.limits.memory import MemoryLedger
from tollgate.limits.replay import ReplayQueue
from tollgate.limits.resilient import ResilientLedger
from tollgate.settings import ClusterServersConfig, Settings


def redis_client(settings: Settings) -> Any | None:
    """A client for the configured server (`PipelinedRedis`) or cluster (redis-py's), or None.

    The `redis.*` settings were parsed and checked by `load_settings` (`Settings.redis`).
    """
    server = settings.redis.server if settings.redis is not None else None
    if server is None:
        return None
    if not isinstance(server, ClusterServersConfig):
        from tollgate.limits.pipelined_redis import PipelinedRedis

        assert server.address is not None  # `server` is the one server only when it has one
        host, port, tls = server.address
        # One pipelined connection instead of a pool: every command in flight shares it, and
        # Redis answers them in order (`connectionPoolSize` has no use here).
        return PipelinedRedis(
            host,
            port,
            db=server.database,
            username=server.username,
            password=server.password,
            tls=tls,
            timeout_s=server.timeout,
            connect_timeout_s=server.connect_timeout,
        )
    from redis.asyncio.cluster import ClusterNode, RedisCluster
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    nodes = server.node_addresses or []
    return RedisCluster(
        startup_nodes=[ClusterNode(node.host, node.port) for node in nodes],
        ssl=any(node.tls for node in nodes),
        max_connections=server.connection_pool_size,
        username=server.username,
        password=server.password,
        socket_timeout=server.timeout,
        socket_connect_timeout=server.connect_timeout,
        # One immediate retry (a pooled connection may have died with a Redis restart), no
        # back-off: a call must not wait seconds for a store that has a fallback.
        retry=Retry(NoBackoff(), 1),
    )


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
