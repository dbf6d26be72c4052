"""Offline token counts: exact with the shipped encodings, a documented estimate otherwise."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tollgate.limits import tokens

pytestmark = pytest.mark.unit

# Counts from OpenAI's tiktoken with the official encoding files (checked against their
# published SHA-256), for strings where the two encodings differ as well as where they agree.
KNOWN: list[tuple[str, int, int]] = [  # text, cl100k_base, o200k_base
    ("hello world", 2, 2),
    ("Hello from the fake model.", 6, 6),
    ("tiktoken is great!", 6, 6),
    ("日本語のテキスト", 8, 6),
    ("antidisestablishmentarianism", 6, 6),
    ("def f(x):\n    return x ** 2\n", 11, 11),
    ("  multiple   spaces\n\n\nnewlines", 7, 7),
    ("🙂👍🏽 emoji", 9, 5),
    ("Здравствуйте, мир", 9, 3),
    ("<|endoftext|> is plain text here", 11, 11),  # a special token name, counted as text
]


@pytest.mark.parametrize(("text", "cl100k", "o200k"), KNOWN)
def test_exact_counts(text: str, cl100k: int, o200k: int) -> None:
    assert tokens.count_text("gpt-4", text) == cl100k
    assert tokens.count_text("gpt-3.5-turbo", text) == cl100k
    assert tokens.count_text("gpt-4o", text) == o200k
    assert tokens.count_text("gpt-5-mini", text) == o200k


@pytest.mark.parametrize(
    ("hint", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("GPT-4.1-nano", "o200k_base"),
        ("openai/gpt-5", "o200k_base"),
        ("gpt-5.1", "o200k_base"),
        ("o1", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("o4-mini-2025-04-16", "o200k_base"),
        ("chatgpt-4o-latest", "o200k_base"),
        ("gpt-oss-120b", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("gpt-4-0613", "cl100k_base"),
        ("gpt-35-turbo", "cl100k_base"),  # Azure's spelling
        ("gpt-3.5-turbo-16k", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("text-embedding-ada-002", "cl100k_base"),
        ("claude-sonnet-4-5", None),
        ("anthropic.claude-3-haiku", None),
        ("gemini-2.5-pro", None),
        ("o1x", None),
        ("gpt-40", None),
        ("my-deployment", None),
        ("", None),
        (None, None),
    ],
)
def test_encoding_for(hint: str | None, encoding: str | None) -> None:
    assert tokens.encoding_for(hint) == encoding


def test_estimate() -> None:
    assert tokens.estimate_tokens("") == 0
    assert tokens.estimate_tokens("a") == 1
    assert tokens.estimate_tokens("abcd") == 1
    assert tokens.estimate_tokens("abcde") == 2
    assert tokens.estimate_tokens("日本") == 2  # six bytes
    # A model without a shipped encoding gets the estimate.
    assert tokens.count_text("claude-sonnet-4-5", "x" * 1000) == 250
    assert tokens.count_text(None, "hello world") == 3


@given(st.text(min_size=1))
def test_estimate_bounds(text: str) -> None:
    size = len(text.encode("utf-8", "surrogatepass"))
    estimate = tokens.count_text("claude-x", text)
    assert estimate >= 1
    assert estimate == math.ceil(size / 4)


@given(st.text(min_size=1, alphabet=st.characters(exclude_categories=["Cs"])))
def test_exact_bounds(text: str) -> None:
    # A BPE token holds at least one byte, and a non-empty text has at least one token.
    count = tokens.count_text("gpt-4o", text)
    assert 1 <= count <= len(text.encode())


def test_lone_surrogate_is_estimated() -> None:
    assert tokens.count_text("gpt-4o", "a\ud800b") == 2


# OpenAI's own example (its cookbook "How to count tokens"): the API reported 129 prompt tokens
# for gpt-3.5-turbo and gpt-4, 124 for gpt-4o.
COOKBOOK_MESSAGES: list[dict[str, str]] = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate "
        "jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on "
        "opportunities for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client "
        "deliverable.",
    },
]


@pytest.mark.parametrize(("model", "expected"), [("gpt-4", 129), ("gpt-4o", 124)])
def test_chat_prompt_as_openai_counts_it(model: str, expected: int) -> None:
    request = {"model": model, "messages": COOKBOOK_MESSAGES}
    assert tokens.count_messages(request) == expected
    # The hint wins over the body's model.
    other = "gpt-4o" if model == "gpt-4" else "gpt-4"
    assert tokens.count_messages({**request, "model": other}, model_hint=model) == expected


def test_chat_parts_tools_and_images() -> None:
    def msg(content: Any) -> dict[str, Any]:
        return {"model": "gpt-4o", "messages": [{"role": "user", "content": content}]}

    plain = tokens.count_messages(msg("hello world"))
    assert plain == 3 + 1 + 2 + 3  # overhead, "user", the text, the reply's priming
    parts = [{"type": "text", "text": "hello"}, {"type": "text", "text": " world"}]
    assert tokens.count_messages(msg(parts)) == plain
    low = {"type": "image_url", "image_url": {"url": "data:,", "detail": "low"}}
    high = {"type": "image_url", "image_url": {"url": "data:,"}}
    assert tokens.count_messages(msg([low])) == 3 + 1 + tokens.LOW_DETAIL_IMAGE_TOKENS + 3
    assert tokens.count_messages(msg([high])) == 3 + 1 + tokens.IMAGE_TOKENS + 3
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
    with_call = {
        "model": "gpt-4o",
        "messages": [{"role": "assistant", "content": None, "tool_calls": [call]}],
    }
    counted = tokens.count_messages(with_call)
    assert counted == 3 + 1 + 1 + tokens.count_text("gpt-4o", '{"a":1}') + 3
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
    with_tools = {**msg("hello world"), "tools": [tool]}
    assert tokens.count_messages(with_tools) > plain


def test_responses_input() -> None:
    assert tokens.count_messages({"model": "gpt-4o", "input": "hello world"}) == 3 + 1 + 2 + 3
    request = {"model": "gpt-4o", "instructions": "be brief", "input": "hello world"}
    assert tokens.count_messages(request) == (3 + 1 + 2) + (3 + 1 + 2) + 3
    parts = [
        {"type": "input_text", "text": "hi"},
        {"type": "input_image", "image_url": "data:,", "detail": "low"},
    ]
    items = [
        {"type": "message", "role": "user", "content": parts},
        {"type": "function_call_output", "call_id": "c1", "output": "found it"},
    ]
    request = {"model": "gpt-4o", "input": items}
    message = 3 + 1 + 1 + tokens.LOW_DETAIL_IMAGE_TOKENS  # the item's type is not counted
    output = 3 + sum(tokens.count_text("gpt-4o", t) for t in ("function_call_output", "c1"))
    output += tokens.count_text("gpt-4o", "found it")
    assert tokens.count_messages(request) == message + output + 3


def test_anthropic_messages_are_estimated() -> None:
    request = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 64,
        "system": "You are terse.",  # 14 bytes: 4 tokens
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Hello there, Claude!"}]},
        ],
    }
    # system: 3 + "system" (2) + 4; user: 3 + "user" (1) + 20 bytes (5); priming: 3.
    assert tokens.count_messages(request) == 9 + 9 + 3
    blocks = [
        {"type": "tool_use", "id": "t", "name": "lookup", "input": {"q": "x"}},
        {"type": "tool_result", "tool_use_id": "t", "content": "found it"},
    ]
    request = {"model": "claude-x", "messages": [{"role": "user", "content": blocks}]}
    expected = 3 + 1 + (2 + 3) + 2 + 3  # "lookup", '{"q":"x"}', "found it"
    assert tokens.count_messages(request, api="anthropic") == expected


def test_completions_and_embeddings() -> None:
    assert tokens.count_messages({"model": "gpt-4", "prompt": "hello world"}) == 2
    assert tokens.count_messages({"model": "gpt-4", "prompt": ["hello", "hello world"]}) == 3
    embeddings = {"model": "text-embedding-3-small", "input": ["hello world", "hello"]}
    assert tokens.count_messages(embeddings, api="embeddings") == 3
    assert tokens.count_messages({"input": [1, 2, 3, 4]}, api="embeddings") == 4
    assert tokens.count_messages({"input": [[1, 2], [3]]}, api="embeddings") == 3


def test_without_the_package_every_count_is_estimated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "quicktok", None)  # `import quicktok` raises ImportError
    monkeypatch.setattr(tokens, "_LOADED", {})  # nothing read yet
    assert not tokens.preload("gpt-4o")
    assert not tokens.loaded("gpt-4o")
    assert tokens.count_text("gpt-4o", "Здравствуйте, мир") == math.ceil(31 / 4)
    monkeypatch.undo()
    assert tokens.preload("gpt-4o")
    assert tokens.count_text("gpt-4o", "Здравствуйте, мир") == 3


def test_a_count_that_must_not_load_estimates_until_preloaded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`load=False` (a call's estimate, on the event loop) never reads an encoding: until
    `preload` has, the count is bytes/4 (compatibility C73)."""
    monkeypatch.setattr(tokens, "_LOADED", {})
    text = "Здравствуйте, мир"
    request = {"model": "gpt-4o", "messages": [{"role": "user", "content": text}]}
    assert tokens.count_text("gpt-4o", text, load=False) == math.ceil(31 / 4)
    assert tokens.count_messages(request, load=False) == 3 + 1 + math.ceil(31 / 4) + 3
    assert not tokens.loaded("gpt-4o")  # and it was not read meanwhile
    assert tokens.preload("gpt-4o")
    assert tokens.loaded("gpt-4o")
    assert not tokens.loaded("gpt-4")  # another encoding
    assert not tokens.loaded("claude-x")  # none at all
    assert tokens.count_text("gpt-4o", text, load=False) == 3
    assert tokens.count_messages(request, load=False) == 3 + 1 + 3 + 3


