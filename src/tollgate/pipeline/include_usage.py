"""Asking an OpenAI-style upstream for stream usage, and hiding it from a client that did not.

OpenAI and Azure OpenAI put `usage` into a chat or completions stream only when the request has
`stream_options.include_usage: true`: then every chunk carries `"usage": null` and one last
chunk, just before `data: [DONE]`, has `"choices": []` and the usage. Without the option no
chunk has a `usage` member at all. `ask_for_usage` adds the option to a request; `HideUsage`
takes both traces out of the answer again, so that the client sees the stream it asked for
while the call is still charged what it used.

A client that set `include_usage: false` asked not to see usage: it is asked for all the same,
and hidden. A usage object on a chunk that also has choices is left alone: an upstream that
sends one there (as DIAL's adapters do) sends it unasked.
"""

from __future__ import annotations

import re
from typing import Any, Final

import orjson

from tollgate.limits.usage import USAGE, Usage, line_end

INCLUDE_USAGE: Final = b'"stream_options":{"include_usage":true},'
# An event longer than this is passed on as it comes: no OpenAI chunk is near it, and holding it
# back would delay the client and hold the memory.
MAX_EVENT: Final = 1024 * 1024
# A top-level `"usage": null` where OpenAI puts it: after `choices`, followed only by simple
# members (`"obfuscation": "..."`) and the object's end. Only scalars and strings without
# quotes or escapes may follow, so no nested object can close after it: in a line that is a
# JSON object, it is a member of that object. Matched from the `"usage"`, the comma before it
# found by hand (a regex search backwards from the line's end costs several times more).
NULL_TAIL: Final = re.compile(
    rb'"usage"[ \t]*:[ \t]*null'
    rb'(?=(?:[ \t]*,[ \t]*"[^"\\]*"[ \t]*:[ \t]*(?:"[^"\\]*"|null|true|false|-?[0-9.eE+-]+))*'
    rb"[ \t]*\}[ \t]*(?:\r|\n|\Z))"
)
NULL_MEMBER: Final = re.compile(rb'"usage"[ \t]*:[ \t]*null')
# OpenAI's own spelling of the member and of what may follow it, for the quick cut of
# `HideUsage._one_event`.
NULL_USAGE: Final = b',"usage":null'
NULL_END: Final = NULL_USAGE + b"}\n\n"
OBFUSCATION: Final = b',"obfuscation":"'
EMPTY_CHOICES: Final = b'"choices":[]'
SPACE: Final = b" \t"
DROP: Final = b""  # an event or line to remove
# Every blank line (two line ends in a row, each LF, CR or CRLF) contains one of these.
BLANK_LINE_PAIRS: Final = (b"\n\n", b"\r\r", b"\n\r")


def ask_for_usage(body: bytes, parsed: dict[str, Any]) -> bytes | None:
    """`body` with `stream_options.include_usage: true`, or None when nothing is to change.

    For an OpenAI-style chat/completions or completions request (`parsed` is `body` parsed):
    None when the call is not streamed, when the client already asked for usage, or when its
    `stream_options` or `include_usage` is of a kind the upstream would refuse anyway (its
    answer then stays the one the client would get without Tollgate). Other `stream_options`
    members are kept. Without `stream_options` the member is written in front of the client's
    bytes, which stay as they are; otherwise the body is serialized again.
    """
    if parsed.get("stream") is not True:
        return None
    options = parsed.get("stream_options")
    if options is None:
        if "stream_options" not in parsed:
            start = body.find(b"{") + 1
            if start:
                return body[:start] + INCLUDE_USAGE + body[start:]
        options = {}
    if type(options) is not dict:
        return None
    include = options.get("include_usage")
    if include is not None and include is not False:  # true, or a value the upstream refuses
        return None
    rewritten = dict(parsed)
    rewritten["stream_options"] = {**options, "include_usage": True}
    try:
        return orjson.dumps(rewritten)
    except TypeError:  # a value orjson cannot write (an integer beyond 64 bits, say)
        return None


