"""Step 6b: the usage a call is counted with, estimated when a successful answer reported none.

A 200 answer of a model normally reports its usage, and that is what the call is charged. When
it reports none (an OpenAI-style stream whose upstream ignored `stream_options`, an upstream
that never reports usage, a client that left before the usage came), Tollgate counts the
tokens itself rather than charge nothing (compatibility C71): the prompt from the request
(`limits.tokens.count_messages`), the completion from the text the answer carried (what the
relay kept of a stream, or the whole body), with the model's offline encoding when it is read
already, else one token per four bytes (compatibility C73). The call is marked estimated
(`Relayed.estimated`, the note's `usage_estimated`), for the access log and the metric.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from tollgate.limits.tokens import Api, count_messages, count_text, model_hint
from tollgate.limits.usage import Usage, clamp
from tollgate.snapshot import Kind

if TYPE_CHECKING:
    from tollgate.pipeline.call import Call
    from tollgate.pipeline.relay import Relayed
    from tollgate.snapshot import Deployment

# The request body's shape per API of the path (`Call.api`), for the prompt count.
PROMPT_APIS: Final[dict[str, Api]] = {
    "chat/completions": "chat",
    "completions": "completions",
    "embeddings": "embeddings",
    "responses": "responses",
    "anthropic/messages": "anthropic",
}
# The same by the answer's usage format, for an API this table does not know yet.
FORMAT_APIS: Final[dict[str, Api]] = {"responses": "responses", "anthropic": "anthropic"}


def counted_usage(call: Call) -> Usage | None:
    """The usage `call` is counted with, once its answer was relayed: the upstream's, or
    (a 200 answer of a model that reported none) Tollgate's estimate, which then replaces
    `call.relayed` so that the settle step charges it."""
    relayed = call.relayed
    if relayed is None:
        return None
    usage = relayed.usage
    if relayed.estimated and call.note is not None:  # a stream cut by its budget (C79)
        call.note.usage_estimated = True
    deployment = call.deployment
    if (
        usage is not None
        or relayed.usage_format is None  # a hop that reads no usage
        or relayed.response.status != 200
        or deployment is None
        or deployment.kind is not Kind.MODEL
    ):
        return usage
    usage = estimate(call, relayed, deployment)
    call.relayed = relayed._replace(usage=usage, estimated=True)
    if call.note is not None:
        call.note.usage_estimated = True
    return usage


def tokenizer_of(deployment: Deployment) -> str:
    """The model name its tokens are counted by: `tokenizerModel`, `overrideName`, its name."""
    tokenizer = getattr(deployment.spec, "tokenizer_model", None)
    return model_hint(deployment.name, deployment.override_name, tokenizer)


def estimate(call: Call, relayed: Relayed, deployment: Deployment) -> Usage:
    """Prompt tokens of the request and completion tokens of what the answer carried.

    Never loads an encoding (this runs on the event loop): a model whose encoding was not
    read at start-up counts one token per four bytes. An answer that
    produced anything is never 0 tokens.
    """
    hint = tokenizer_of(deployment)
    usage_format = relayed.usage_format
    api = PROMPT_APIS.get(call.api)
    if api is None and usage_format is not None:
        api = FORMAT_APIS.get(usage_format.name)
    prompt = count_messages(call.parsed, model_hint=hint, api=api, load=False)
    completion = 0
    if api != "embeddings":  # an embedding has no completion part (compatibility C20)
        completion = _completion(relayed, hint)
    total = clamp(prompt + completion)
    if total == 0 and _size(relayed) > 0:
        total = completion = 1  # something came back: not free
    return Usage(prompt, completion, total)


def _completion(relayed: Relayed, hint: str) -> int:
    produced = relayed.produced
    if produced is not None:
        text = produced.text()
    elif relayed.usage_format is not None:
        text = relayed.usage_format.text(relayed.body)
    else:
        text = None
    if text is None:  # not text Tollgate can read (or past what it keeps): by its size
        return (_size(relayed) + 3) // 4
    return count_text(hint, text, load=False) if text else 0


def _size(relayed: Relayed) -> int:
    produced = relayed.produced
    return produced.size() if produced is not None else len(relayed.body)
