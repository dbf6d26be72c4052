"""A small `aidial-sdk` application serving DIAL's feature endpoints (spec proxy 14, 15.3).

Run as its own process (`uvicorn apps.feature_app:app`, see `harness_apps.py`). It serves the
deployment `feature-app`: `rate`, `tokenize`, `truncate_prompt` and `configuration`, as DIAL
adapters do. aidial-sdk itself refuses all but rate without an `Api-Key` header (400 `Api-Key
header is required`), which is why the gateway must send its per-request key on this hop.

Each answer says what the app saw, so that a test can check the hop from the app's side:
`tokenize` calls Tollgate back (`GET /v1/user/info` at `DIAL_URL`) with the key it was given and
reports the status and project; `configuration` reports the `X-UPSTREAM-*` values and whether
an `Authorization` came. The keys themselves never appear in an answer, only their length.
`GET /_test/last` (test-only) gives the last rate request and the last key, so a test can check
that the key is dead once the hop has ended.
"""

from __future__ import annotations

import os
from typing import Any

import httpx
from aidial_sdk import DIALApp
from aidial_sdk.chat_completion import ChatCompletion, Request, Response
from aidial_sdk.deployment.configuration import ConfigurationRequest
from aidial_sdk.deployment.rate import RateRequest
from aidial_sdk.deployment.tokenize import TokenizeInputString, TokenizeRequest
from aidial_sdk.deployment.truncate_prompt import TruncatePromptRequest

DEPLOYMENT = "feature-app"

LAST: dict[str, Any] = {"key": None, "rate": None}


def _words(text: str) -> int:
    return len(text.split())


class FeatureApplication(ChatCompletion):
    async def chat_completion(self, request: Request, response: Response) -> None:
        with response.create_single_choice() as choice:
            choice.append_content("features only")

    async def rate_response(self, request: RateRequest) -> None:
        LAST["key"] = request.api_key
        LAST["rate"] = {"response_id": request.response_id, "rate": request.rate}

    async def tokenize(self, request: TokenizeRequest) -> dict[str, Any]:
        LAST["key"] = request.api_key
        counts = []
        for item in request.inputs:
            if isinstance(item, TokenizeInputString):
                counts.append(_words(item.value))
            else:
                texts = [m.content for m in item.value.messages if isinstance(m.content, str)]
                counts.append(sum(map(_words, texts)))
        async with httpx.AsyncClient() as client:
            info = await client.get(
                f"{os.environ['DIAL_URL']}/v1/user/info", headers={"api-key": request.api_key}
            )
        callback = {"status": info.status_code, "body": info.json()}
        return {
            "outputs": [{"status": "success", "token_count": n} for n in counts],
            "callback": callback,
        }

    async def truncate_prompt(self, request: TruncatePromptRequest) -> dict[str, Any]:
        LAST["key"] = request.api_key
        outputs = []
        for chat in request.inputs:
            limit = chat.max_prompt_tokens
            sizes = [_words(m.content) if isinstance(m.content, str) else 0 for m in chat.messages]
            total, discarded = sum(sizes), []
            for index, size in enumerate(sizes[:-1]):
                if limit is None or total <= limit:
                    break
                discarded.append(index)
                total -= size
            outputs.append({"status": "success", "discarded_messages": discarded})
        return {"outputs": outputs}

    async def configuration(self, request: ConfigurationRequest) -> dict[str, Any]:
        LAST["key"] = request.api_key
        return {
            "type": "object",
            "properties": {"mode": {"type": "string", "enum": ["fast", "careful"]}},
            "seen": {
                "api_key_length": len(request.api_key),
                "authorization": request.jwt_secret is not None,
                "upstream_endpoint": request.upstream_endpoint,
                "upstream_key": request.upstream_key,
            },
        }


app = DIALApp(dial_url=os.environ.get("DIAL_URL"), add_healthcheck=True)
app.add_chat_completion(DEPLOYMENT, FeatureApplication())


@app.get("/_test/last")
async def last() -> dict[str, Any]:
    """Test-only: the last rate request and the key the last feature request came with."""
    return LAST