class HideUsage:
    """Takes out of an OpenAI-style SSE stream what `include_usage` added.

    Removed: the usage-only event (one whose `data:` object has a `usage` object and empty or
    no `choices`), whole, and every `"usage": null` member. The usage removed is kept in
    `usage`, so that the call is still charged it. Everything else passes byte for byte: event
    order, other members, comments, line endings (LF, CRLF or CR).

    `filter` returns what may be sent now: the complete events. A chunk of whole events
    without a `"usage"` is returned as it is (a substring search, no copy). A partial event is
    held until its blank line arrives, which costs the client nothing, as a client acts on an
    event only at its end; `end` returns what is held when the stream ends.
    """

    __slots__ = ("_carry", "_clean", "_passing", "usage")

    def __init__(self) -> None:
        self._carry = b""
        self._passing: bytes | None = None  # in an overlong event: the last byte passed on
        self._clean = True  # nothing carried, not passing
        self.usage: Usage | None = None

    def filter(self, chunk: bytes) -> bytes:
        if (
            chunk.endswith(NULL_END)
            and self._clean
            and chunk.find(b"\n") == len(chunk) - 2
            and chunk.startswith(b"data:")
        ):
            # One event of one line that ends with the member (OpenAI's chunks as the fake
            # model writes them): the quickest cut, a few C calls.
            return chunk[: -len(NULL_END)] + b"}\n\n"
        if self._clean and (chunk.endswith(b"\n\n") or chunk.endswith(b"\n\r\n")):
            # Whole events: as they are, or with OpenAI's `"usage":null` members cut.
            if USAGE not in chunk:
                return chunk
            if chunk.startswith(b"data:") and chunk.find(b"\n") == len(chunk) - 2:
                # One event of one LF-framed line, as OpenAI writes them: the quick cuts.
                quick = self._one_event(chunk)
                if quick is not None:
                    return quick
            if b"\r" not in chunk:  # several events, framed by LF alone: each on its own
                return self._lf_events(chunk)
            stripped = _without_null_tails(chunk)
            if stripped is not None:
                return stripped
        if self._passing is not None:
            head, chunk = self._pass_event(chunk)
            if not chunk:
                return head
            return head + self.filter(chunk)
        data = self._carry + chunk if self._carry else chunk
        cut = _event_cut(data)
        if len(data) - cut > MAX_EVENT:
            # An overlong event goes on as it comes, unchanged, to its end (`_pass_event`).
            self._carry = b""
            self._passing = data[-1:]
            self._clean = False
            return self._events(data[:cut]) + data[cut:]
        self._carry = data[cut:]
        self._clean = not self._carry
        if not cut:
            return b""
        return self._events(data[:cut] if cut < len(data) else data)

    def _one_event(self, chunk: bytes) -> bytes | None:
        """A chunk that is one `data:` line and its blank line, through `_quick`."""
        quick = self._quick(chunk[:-2])
        if quick is None or quick == DROP:
            return quick
        return quick + b"\n\n"

    def _quick(self, line: bytes) -> bytes | None:
        """One `data:` line (without its line end) as OpenAI writes them: without its
        `"usage":null` when that is its last member (or only OpenAI's `obfuscation` follows),
        DROP when it is the usage-only event; None for anything else (the general path)."""
        hit = line.rfind(NULL_USAGE)
        if hit >= 0:
            if line.find(USAGE) != hit + 1:
                return None  # another `"usage"` before it
            rest = line[hit + len(NULL_USAGE) :]
            if rest == b"}" or (
                rest.startswith(OBFUSCATION) and rest.endswith(b'"}') and rest.count(b'"') == 4
            ):
                return line[:hit] + rest
            return None
        if EMPTY_CHOICES not in line:
            return None
        try:  # the usage-only event: `"choices":[]` and a usage object
            document = orjson.loads(line[5:])
        except orjson.JSONDecodeError:
            return None
        if type(document) is not dict or document.get("choices") != []:
            return None
        usage = document.get("usage")
        if type(usage) is not dict:
            return None
        self.usage = Usage.from_object(usage)
        return DROP

    def end(self) -> bytes:
        """What was held back (a last event without its blank line), filtered."""
        carry, self._carry = self._carry, b""
        self._passing = None
        self._clean = True
        return self._events(carry) if carry else b""

    def _pass_event(self, chunk: bytes) -> tuple[bytes, bytes]:
        """The rest of an overlong event (passed unchanged), and what follows it."""
        assert self._passing is not None
        joined = self._passing + chunk
        end = _blank_line_end(joined, 0, _complete(joined))
        if end < 0:
            self._passing = chunk[-1:] or self._passing
            return chunk, b""
        self._passing = None
        self._clean = True
        end -= 1  # `joined` starts with a byte already passed on
        return chunk[:end], chunk[end:]

    def _events(self, block: bytes) -> bytes:
        """`block` (whole events, the last possibly without its blank line), filtered."""
        if USAGE not in block:
            return block
        if b"\r" not in block:
            return self._lf_events(block)
        stripped = _without_null_tails(block)
        if stripped is not None:
            return stripped
        parts: list[bytes] = []
        kept = 0  # block[kept:] is still to be copied
        hit = block.find(USAGE)
        while hit >= 0:
            start = _blank_line_before(block, hit, kept)
            end = _blank_line_end(block, hit)
            if end < 0:
                end = len(block)
            event = block[start:end]
            # Each event by the quick cut first: one event of a different kind (the usage-only
            # one) must not send every other event of the block through a parse.
            rewritten = _without_null_tails(event)
            if rewritten is None:
                rewritten = self._rewrite_event(event)
            if rewritten is not None:
                parts.append(block[kept:start])
                parts.append(rewritten)
                kept = end
            hit = block.find(USAGE, end)
        if not parts:
            return block
        parts.append(block[kept:])
        return b"".join(parts)

    def _lf_events(self, block: bytes) -> bytes:
        """`_events` for a block framed by LF alone (as OpenAI's are): split into events once,
        each event with `"usage"` cut on its own, so that the usage-only event does not send
        the events around it through the general path."""
        if NULL_END in block:
            # OpenAI's `,"usage":null}` closing a data line before its blank line: that `}`
            # ends the line's object, so the member is a top-level one (in a string its quotes
            # would be escaped). One C call for the whole read.
            block = block.replace(NULL_END, b"}\n\n")
        hit = block.find(USAGE)
        if hit < 0:
            return block
        if block.find(USAGE, hit + 1) < 0:  # one event left with a "usage": cut it alone
            start = block.rfind(b"\n\n", 0, hit)
            start = 0 if start < 0 else start + 2
            end = block.find(b"\n\n", hit)
            event = block[start:end]
            if end >= 0 and event.startswith(b"data:") and b"\n" not in event:
                quick = self._quick(event)
                if quick == DROP:
                    return block[:start] + block[end + 2 :]
                if quick is not None:
                    return block[:start] + quick + block[end:]
        events = block.split(b"\n\n")
        kept: list[bytes] = []
        changed = False
        last = len(events) - 1
        lines = b""  # empty lines in front of a dropped event: they stay
        for index, event in enumerate(events):
            if USAGE in event:
                rewritten = (
                    self._quick(event)
                    if event.startswith(b"data:") and b"\n" not in event
                    else None
                )
                if rewritten is None:
                    rewritten = _without_null_tails(event)
                if rewritten is None:
                    rewritten = self._rewrite_event(event)
                if rewritten is not None:
                    changed = True
                    if rewritten == DROP:
                        lines += event[: len(event) - len(event.lstrip(b"\n"))]
                        if index == last:  # an event without its blank line (at `end`)
                            kept.append(lines)  # the blank line before it stays
                        continue
                    event = rewritten
            kept.append(lines + event if lines else event)
            lines = b""
        return b"\n\n".join(kept) if changed else block

    def _rewrite_event(self, event: bytes) -> bytes | None:
        """An event with `"usage"` in it: None to keep it, DROP, or its new bytes."""
        parts: list[bytes] = []
        kept = 0
        hit = event.find(USAGE)
        while hit >= 0:
            start = max(event.rfind(b"\n", 0, hit), event.rfind(b"\r", 0, hit)) + 1
            end = line_end(event, hit)
            rewritten = self._rewrite_line(event[start:end])
            if rewritten == DROP:  # a rewritten line is never empty: it starts with `data:`
                return DROP
            if rewritten is not None:
                parts.append(event[kept:start])
                parts.append(rewritten)
                kept = end
            hit = event.find(USAGE, end)
        if not parts:
            return None
        parts.append(event[kept:])
        return b"".join(parts)

    def _rewrite_line(self, line: bytes) -> bytes | None:
        """A line with `"usage"` in it: None to keep it, DROP for the usage-only event's data,
        or the line without its `"usage": null`."""
        if not line.startswith(b"data:"):
            return None
        # The common case, OpenAI's `...],"usage":null,"obfuscation":"..."}`, is cut without
        # a parse (see NULL_TAIL).
        hit = line.rfind(USAGE)
        comma = _comma_before(line, hit)
        if comma >= 0:
            tail = NULL_TAIL.match(line, hit)
            if tail is not None:
                return line[:comma] + line[tail.end() :]
        try:
            document = orjson.loads(line[5:])
        except orjson.JSONDecodeError:
            return None
        if type(document) is not dict or "usage" not in document:
            return None
        usage = document["usage"]
        if usage is None:
            return _without_null_usage(line, document)
        choices = document.get("choices", [])
        if type(usage) is dict and type(choices) is list and not choices:
            self.usage = Usage.from_object(usage)
            return DROP
        return None


