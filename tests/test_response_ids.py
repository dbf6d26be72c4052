"""Tollgate's Responses ids (compatibility C78): what they carry, what they refuse, and the
rewrite of the upstream's id in whole answers and in streams split anywhere."""

from __future__ import annotations

import orjson
import pytest

from tollgate.pipeline.response_ids import IdRewrite, ResponseRef, decode, encode

pytestmark = pytest.mark.unit

REF = ResponseRef("gpt/deployment", "us-east", "resp_abc123", "project one")


def test_an_id_carries_its_reference() -> None:
    made = encode(REF)
    assert made.startswith("resp_dial_")
    assert set(made) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
    assert decode(made) == REF


@pytest.mark.parametrize(
    "text",
    [
        "resp_abc",
        "resp_dial_",
        "resp_dial_!!!",
        "resp_dial_" + "A" * 5000,
        encode(REF).replace("resp_dial_", "resp_other_"),
        "resp_dial_" + encode(REF)[10:-2],  # cut short
    ],
)
def test_anything_else_is_no_id(text: str) -> None:
    assert decode(text) is None


@pytest.mark.parametrize("sneaky", ["../x", "a/b", "", "x" * 300, "résumé", "a b"])
def test_an_upstream_id_that_could_steer_a_url_is_refused(sneaky: str) -> None:
    assert decode(encode(REF._replace(response_id=sneaky))) is None


def stream() -> bytes:
    events = [
        ("response.created", {"response": {"id": "resp_abc123", "status": "in_progress"}}),
        ("response.output_text.delta", {"delta": "resp_abc123 is not quoted here"}),
        ("response.completed", {"response": {"id": "resp_abc123", "usage": {"total_tokens": 3}}}),
    ]
    return b"".join(
        b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **body}) + b"\n\n"
        for kind, body in events
    )


def rewritten(chunks: list[bytes]) -> bytes:
    rewrite = IdRewrite(REF._replace(response_id=""))
    return b"".join(rewrite.filter(chunk) for chunk in chunks) + rewrite.end()


def test_a_stream_split_at_every_byte_is_rewritten_the_same() -> None:
    data = stream()
    whole = rewritten([data])
    assert b'"resp_abc123"' not in whole
    assert whole.count(encode(REF).encode()) == 2
    assert b"resp_abc123 is not quoted here" in whole  # text that merely contains it stays
    for cut in range(1, len(data)):
        assert rewritten([data[:cut], data[cut:]]) == whole, cut
    assert rewritten([data[i : i + 1] for i in range(len(data))]) == whole


def test_a_whole_body_is_rewritten() -> None:
    body = orjson.dumps({"id": "resp_abc123", "object": "response", "output": []})
    rewrite = IdRewrite(REF._replace(response_id=""))
    assert orjson.loads(rewrite.body(body))["id"] == encode(REF)


def test_a_body_without_an_id_passes_as_it_is() -> None:
    rewrite = IdRewrite(REF._replace(response_id=""))
    assert rewrite.body(b'{"error": {"message": "x"}}') == b'{"error": {"message": "x"}}'
    assert rewrite.filter(b"data: {}\n\n") == b"data: {}\n\n"
