"""Choosing the resource store and its change notices from static settings (compatibility C80)."""

from __future__ import annotations

from pathlib import Path

from tollgate.settings import ClusterServersConfig, RedisSettings
from tollgate.storage.notices import ChangeNotices, LocalNotices, RedisNotices
from tollgate.storage.settings import StorageSettings
from tollgate.storage.store import ResourceStore

CHANNEL = "tollgate:storage:{prefix}changes"


def filesystem_root(settings: StorageSettings, base_dir: Path) -> Path:
    """`<folder>/<bucket>[/<prefix>]`, the folder resolved against `base_dir` when relative."""
    root = Path(settings.folder)
    if not root.is_absolute():
        root = base_dir / root
    root = root / settings.bucket
    return root / settings.prefix if settings.prefix else root


def build_store(settings: StorageSettings, base_dir: Path | None = None) -> ResourceStore:
    """The store `storage.provider` names; `base_dir` (default: the working directory) anchors
    a relative filesystem folder. Object stores must have their bucket already (obstore
    creates none; `storage.createBucket` applies to the filesystem folder only)."""
    if settings.provider == "filesystem":
        from tollgate.storage.filesystem import FilesystemStore

        root = filesystem_root(settings, base_dir or Path.cwd())
        return FilesystemStore(root, create=settings.create_bucket)
    from tollgate.storage.objectstore import open_cloud_store

    return open_cloud_store(settings)


def build_notices(
    redis: RedisSettings | None, settings: StorageSettings, instance_id: str | None = None
) -> ChangeNotices:
    """Redis pub/sub when `redis.*` names a server or a cluster, else in-process notices."""
    server = redis.server if redis is not None else None
    if server is None:
        return LocalNotices(instance_id)
    from redis.asyncio import Redis

    if isinstance(server, ClusterServersConfig):
        # PUBLISH reaches every node of a cluster: one node serves both ends.
        assert server.node_addresses
        host, port, tls = server.node_addresses[0]
        database = 0
    else:
        assert server.address is not None
        host, port, tls = server.address
        database = server.database
    client = Redis(
        host=host,
        port=port,
        db=database,
        username=server.username,
        password=server.password,
        ssl=tls,
        socket_timeout=max(server.timeout, 1.0),
        socket_connect_timeout=server.connect_timeout,
        health_check_interval=30,
    )
    prefix = f"{settings.prefix}/" if settings.prefix else ""
    return RedisNotices(client, CHANNEL.format(prefix=prefix), instance_id)