def _comma_before(data: bytes, position: int) -> int:
    """The index of the comma just before `data[position]` (at most one space between), or -1."""
    before = position - 1
    if before > 0 and data[before] == 0x20:
        before -= 1
    return before if before >= 0 and data[before] == 0x2C else -1


def _without_null_tails(block: bytes) -> bytes | None:
    """`block` without its `data:` lines' trailing `"usage": null` members (see NULL_TAIL),
    or None when it has a `"usage"` of another kind, for the general path."""
    parts: list[bytes] = []
    kept = 0
    hit = block.find(USAGE)
    while hit >= 0:
        comma = hit - 1  # `_comma_before`, inlined: this runs for every chunk of such a stream
        if comma > 0 and block[comma] == 0x20:
            comma -= 1
        if comma < 0 or block[comma] != 0x2C:
            return None
        tail = NULL_TAIL.match(block, hit)
        if tail is None:
            return None
        line_start = block.rfind(b"\n", 0, hit) + 1
        if not block.startswith(b"data:", line_start) or block.find(b"\r", line_start, hit) >= 0:
            return None  # not a data line, or lines ended by CR alone: the general path
        parts.append(block[kept:comma])
        kept = tail.end()
        hit = block.find(USAGE, kept)
    if not parts:
        return block
    parts.append(block[kept:])
    return b"".join(parts)