def test_model_hint() -> None:
    """A model's `tokenizerModel`, else its `overrideName`, else its deployment name."""
    assert tokens.model_hint("my-model", "gpt-4o", "gpt-4") == "gpt-4"
    assert tokens.model_hint("my-model", "gpt-4o", None) == "gpt-4o"
    assert tokens.model_hint("my-model", None, None) == "my-model"
    assert tokens.model_hint("my-model", "", "") == "my-model"


def test_works_without_network_or_caches(tmp_path: Path) -> None:
    """In a fresh interpreter whose sockets all fail and whose cache directories are empty, the
    counts are still exact, and nothing is written to those directories."""
    script = textwrap.dedent(
        """
        import socket

        def refuse(*args, **kwargs):
            raise OSError("network disabled in this test")

        socket.socket.connect = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse

        from tollgate.limits import tokens

        assert tokens.preload("gpt-4o") and tokens.preload("gpt-4")
        print(tokens.count_text("gpt-4o", "Здравствуйте, мир"),
              tokens.count_text("gpt-4", "Здравствуйте, мир"))
        """
    )
    cache = tmp_path / "cache"
    cache.mkdir()
    env = {
        **os.environ,
        "HOME": str(cache),
        "XDG_CACHE_HOME": str(cache),
        "TIKTOKEN_CACHE_DIR": str(cache),
        "QUICKTOK_DATA": str(cache),
        "HF_HUB_OFFLINE": "1",
    }
    src = Path(__file__).resolve().parents[1] / "src"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["3", "9"]
    assert list(cache.iterdir()) == []
