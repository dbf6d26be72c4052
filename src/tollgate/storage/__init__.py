"""The resource store (compatibility C80): keys and roles of the Configuration API, files and
shares live here. `store` holds the interface, `filesystem` and `objectstore` the providers,
`notices` the change notices, `settings` the `storage.*` section, `build` the choice."""

from tollgate.storage.build import build_notices, build_store
from tollgate.storage.notices import (
    Change,
    ChangeNotices,
    LocalNotices,
    RedisNotices,
    Subscription,
)
from tollgate.storage.settings import StorageSettings
from tollgate.storage.store import (
    Blob,
    InvalidKey,
    NotFound,
    ObjectInfo,
    Page,
    PreconditionFailed,
    ResourceStore,
    StorageError,
    StoreUnavailable,
    check_folder,
    check_key,
)

__all__ = [
    "Blob",
    "Change",
    "ChangeNotices",
    "InvalidKey",
    "LocalNotices",
    "NotFound",
    "ObjectInfo",
    "Page",
    "PreconditionFailed",
    "RedisNotices",
    "ResourceStore",
    "StorageError",
    "StorageSettings",
    "StoreUnavailable",
    "Subscription",
    "build_notices",
    "build_store",
    "check_folder",
    "check_key",
]
