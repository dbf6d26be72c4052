"""JSON parsing and tear-down in small steps, so that a worker thread never holds the GIL long.

A reload parses and validates a changed config in a worker thread while the event loop keeps
serving. Both share the GIL, and Python hands it over only between bytecodes: one `json.loads`
of a 13 MB file, or the release of a dict of 100,000 entries, is a single C call that keeps the
event loop waiting for its whole length (150-250 ms measured, bench/RESULTS.md "Reloads").
These helpers do the same work as many small calls instead.
"""

from __future__ import annotations

import codecs
import json
import re
import sys
from collections.abc import Callable
from typing import Any

_SPACE = re.compile(r"[ \t\n\r]*")
_COLON = re.compile(r"[ \t\n\r]*:[ \t\n\r]*")
_NEXT = re.compile(r"[ \t\n\r]*([,}])[ \t\n\r]*")
_DECODER = json.JSONDecoder()
# One value at an index (the C scanner; StopIteration if none); a string after its quote.
_scan: Callable[[str, int], tuple[Any, int]] = getattr(_DECODER, "scan_once")  # noqa: B009
_scanstring: Callable[[str, int], tuple[str, int]] = getattr(json.decoder, "scanstring")  # noqa: B009
DECODE_STEP = 1 << 20  # bytes decoded per call
SPLIT_DEPTH = 2  # objects this deep are parsed member by member (`keys`, `models`, ...)


class _Irregular(Exception):
    """Not a well-formed object where one was expected: `json.loads` gives the exact error."""


def decode_text(raw: bytes) -> str:
    """`raw` as `json.loads(raw)` decodes it (UTF-8, -16 or -32, as detected), a megabyte at a
    time; raises `UnicodeDecodeError` as it does."""
    decoder = codecs.getincrementaldecoder(json.detect_encoding(raw))("surrogatepass")
    parts = [decoder.decode(raw[i : i + DECODE_STEP]) for i in range(0, len(raw), DECODE_STEP)]
    parts.append(decoder.decode(b"", final=True))
    return "".join(parts)


def loads(raw: bytes) -> Any:
    """`json.loads(raw)`, the same result and the same errors, parsed in small steps: the
    top-level object and the objects it holds member by member, each member's value in one
    call. Anything else (an array at the top, invalid JSON) is left to `json.loads`."""
    text = decode_text(raw)
    try:
        value, index = _object(text, _SPACE.match(text, 0).end(), SPLIT_DEPTH)  # type: ignore[union-attr]
        if _SPACE.match(text, index).end() != len(text):  # type: ignore[union-attr]
            raise _Irregular  # "Extra data"
        return value
    except (_Irregular, StopIteration, json.JSONDecodeError, RecursionError):
        return json.loads(text)  # its error, with line and column; or its value


def _object(text: str, index: int, depth: int) -> tuple[dict[str, Any], int]:
    if not text.startswith("{", index):
        raise _Irregular
    result: dict[str, Any] = {}
    index = _SPACE.match(text, index + 1).end()  # type: ignore[union-attr]
    if text.startswith("}", index):
        return result, index + 1
    colon, after = _COLON.match, _NEXT.match
    while True:
        if not text.startswith('"', index):
            raise _Irregular
        name, index = _scanstring(text, index + 1)
        found = colon(text, index)
        if found is None:
            raise _Irregular
        index = found.end()
        if depth > 0 and text.startswith("{", index):
            value, index = _object(text, index, depth - 1)
        else:
            value, index = _scan(text, index)
        result[name] = value  # a name given twice: the last value, as json.loads keeps
        found = after(text, index)
        if found is None:
            raise _Irregular
        index = found.end()
        if found.group(1) == "}":
            return result, index


def dispose(trash: list[Any], *, owned: bool = False) -> None:
    """Release the trees in `trash` (dicts and lists, nested) a member at a time; `trash` is
    emptied. A container something else still holds (a value a validated model kept) is left
    whole to its holder: only what nothing else references is taken apart. `owned`: the
    containers in `trash` itself are emptied even if others hold them (the caller knows that
    nobody uses them any more)."""
    stack: list[Any] = []
    if owned:
        for container in trash:
            _empty(container, stack)
    else:
        stack = trash[::-1]
    trash.clear()
    while stack:
        node = stack.pop()
        # Held by `node` and getrefcount's argument only: nobody else has it.
        if sys.getrefcount(node) <= 2:
            _empty(node, stack)
        del node  # released here, once its own members are gone


def _empty(node: Any, into: list[Any]) -> None:
    if isinstance(node, dict):
        while node:
            into.append(node.popitem()[1])
    elif isinstance(node, list):
        while node:
            into.append(node.pop())
