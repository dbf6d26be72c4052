"""Counting tokens offline, for a call whose upstream reported no usage.

Exact counts come from the BPE encodings that ship inside the ``quicktok`` package (MIT; token
ids identical to OpenAI's tiktoken): ``o200k_base`` for GPT-4o, GPT-4.1, GPT-4.5, GPT-5, the
o-series and gpt-oss; ``cl100k_base`` for GPT-4, GPT-3.5 and the OpenAI embedding models.
Nothing is ever downloaded: an encoding is read once from the installed package, on first use or
at :func:`preload`. Reading one takes 0.1-0.5 s and holds the GIL throughout (so a worker thread
does not spare the event loop), so the gateway reads those of its models' before it serves
(:func:`preload`); a count made with ``load=False`` (the estimate of a call, on the event loop)
never reads one, and estimates while it is not read yet (compatibility C73).

For any other model (Claude, Gemini, Llama, Mistral, a name Tollgate cannot place) and when the
package is missing, the count is an estimate: one token per four bytes of UTF-8, rounded up
(:func:`estimate_tokens`). English prose and code come out within about 10% of the BPE counts;
text in non-Latin scripts is under-counted by up to half. A non-empty text is never 0 tokens.

Prompt tokens of a request (:func:`count_messages`) follow OpenAI's published rule for chat
models: each message costs 3 tokens plus its role, content and other string fields, a ``name``
one more, and the reply is primed with 3. The same rule is applied to a Responses ``input`` (with
``instructions`` as a system message) and to an Anthropic ``messages`` list (with ``system``).
An image counts :data:`IMAGE_TOKENS` (:data:`LOW_DETAIL_IMAGE_TOKENS` at ``detail: low``), as
its size is not known without decoding it; tool definitions count as their compact JSON.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any, Final, Literal, Protocol, cast

import orjson

Encoding = Literal["o200k_base", "cl100k_base"]
Api = Literal["chat", "completions", "embeddings", "responses", "anthropic"]

BYTES_PER_TOKEN: Final = 4
TOKENS_PER_MESSAGE: Final = 3
TOKENS_PER_NAME: Final = 1
REPLY_PRIMING_TOKENS: Final = 3
# OpenAI's price of a 1024x1024 image at high detail (85 + 4 tiles of 170), and at low detail.
IMAGE_TOKENS: Final = 765
LOW_DETAIL_IMAGE_TOKENS: Final = 85

# After an optional `provider/` prefix; a family name ends the string or is followed by a
# version, date or variant (`gpt-4o-mini`, `gpt-4.1`, `o3-2025-04-16`, `gpt-35-turbo`).
_END: Final = r"(?:$|[-.:_@])"
_O200K: Final = re.compile(
    r"(?:gpt-4o|gpt-4\.1|gpt-4\.5|gpt-5|chatgpt-4o|o1|o3|o4|gpt-oss|codex-mini|computer-use)" + _END
)
_CL100K: Final = re.compile(
    r"(?:gpt-4|gpt-3\.5|gpt-35|text-embedding-3|text-embedding-ada-002|davinci-002|babbage-002)"
    + _END
)


class _Counter(Protocol):
    def count(self, text: str) -> int: ...


def encoding_for(model_hint: str | None) -> Encoding | None:
    """The encoding that counts `model_hint`'s tokens exactly, or None (then estimate)."""
    if not model_hint:
        return None
    name = model_hint.strip().lower().rpartition("/")[2]
    if _O200K.match(name):
        return "o200k_base"
    if _CL100K.match(name):
        return "cl100k_base"
    return None


# The encodings read so far (None: the package is not installed). Written once per encoding,
# read without a lock: a dict lookup is atomic.
_LOADED: dict[Encoding, _Counter | None] = {}


def _counter(encoding: Encoding) -> _Counter | None:
    """The encoding read from the installed package, once; None when it is not installed."""
    if encoding in _LOADED:
        return _LOADED[encoding]
    try:
        import quicktok  # type: ignore[import-untyped]
    except ImportError:
        counter = None
    else:
        counter = cast(_Counter, quicktok.get_encoding(encoding))
    _LOADED[encoding] = counter
    return counter


def preload(model_hint: str | None) -> bool:
    """Read `model_hint`'s encoding now (it takes a fraction of a second, better spent at
    start-up than in a call); True when its counts will be exact."""
    encoding = encoding_for(model_hint)
    return encoding is not None and _counter(encoding) is not None


def loaded(model_hint: str | None) -> bool:
    """Whether `model_hint`'s encoding is read already (its counts with ``load=False`` exact)."""
    encoding = encoding_for(model_hint)
    return encoding is not None and _LOADED.get(encoding) is not None


def model_hint(name: str, override_name: str | None, tokenizer_model: str | None) -> str:
    """What names a deployed model's tokenizer: its `tokenizerModel`, else its `overrideName`
    (the upstream's own name for it), else its deployment name."""
    return tokenizer_model or override_name or name


def estimate_tokens(text: str) -> int:
    """One token per four bytes of UTF-8, rounded up: 0 only for the empty text."""
    return math.ceil(len(text.encode("utf-8", "surrogatepass")) / BYTES_PER_TOKEN)


