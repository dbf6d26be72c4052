"""Which API families a deployment serves, and where each is sent (compatibility C75).

Newest DIAL lets a model (or application) declare `interfaces`: `openaiChatCompletions` (the
`chat/completions` and `completions` calls), `openaiEmbeddings`, `openaiResponses` and
`anthropicMessages`, each with its own `base_url`, `defaultHeaders`, `defaults` and
`overridePaths`. Without them the legacy fields serve as they always did: `endpoint` the
deployments family, `responsesEndpoint` the Responses API; nothing serves the Anthropic Messages
API. Built once per snapshot; pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import quote

from yarl import URL

from tollgate.config.schema import (
    ANTHROPIC_MESSAGES,
    CHAT_COMPLETIONS,
    EMBEDDINGS,
    INTERFACE_TYPES,
    RESPONSES,
    Deployable,
    Interface,
)

# The `overridePaths` operation of each ingress (DIAL's names).
OPERATIONS: Final = {
    "chat/completions": "postAzureOpenaiChatCompletions",
    "completions": "postAzureOpenaiChatCompletions",
    "embeddings": "postAzureOpenaiEmbeddings",
    "responses": "postOpenaiResponses",
    "anthropic/messages": "postAnthropicMessages",
    "anthropic/messages/count_tokens": "postAnthropicMessagesCountTokens",
}
# The interface an ingress needs.
INTERFACE_OF: Final = {
    "chat/completions": CHAT_COMPLETIONS,
    "completions": CHAT_COMPLETIONS,
    "embeddings": EMBEDDINGS,
    "responses": RESPONSES,
    "anthropic/messages": ANTHROPIC_MESSAGES,
    "anthropic/messages/count_tokens": ANTHROPIC_MESSAGES,
}
MAX_CACHED_URLS: Final = 64
# The vendor API path an upstream's `baseUrl` is completed with (its `X-UPSTREAM-ENDPOINT`).
VENDOR_PATHS: Final = {RESPONSES: "/v1/responses", ANTHROPIC_MESSAGES: "/v1/messages"}


@dataclass(frozen=True, slots=True)
class Target:
    """Where one API family of a deployment goes: an `interfaces` entry, or a legacy field."""

    interface: str
    # An `interfaces` entry: its `base_url` (the deployment's `baseUrl` when it has none), to
    # which the client's path is appended. None for a legacy field.
    base: str | None
    # A legacy field (`endpoint`, `responsesEndpoint`): used as it is, the client's query
    # string appended. None for an `interfaces` entry.
    endpoint: str | None
    # The deployment's `defaultHeaders` with the entry's laid over them.
    default_headers: tuple[tuple[str, str], ...] = ()
    # The entry's `defaults`: declared, they replace the deployment's (None: the deployment's).
    defaults: Mapping[str, Any] | None = None
    override_paths: Mapping[str, str] | None = None
    # URLs already built, by (API, ingress path, query): a deployment's clients repeat the
    # same few. Bounded in `upstream_url`.
    urls: dict[tuple[str, str, str], URL] = field(default_factory=dict, compare=False, repr=False)

    def upstream_url(self, api: str, ingress: str, raw_query: str, upstream_name: str) -> URL:
        """`url`, parsed once per distinct call shape (`upstream_name` is the deployment's)."""
        key = (api, ingress, raw_query)
        found = self.urls.get(key)
        if found is None:
            # encoded=True: yarl takes the text as it is, neither re-quoting nor normalising it.
            found = URL(self.url(api, ingress, raw_query, upstream_name), encoded=True)
            if len(self.urls) < MAX_CACHED_URLS:
                self.urls[key] = found
        return found

    def url(self, api: str, ingress: str, raw_query: str, upstream_name: str) -> str:
        """The upstream URL of a call to `api` that came in on the raw path `ingress`.

        `upstream_name` is the model's `overrideName`, else the deployment's name: what the
        deployments family's `/deployments/{id}/` segment and an `{overrideName}` template say.
        """
        query = "?" + raw_query if raw_query else ""
        if self.endpoint is not None:
            separator = "&" if "?" in self.endpoint else "?"
            return self.endpoint + (separator + raw_query if raw_query else "")
        assert self.base is not None
        template = self.override_paths.get(OPERATIONS[api]) if self.override_paths else None
        if template is not None:
            path = template.replace("{overrideName}", quote(upstream_name, safe=""))
            return self.base + path + query
        if api in ("chat/completions", "completions", "embeddings"):
            # /openai/deployments/<the client's id>/<api> → the upstream's name in its place.
            ingress = f"/openai/deployments/{quote(upstream_name, safe='')}/{api}"
        return self.base + ingress + query

    def item_url(self, operation: str, response_id: str, raw_query: str, upstream_name: str) -> str:
        """The URL of a follow-up on a stored response (`operation`: DIAL's
        `getOpenaiResponsesById`, `deleteOpenaiResponsesById` or `postOpenaiResponsesCancel`)."""
        suffix = "/cancel" if operation == "postOpenaiResponsesCancel" else ""
        query = "?" + raw_query if raw_query else ""
        if self.endpoint is not None:  # `responsesEndpoint`: the item is under it
            base, _, own_query = self.endpoint.partition("?")
            if own_query:
                query = "?" + own_query + ("&" + raw_query if raw_query else "")
            return f"{base.rstrip('/')}/{response_id}{suffix}{query}"
        assert self.base is not None
        template = self.override_paths.get(operation) if self.override_paths else None
        if template is not None:
            path = template.replace("{id}", response_id).replace(
                "{overrideName}", quote(upstream_name, safe="")
            )
            return self.base + path + query
        return f"{self.base}/openai/v1/responses/{response_id}{suffix}{query}"


def targets(spec: Deployable) -> Mapping[str, Target]:
    """The API families `spec` serves through `interfaces` or `responsesEndpoint`: by interface.

    The deployments family served by the legacy `endpoint` is not here: the request path reads
    it from the deployment itself, as it always did. An entry whose type DIAL does not know is
    kept in the config but never serves (compatibility C75); so is one in `translator` mode,
    which Tollgate does not run.
    """
    found: dict[str, Target] = {}
    if spec.responses_endpoint is not None:
        found[RESPONSES] = Target(RESPONSES, None, spec.responses_endpoint, _headers(spec, None))
    for name, entry in spec.interfaces.items():
        if name not in INTERFACE_TYPES or entry.mode != "passthrough":
            continue
        base = entry.base_url or spec.base_url
        if base is None:
            continue  # an entry without a base serves nothing (a legacy field may still)
        found[name] = Target(
            name,
            base,
            None,
            _headers(spec, entry),
            entry.defaults,
            entry.override_paths or None,
        )
    return found


def _headers(spec: Deployable, entry: Interface | None) -> tuple[tuple[str, str], ...]:
    merged = dict(spec.default_headers)
    if entry is not None:
        merged.update(entry.default_headers)
    return tuple(merged.items())


def advertised(spec: Deployable, model_type: str | None) -> tuple[str, ...]:
    """The interfaces a listing says `spec` serves: declared entries, and the legacy fields by
    the model's type (`endpoint`: embeddings for an embedding model, else chat completions)."""
    names = [name for name in spec.interfaces if name in INTERFACE_TYPES]
    if spec.endpoint is not None:
        legacy = EMBEDDINGS if model_type == "embedding" else CHAT_COMPLETIONS
        if legacy not in names:
            names.append(legacy)
    if spec.responses_endpoint is not None and RESPONSES not in names:
        names.append(RESPONSES)
    return tuple(names)
