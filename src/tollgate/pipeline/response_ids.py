"""Responses API ids: what the client is given instead of the upstream's (compatibility C78).

A follow-up call (`GET /openai/v1/responses/{id}`, `DELETE`, `POST .../cancel`) must reach the
deployment and the upstream that made the response, on behalf of the project that made it.
DIAL keeps a mapping in its resource store; Tollgate puts the same facts into the id itself:

    resp_dial_<base64url of ["d1", deployment, upstream id, the upstream's response id, project]>

so that nothing is stored, every instance reads an id any other made, and a restart loses
nothing. The id is as hard to guess as the upstream's own (which it contains); a follow-up is
refused 403 `Access denied` to another project and is authorized against the deployment as any
call is. An upstream response id is accepted only in the characters ids are made of, so that a
made-up id cannot steer the upstream URL.

`IdRewrite` replaces the upstream's id with Tollgate's in what is relayed: a whole body, or a
stream line by line (the id is learnt from the first event that carries a `response`).
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Final, NamedTuple

import orjson

from tollgate.limits.usage import line_cut

PREFIX: Final = "resp_dial_"
VERSION: Final = "d1"
SAFE_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,256}")
# The response's id where OpenAI puts it, first in a stream event's `response` object.
RESPONSE_ID: Final = re.compile(rb'"response":\{"id":"([A-Za-z0-9_-]{1,256})"')
MAX_ID: Final = 4096
# A line longer than this is passed on as it comes, not held for its end (and not rewritten).
MAX_HELD_LINE: Final = 8 * 1024 * 1024


class ResponseRef(NamedTuple):
    """What a Tollgate response id says."""

    deployment: str
    upstream: str  # the `id` of the upstream that made it ("" without upstreams)
    response_id: str  # the upstream's own id
    project: str


def encode(ref: ResponseRef) -> str:
    payload = orjson.dumps([VERSION, *ref])
    return PREFIX + base64.urlsafe_b64encode(payload).rstrip(b"=").decode()


def decode(text: str) -> ResponseRef | None:
    """The reference in a Tollgate id, or None when `text` is not one."""
    if not text.startswith(PREFIX) or len(text) > MAX_ID:
        return None
    data = text[len(PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))
        value = orjson.loads(raw)
    except (binascii.Error, ValueError):
        return None
    if (
        type(value) is not list
        or len(value) != 5
        or value[0] != VERSION
        or not all(type(part) is str for part in value)
        or not SAFE_ID.fullmatch(value[3])
    ):
        return None
    return ResponseRef(value[1], value[2], value[3], value[4])


def upstream_id_of(body: bytes) -> str | None:
    """The `id` of a Responses object (a whole body), or None."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    found = value.get("id") if type(value) is dict else None
    return found if type(found) is str and SAFE_ID.fullmatch(found) else None


def _event_response_id(line: bytes) -> str | None:
    """`response.id` of a stream event's `data:` line, or None."""
    quick = RESPONSE_ID.search(line)
    if quick is not None:  # `"response":{"id":"..."`, as OpenAI writes it: no parse
        return quick[1].decode()
    stripped = line.strip()
    if not stripped.startswith(b"data:"):
        return None
    try:
        value = orjson.loads(stripped[5:])
    except orjson.JSONDecodeError:
        return None
    response = value.get("response") if type(value) is dict else None
    found = response.get("id") if type(response) is dict else None
    return found if type(found) is str and SAFE_ID.fullmatch(found) else None


class IdRewrite:
    """Puts Tollgate's id in place of the upstream's in what is relayed.

    For a whole body, `body`. For a stream, `filter` per chunk and `end` at its end, as
    `include_usage.HideUsage`: complete lines pass at once, a partial line waits for its end
    (a client acts on an event only at its end). Until the upstream's id is known (the first
    event with a `response`, normally `response.created`), lines are read for it; after, each
    chunk costs one substring replacement.
    """

    __slots__ = ("_carry", "_from", "_make", "_to")

    def __init__(self, make: ResponseRef) -> None:
        self._make = make  # the reference, with `response_id` still to learn
        self._from: bytes | None = None
        self._to = b""
        self._carry = b""

    def at(self, upstream: str) -> None:
        """The call's attempt goes to the upstream whose `id` is `upstream`."""
        self._make = self._make._replace(upstream=upstream)

    def learn(self, upstream_id: str) -> None:
        self._from = b'"' + upstream_id.encode() + b'"'
        self._to = b'"' + encode(self._make._replace(response_id=upstream_id)).encode() + b'"'

    def body(self, body: bytes) -> bytes:
        if self._from is None:
            found = upstream_id_of(body)
            if found is None:
                return body
            self.learn(found)
        assert self._from is not None
        return body.replace(self._from, self._to)

    def filter(self, chunk: bytes) -> bytes:
        known = self._from
        if known is not None and not self._carry and chunk.endswith(b"\n"):
            # Whole lines once the id is known (nearly every chunk): one substring search,
            # and a replacement in the few events that carry the response.
            return chunk.replace(known, self._to) if known in chunk else chunk
        data = self._carry + chunk if self._carry else chunk
        cut = line_cut(data)
        if cut < len(data) and len(data) - cut <= MAX_HELD_LINE:
            self._carry = data[cut:]
            data = data[:cut]
        else:
            self._carry = b""
        if self._from is None:
            for line in data.splitlines():
                if b'"response"' in line:
                    found = _event_response_id(line)
                    if found is not None:
                        self.learn(found)
                        break
            if self._from is None:
                return data
        assert self._from is not None
        return data.replace(self._from, self._to) if self._from in data else data

    def end(self) -> bytes:
        rest, self._carry = self._carry, b""
        if self._from is not None and rest:
            return rest.replace(self._from, self._to)
        return rest
