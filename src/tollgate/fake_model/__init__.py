"""A small, fast fake model server: OpenAI chat, completions, embeddings and Responses,
Anthropic Messages, and DIAL's feature endpoints.

Used by the quick-start example, by the test-suite as the LLM upstream and by the
benchmark as the reference upstream, so the common request is answered from
precomputed bytes and nothing is logged per request.

Endpoints (any path prefix, e.g. ``/v1/...``, ``/openai/deployments/<id>/...``,
``/openai/v1/...`` or ``/anthropic/v1/...``):

* ``POST .../chat/completions`` - chat, streaming or not;
* ``POST .../completions`` - legacy text completions, streaming or not;
* ``POST .../embeddings`` - eight deterministic floats per input;
* ``POST .../responses`` - the OpenAI Responses API, a JSON response or (``"stream": true``)
  its SSE events from ``response.created`` to ``response.completed``; ``"background": true``
  answers ``queued``. ``GET .../responses/{id}`` (``?stream=true&starting_after=N`` replays
  the events), ``DELETE .../responses/{id}`` and ``POST .../responses/{id}/cancel`` (background
  responses only) address the last 1000 responses;
* ``POST .../messages`` - the Anthropic Messages API, a message or (``"stream": true``) its
  events from ``message_start`` to ``message_stop``; errors there are in Anthropic's shape;
* ``POST .../messages/count_tokens`` - ``{"input_tokens": N}``;
* ``POST .../rate``, ``.../tokenize``, ``.../truncate_prompt`` and ``GET .../configuration`` -
  DIAL's feature endpoints (``PONG``; words per input; messages dropped to fit
  ``max_prompt_tokens``; a JSON schema);
* ``GET /health`` - ``ok``;
* ``GET /_fake/requests`` / ``DELETE /_fake/requests`` - the recorded requests (method, path,
  query, headers as sent, body);
* ``POST /_fake/faults`` / ``DELETE /_fake/faults`` - add a fault / clear them all.

Request headers steer the answer (see ``control.Control``):

* ``X-Fake-Status`` (answer that error), ``X-Fake-Delay-Ms`` (wait first);
* ``X-Fake-Reply`` (the text), ``X-Fake-Chunks`` (that many words, the reply repeated),
  ``X-Fake-Chunk-Delay-Ms`` (between stream events), ``X-Fake-Drop-After`` (vanish after that
  many content events);
* ``X-Fake-Usage``: ``always`` (the default: every answer has usage, a chat or completions
  stream in its last choice event), ``on-request`` (as OpenAI: a chat or completions stream has
  usage only when the request asks with ``stream_options.include_usage``, then every chunk says
  ``"usage": null`` and a last chunk without choices carries it), ``never`` (no usage in any
  answer of any API). ``X-Fake-No-Usage: 1`` is ``never``. The server-wide default is
  ``build_app(usage=...)`` or ``tollgate fake-model --usage``;
* ``X-Fake-Cached-Tokens`` (OpenAI: ``cached_tokens``, added to the prompt tokens; Anthropic:
  ``cache_read_input_tokens``), ``X-Fake-Cache-Write-Tokens`` (Anthropic:
  ``cache_creation_input_tokens``), ``X-Fake-Reasoning-Tokens`` (OpenAI: ``reasoning_tokens``,
  added to the completion tokens), ``X-Fake-Delta-Usage: full`` (Anthropic: ``message_delta``
  repeats the input and cache counters, as newer API versions do).

On any other path, any method, ``X-Fake-Echo-Path`` answers 200 with the raw path and query
as text.

Faults make this server fail on command, as a DIAL model adapter does when the provider it
reaches fails. A fault is a JSON object: ``upstream`` (the ``X-UPSTREAM-ENDPOINT`` it applies
to; absent: every call), ``path`` (only calls to that path, which may be one no model serves),
``status`` with an optional ``retryAfter`` (answer that error),
``delayMs`` (wait first; without ``status`` the normal answer follows), ``bodyDelayMs`` (send
the error's headers, then its body that much later), ``disconnect`` (close the connection
without answering) and ``times`` (how many calls it hits; absent: until cleared). The first
fault that matches a call applies. Faults are checked before the ``X-Fake-*`` headers.

Tokens are whitespace-separated words. Answers to identical requests without
control headers are cached, so they repeat the same ``id`` and ``created``.
"""

from tollgate.fake_model.control import DEFAULT_MODEL as DEFAULT_MODEL
from tollgate.fake_model.control import DEFAULT_REPLY as DEFAULT_REPLY
from tollgate.fake_model.control import USAGE_MODES as USAGE_MODES
from tollgate.fake_model.control import UsageMode as UsageMode
from tollgate.fake_model.features import FAKE_CONFIGURATION as FAKE_CONFIGURATION
from tollgate.fake_model.openai_api import EMBEDDING_SIZE as EMBEDDING_SIZE
from tollgate.fake_model.server import MAX_RECORDED as MAX_RECORDED
from tollgate.fake_model.server import STATE_KEY as STATE_KEY
from tollgate.fake_model.server import build_app as build_app
from tollgate.fake_model.server import main as main
from tollgate.fake_model.server import parse_fault as parse_fault

# The names tests/inprocess.py has always used.
_STATE_KEY = STATE_KEY
_parse_fault = parse_fault

__all__ = ["build_app", "main"]
