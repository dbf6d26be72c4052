"""`storage.*`: where resources live, as DIAL's static settings name it (compatibility C80).

`storage.provider` takes DIAL's (jclouds') provider ids: `filesystem` (the default: a folder,
nothing to set up), `aws-s3` or `s3` (S3 and S3-compatible servers), `google-cloud-storage`,
`azureblob`. `storage.bucket` is the bucket (container), `storage.prefix` a folder prepended to
every key (one bucket for several environments, no `/` in it), `storage.endpoint` an
S3-compatible (or emulator) endpoint, `storage.identity` and `storage.credential` the account
and its secret (unset: the cloud's default credentials). `storage.overrides` holds jclouds
properties; Tollgate reads `jclouds.filesystem.basedir` (the filesystem provider's folder),
`jclouds.regions` (the S3 region), `jclouds.oauth.credential-type` and `jclouds.azureblob.auth`,
and passes `obstore.<name>` entries to the object-store client as they are.

The filesystem folder defaults to `tollgate-storage/` beside the embedded usage file
(`limits.embedded.file`), so one instance keeps its state in one place.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, SecretStr, ValidationError, field_validator

from tollgate.settings import SettingsError, SettingsSection

PROVIDERS = ("filesystem", "s3", "aws-s3", "google-cloud-storage", "azureblob")
Provider = Literal["filesystem", "s3", "aws-s3", "google-cloud-storage", "azureblob"]
DEFAULT_FOLDER_NAME = "tollgate-storage"
BASEDIR_OVERRIDE = "jclouds.filesystem.basedir"
DEFAULT_USAGE_FILE = "tollgate-usage.sqlite"


def _provider(value: Any) -> Any:
    if value is None:
        return "filesystem"
    if value not in PROVIDERS:
        raise ValueError(f"expected one of {', '.join(PROVIDERS)}, got {value!r}")
    return value


def _text(value: Any) -> Any:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"expected true or false, got {value!r}")


def _overrides(value: Any) -> Any:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError("expected an object")
    return {str(name): str(item) for name, item in value.items() if item is not None}


class StorageSettings(SettingsSection):
    """The validated `storage` section; `credential` never appears in a repr or a log."""

    provider: Annotated[Provider, BeforeValidator(_provider)] = "filesystem"
    bucket: Annotated[str, BeforeValidator(lambda v: "dial" if v is None else v)] = "dial"
    prefix: Annotated[str | None, BeforeValidator(_text)] = None
    endpoint: Annotated[str | None, BeforeValidator(_text)] = None
    identity: Annotated[str | None, BeforeValidator(_text)] = None
    credential: SecretStr | None = Field(default=None, repr=False)
    create_bucket: Annotated[bool, BeforeValidator(_flag)] = True
    overrides: Annotated[dict[str, str], BeforeValidator(_overrides)] = Field(default_factory=dict)
    max_uploaded_file_size: int = Field(536870912, gt=0)
    # The filesystem provider's folder (the bucket is a directory in it): from `overrides`, else
    # beside `limits.embedded.file`; relative paths are resolved by `build_store`.
    folder: str = Field(DEFAULT_FOLDER_NAME, validation_alias="_folder")

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, value: str) -> str:
        if not isinstance(value, str) or not value or "/" in value or value in (".", ".."):
            raise ValueError(f"expected a bucket name without '/', got {value!r}")
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str | None) -> str | None:
        # DIAL: the prefix is one folder name; no `/` allowed (compatibility C80).
        if value is not None and ("/" in value or "\\" in value or value in (".", "..")):
            raise ValueError(f"must be one folder name without '/', got {value!r}")
        return value

    @field_validator("credential", mode="before")
    @classmethod
    def _credential(cls, value: Any) -> Any:
        return _text(value)

    @property
    def secret(self) -> str | None:
        return self.credential.get_secret_value() if self.credential is not None else None

    @classmethod
    def from_raw(cls, raw: Mapping[str, Any]) -> StorageSettings:
        """The `storage` section of the merged settings document (`Settings.raw`); a problem
        raises `SettingsError` as `setting storage.<field>: <what is wrong>`."""
        section = raw.get("storage")
        if section is None:
            section = {}
        if not isinstance(section, Mapping):
            raise SettingsError(f"setting storage: expected an object, got {section!r}")
        tree = dict(section)
        overrides = tree.get("overrides")
        basedir = overrides.get(BASEDIR_OVERRIDE) if isinstance(overrides, Mapping) else None
        tree["_folder"] = basedir or _beside_usage_file(raw)
        try:
            return cls.model_validate(tree)
        except ValidationError as exc:
            problems = []
            for error in exc.errors(include_input=False, include_url=False):
                path = ".".join(str(part) for part in error["loc"])
                message = str(error["msg"]).removeprefix("Value error, ")
                problems.append(f"setting storage.{path}: {message}")
            raise SettingsError("\n".join(problems)) from None


def _beside_usage_file(raw: Mapping[str, Any]) -> str:
    limits = raw.get("limits")
    embedded = limits.get("embedded") if isinstance(limits, Mapping) else None
    usage_file = embedded.get("file", DEFAULT_USAGE_FILE) if isinstance(embedded, Mapping) else None
    directory = os.path.dirname(usage_file) if isinstance(usage_file, str) and usage_file else ""
    return os.path.join(directory, DEFAULT_FOLDER_NAME) if directory else DEFAULT_FOLDER_NAME
