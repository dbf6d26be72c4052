"""Read, merge and validate DIAL config files into a `Config` (compatibility C3).

Every problem is reported with the file it comes from, its JSON path and DIAL's message; secrets
that appear in a path (the names of `keys` entries) are replaced by their fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tollgate.config import chunked
from tollgate.config.key_names import fingerprint_of_name
from tollgate.config.merge import deep_merge
from tollgate.config.schema import Config


class ConfigError(Exception):
    """The config cannot be used; `problems` lists each one, already formatted for operators."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = tuple(problems)


@dataclass(frozen=True, slots=True)
class SourceFile:
    path: str
    tree: dict[str, Any]


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    config: Config
    digest: str  # of all file contents, to skip rebuilding when nothing changed


def read_source(path: str, *, in_steps: bool = False) -> tuple[SourceFile, bytes]:
    """One config file, parsed; syntax errors name the line and column. `in_steps`: parsed
    in small steps (`chunked.loads`), for a worker thread beside a serving event loop."""
    raw = _read_bytes(path)
    try:
        tree = chunked.loads(raw) if in_steps else json.loads(raw)
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: the file is not UTF-8 text"]) from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(
            [f"{path}: line {exc.lineno} column {exc.colno}: invalid JSON: {exc.msg}"]
        ) from exc
    if not isinstance(tree, dict):
        raise ConfigError([f"{path}: $: the top level must be a JSON object"])
    return SourceFile(path, tree), raw


def _display_path(loc: Sequence[int | str]) -> str:
    """`("keys", "secret", "project")` → `keys["sha256:1a2b3c4d…"].project` (no secret shown)."""
    text = "$"
    for index, part in enumerate(loc):
        if isinstance(part, int):
            text += f"[{part}]"
            continue
        if index == 1 and loc[0] == "keys":
            text += f'["{fingerprint_of_name(part)}"]'
        elif part.isidentifier():
            text += f".{part}"
        else:
            text += f"[{json.dumps(part)}]"
    return text


def _origin(sources: Sequence[SourceFile], loc: Sequence[int | str]) -> str:
    """The last file that defines the longest prefix of `loc`: where the problem was written."""
    for depth in range(len(loc), -1, -1):
        prefix = loc[:depth]
        for source in reversed(sources):
            node: Any = source.tree
            found = True
            for part in prefix:
                in_object = isinstance(node, dict) and isinstance(part, str) and part in node
                in_array = isinstance(node, list) and isinstance(part, int) and part < len(node)
                if in_object or in_array:
                    node = node[part]
                else:
                    found = False
                    break
            if found and depth > 0:
                return source.path
    return ", ".join(source.path for source in sources)


def _message(error: Any) -> str:
    message = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            return message[len(prefix) :]
    return message


def _json_loc(error: Any, tree: dict[str, Any]) -> tuple[int | str, ...]:
    """Pydantic's location with its internal union/validator tags removed."""
    loc: list[int | str] = []
    node: Any = tree
    for part in error["loc"]:
        if part == "[key]":
            continue  # a dict key's own validation (a `keys` name): the entry is the place
        if isinstance(node, dict) and isinstance(part, str):
            if part in node:
                loc.append(part)
                node = node[part]
                continue
            # A missing field (or an alias): keep it, it names what is wrong.
            loc.append(part)
            node = None
        elif isinstance(node, list) and isinstance(part, int):
            loc.append(part)
            node = node[part] if part < len(node) else None
        elif node is None and isinstance(part, str) and not part.startswith(("function-", "str")):
            loc.append(part)
    return tuple(loc)


def _read_bytes(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError([f"{path}: File not found: {path}"]) from exc
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read file: {exc.strerror}"]) from exc


def _digest_update(digest: Any, path: str, raw: bytes) -> None:
    # In three parts: the file is never copied (hashing a large buffer releases the GIL).
    digest.update(path.encode() + b"\0")
    digest.update(raw)
    digest.update(b"\0")


def files_digest(paths: Sequence[str]) -> str:
    """The digest `load_config` gives these files, from their bytes alone (no parsing): what a
    periodic reload compares before it does anything else."""
    digest = hashlib.sha256()
    problems: list[str] = []
    for path in paths:
        try:
            with Path(path).open("rb") as file:
                digest.update(path.encode() + b"\0")
                # In 256 KiB reads, each hashed without the GIL: never the whole file at once.
                while block := file.read(1 << 18):
                    digest.update(block)
                digest.update(b"\0")
        except FileNotFoundError:
            problems.append(f"{path}: File not found: {path}")
        except OSError as exc:
            problems.append(f"{path}: cannot read file: {exc.strerror}")
    if problems:
        raise ConfigError(problems)
    return digest.hexdigest()


def load_config(
    paths: Sequence[str], *, overwrite_arrays: bool = False, in_steps: bool = False
) -> LoadedConfig:
    """Read every file in order, deep-merge them (compatibility C2) and validate the result.

    `in_steps`: for a reload in a worker thread, the files are parsed and their trees released
    in small steps (`config.chunked`), so that the event loop never waits long for the GIL.
    """
    if not paths:
        raise ConfigError(["no config files: pass --config FILE or set config.files in settings"])
    sources: list[SourceFile] = []
    digest = hashlib.sha256()
    problems: list[str] = []
    for path in paths:
        try:
            source, raw = read_source(path, in_steps=in_steps)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        sources.append(source)
        _digest_update(digest, path, raw)
        del source, raw
    if problems:
        raise ConfigError(problems)

    merged: dict[str, Any] = {}
    for source in sources:
        merged = deep_merge(merged, source.tree, overwrite_arrays=overwrite_arrays)
    try:
        config = Config.model_validate(merged)
    except ValidationError as exc:
        for error in exc.errors(include_input=False, include_url=False):
            loc = _json_loc(error, merged)
            problems.append(f"{_origin(sources, loc)}: {_display_path(loc)}: {_message(error)}")
        raise ConfigError(problems) from None
    if in_steps:
        # The trees are garbage now; what the config kept of them (`Any` values) stays.
        trash: list[Any] = [merged, *(source.tree for source in sources)]
        del merged, sources, source
        chunked.dispose(trash)
    return LoadedConfig(config=config, digest=digest.hexdigest())