def _without_null_usage(line: bytes, document: dict[str, Any]) -> bytes:
    """`line` without its top-level `"usage": null` member, other bytes kept where possible."""
    del document["usage"]
    for member in reversed(list(NULL_MEMBER.finditer(line))):
        start, end = member.span()
        before = line[:start].rstrip(SPACE)
        rest = line[end:].lstrip(SPACE)
        if rest.startswith(b","):  # a member follows: take its comma
            candidate = line[:start] + rest[1:].lstrip(SPACE)
        elif before.endswith(b","):  # the last member: take the comma before it
            candidate = before[:-1] + line[end:]
        else:  # the only member
            candidate = line[:start] + line[end:]
        try:
            if orjson.loads(candidate[5:]) == document:
                return candidate
        except orjson.JSONDecodeError:
            continue
    prefix = b"data: " if line.startswith(b"data: ") else b"data:"
    return prefix + orjson.dumps(document)


def _complete(data: bytes) -> int:
    """How much of `data` holds whole line ends: a CR at its very end may be half of a CRLF."""
    return len(data) - 1 if data[-1:] == b"\r" else len(data)


def _event_cut(data: bytes) -> int:
    """Where the whole events of `data` end: after its last blank line (0 if none)."""
    limit = _complete(data)
    last = max(data.rfind(pair, 0, limit) for pair in BLANK_LINE_PAIRS)
    if last < 0:
        return 0
    end = last + 2
    return end + 1 if data[end - 1 : end + 1] == b"\r\n" else end


def _blank_line_end(data: bytes, position: int, limit: int | None = None) -> int:
    """The index after the first blank line that ends after `position` (and, with `limit`,
    lies before it), or -1."""
    stop = len(data) if limit is None else limit
    found = [at for at in (data.find(pair, position, stop) for pair in BLANK_LINE_PAIRS) if at >= 0]
    if not found:
        return -1
    end = min(found) + 2
    return end + 1 if data[end - 1 : end + 1] == b"\r\n" else end


def _blank_line_before(data: bytes, position: int, floor: int) -> int:
    """Where the event holding `data[position]` starts: after the last blank line before it,
    at least `floor` (itself an event's start)."""
    last = max(data.rfind(pair, floor, position) for pair in BLANK_LINE_PAIRS)
    if last < 0:
        return floor
    end = last + 2
    return end + 1 if data[end - 1 : end + 1] == b"\r\n" else end
