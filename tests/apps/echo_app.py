"""A small `aidial-sdk` application that calls a model back through Tollgate.

Run as its own process (`uvicorn apps.echo_app:app`, see `harness_apps.py`). On each chat
request it calls the model named in `custom_fields.configuration.model` at `DIAL_URL` (Tollgate)
with the per-request key it received in `Api-Key`, as a DIAL application does (spec proxy 15.3),
streams the model's answer back, and reports in `custom_content.state.callback` how the
callback went: whether it succeeded, its status, DIAL's error object when refused, and the
model's usage. The key itself is never put in an answer.

With `ECHO_APP_PROPAGATE=1` the app does not give the key to its client: it calls with a placeholder
key in both `api-key` and `Authorization` (the plain openai client) and relies on aidial-sdk's
header propagation (`DIALApp(propagate_auth_headers=True)`) to put the per-request key in both.

`X-Fake-*` headers of the incoming request are passed on to the model (they steer the fake
model). `GET /_test/last-key` is test-only: it gives the key the last request came with, so a
test can check that the key is dead once the hop has ended.
"""

from __future__ import annotations

import os
from typing import Any

import openai
from aidial_sdk import DIALApp
from aidial_sdk.chat_completion import ChatCompletion, Request, Response
from aidial_sdk.exceptions import InvalidRequestError

DEPLOYMENT = "echo-app"
API_VERSION = "2024-02-01"
PROPAGATE = os.environ.get("ECHO_APP_PROPAGATE") == "1"
PLACEHOLDER_KEY = "placeholder-replaced-by-aidial-sdk"

# Test-only: the per-request key of the last request, and how many requests came.
LAST_KEY: str | None = None
REQUESTS = 0


def _dial_url() -> str:
    return os.environ["DIAL_URL"]


def _last_text(request: Request) -> str:
    content = request.messages[-1].content if request.messages else None
    return content if isinstance(content, str) else ""


def _target_model(request: Request) -> str:
    configuration = request.custom_fields.configuration if request.custom_fields else None
    model = (configuration or {}).get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("custom_fields.configuration.model is required")
    return model


def _client(request: Request, model: str) -> openai.AsyncOpenAI:
    if PROPAGATE:
        # Both headers carry the same placeholder: aidial-sdk rewrites both (spec proxy 15.3).
        return openai.AsyncOpenAI(
            base_url=f"{_dial_url()}/openai/deployments/{model}",
            api_key=PLACEHOLDER_KEY,
            default_headers={"api-key": PLACEHOLDER_KEY},
            default_query={"api-version": API_VERSION},
            max_retries=0,
        )
    return openai.AsyncAzureOpenAI(
        azure_endpoint=_dial_url(),
        api_key=request.api_key,
        api_version=API_VERSION,
        max_retries=0,  # a 429 is the answer to report, not to retry
    )


def _error_of(exc: openai.APIStatusError) -> dict[str, Any] | None:
    """DIAL's error object (the openai SDK gives the `error` member as `body`)."""
    body = exc.body
    return body if isinstance(body, dict) else None


class EchoApplication(ChatCompletion):
    async def chat_completion(self, request: Request, response: Response) -> None:
        global LAST_KEY, REQUESTS
        LAST_KEY = request.api_key
        REQUESTS += 1
        model = _target_model(request)
        fake_headers = {k: v for k, v in request.headers.items() if k.lower().startswith("x-fake-")}
        streamed = bool(request.stream)
        report: dict[str, Any] = {"deployment": model, "streamed": streamed}
        with response.create_single_choice() as choice:
            client = _client(request, model)
            try:
                messages: Any = [{"role": "user", "content": _last_text(request)}]
                if streamed:
                    stream = await client.chat.completions.create(
                        model=model, messages=messages, stream=True, extra_headers=fake_headers
                    )
                    async for chunk in stream:
                        for part in chunk.choices:
                            if part.delta.content:
                                choice.append_content(part.delta.content)
                        if chunk.usage is not None:
                            report["total_tokens"] = chunk.usage.total_tokens
                else:
                    completion = await client.chat.completions.create(
                        model=model, messages=messages, extra_headers=fake_headers
                    )
                    choice.append_content(completion.choices[0].message.content or "")
                    if completion.usage is not None:
                        report["total_tokens"] = completion.usage.total_tokens
                report |= {"ok": True, "status": 200}
            except openai.APIStatusError as exc:
                report |= {"ok": False, "status": exc.status_code, "error": _error_of(exc)}
            except openai.APIConnectionError:
                report |= {"ok": False, "status": None}
            finally:
                await client.close()
            choice.set_state({"callback": report})


app = DIALApp(
    dial_url=os.environ.get("DIAL_URL"), propagate_auth_headers=PROPAGATE, add_healthcheck=True
)
app.add_chat_completion(DEPLOYMENT, EchoApplication())


@app.get("/_test/last-key")
async def last_key() -> dict[str, Any]:
    """Test-only: the key the last chat request came with (spec proxy 11: dead by now)."""
    return {"key": LAST_KEY, "requests": REQUESTS}