def _text_counter(model_hint: str | None, load: bool = True) -> Callable[[str], int]:
    encoding = encoding_for(model_hint)
    if encoding is None:
        return estimate_tokens
    counter = _counter(encoding) if load else _LOADED.get(encoding)
    if counter is None:
        return estimate_tokens
    count = counter.count

    def exact(text: str) -> int:
        try:
            return count(text)
        except (UnicodeError, ValueError, TypeError):  # a lone surrogate, which it refuses
            return estimate_tokens(text)

    return exact


def count_text(model_hint: str | None, text: str, *, load: bool = True) -> int:
    """Tokens of `text` for the model `model_hint` names: exact where its encoding is known,
    else :func:`estimate_tokens`. `load` False: an encoding not read yet is not read now (the
    count is estimated instead)."""
    return _text_counter(model_hint, load)(text)


def count_messages(
    request: Mapping[str, Any],
    *,
    model_hint: str | None = None,
    api: Api | None = None,
    load: bool = True,
) -> int:
    """Prompt tokens of a parsed request body: chat (`messages`), legacy completions
    (`prompt`), embeddings (`input`), Responses (`instructions`, `input`) or Anthropic Messages
    (`system`, `messages`). `model_hint` defaults to the body's `model`; `api` is inferred from
    the body when not given (`input` reads as Responses unless `api` says embeddings); `load`
    as in :func:`count_text`."""
    if model_hint is None:
        model = request.get("model")
        model_hint = model if isinstance(model, str) else None
    count = _text_counter(model_hint, load)
    if api is None:
        api = _infer_api(request)
    if api == "completions":
        return _count_plain(request.get("prompt"), count)
    if api == "embeddings":
        return _count_plain(request.get("input"), count)
    total = 0
    for field in ("system", "instructions"):  # Anthropic, Responses
        if field in request and request[field] is not None:
            total += _message_tokens({"role": "system", "content": request[field]}, count)
    messages = request.get("messages") if api != "responses" else None
    if isinstance(messages, list):
        total += sum(_message_tokens(message, count) for message in messages)
    raw_input = request.get("input") if api == "responses" else None
    if isinstance(raw_input, str):
        total += _message_tokens({"role": "user", "content": raw_input}, count)
    elif isinstance(raw_input, list):
        total += sum(_message_tokens(item, count) for item in raw_input)
    for field in ("tools", "functions"):
        if request.get(field):
            total += count(_json(request[field]))
    return total + REPLY_PRIMING_TOKENS


def _infer_api(request: Mapping[str, Any]) -> Api:
    if "messages" in request:
        return "anthropic" if "system" in request else "chat"
    if "prompt" in request:
        return "completions"
    return "responses"


def _json(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def _count_plain(value: Any, count: Callable[[str], int]) -> int:
    """A prompt or an input: a string, a list of strings, or token ids already."""
    if isinstance(value, str):
        return count(value)
    if isinstance(value, list):
        if value and all(isinstance(item, int) for item in value):
            return len(value)
        return sum(_count_plain(item, count) for item in value)
    return 0


def _message_tokens(message: Any, count: Callable[[str], int]) -> int:
    """One message or Responses input item, its per-message overhead included."""
    if not isinstance(message, Mapping):
        return 0
    total = TOKENS_PER_MESSAGE
    for key, value in message.items():
        if key == "content":
            total += _content_tokens(value, count)
        elif key in ("tool_calls", "function_call"):
            calls = value if isinstance(value, list) else [value]
            for call in calls:
                function = call.get("function", call) if isinstance(call, Mapping) else {}
                for part in ("name", "arguments"):
                    if isinstance(function.get(part), str):
                        total += count(function[part])
        elif key == "type" and value == "message":
            continue  # a Responses item's marker, not text the model reads
        elif isinstance(value, str):
            total += count(value)
            if key == "name":
                total += TOKENS_PER_NAME
    return total


def _content_tokens(content: Any, count: Callable[[str], int]) -> int:
    if isinstance(content, str):
        return count(content)
    if isinstance(content, Mapping):
        content = [content]
    if not isinstance(content, list):
        return 0
    return sum(_part_tokens(part, count) for part in content)


def _part_tokens(part: Any, count: Callable[[str], int]) -> int:
    """One content part of any of the three APIs."""
    if isinstance(part, str):
        return count(part)
    if not isinstance(part, Mapping):
        return 0
    kind = part.get("type")
    if isinstance(part.get("text"), str):  # text, input_text, output_text
        return count(part["text"])
    if kind in ("image_url", "input_image", "image"):
        image = part.get("image_url")
        detail = image.get("detail") if isinstance(image, Mapping) else part.get("detail")
        return LOW_DETAIL_IMAGE_TOKENS if detail == "low" else IMAGE_TOKENS
    if kind == "tool_use":
        return count(str(part.get("name", ""))) + count(_json(part.get("input", {})))
    if kind == "tool_result":
        return _content_tokens(part.get("content"), count)
    for field in ("thinking", "refusal"):
        if isinstance(part.get(field), str):
            return count(part[field])
    # Audio, files, documents and anything newer: their JSON, a rough but non-zero estimate.
    return count(_json(part))
