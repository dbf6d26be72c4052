"""A real `aidial-sdk` application behind Tollgate, calling a model back through Tollgate with
the per-request key it was given (spec proxy 11 and 15.3, auth-limits 3.5)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import openai
import pytest

from harness import FakeModel, Gateway, free_port, start_gateway, stop
from harness_apps import App, start_app

ROOT_KEY = "apps-key-root-0123456789"
POWER_KEY = "apps-key-power-0123456789"
LIMITED_KEY = "apps-key-limited-0123456789"
OTHER_KEY = "apps-key-other-0123456789"  # same role as LIMITED_KEY, another project
API_VERSION = "2024-02-01"
APP = "echo-app"
PROPAGATED_APP = "echo-app-propagated"  # the same app, relying on aidial-sdk's propagation
PER_REQUEST_KEY = re.compile(r"[0-9a-zA-Z_-]{32}")
UNLIMITED = 9223372036854775807


def applications_config(
    fake: FakeModel, app_endpoint: str, propagated_endpoint: str
) -> dict[str, Any]:
    def model(name: str, **extra: Any) -> dict[str, Any]:
        return {"type": "chat", "endpoint": fake.endpoint(name), **extra}

    return {
        "models": {
            "chat-model": model("chat-model"),
            "power-model": model("power-model", userRoles=["power-user"]),
            "tok-model": model("tok-model"),
            "no-prk-model": model("no-prk-model", features={"accessibleByPerRequestKey": False}),
        },
        "applications": {
            APP: {"endpoint": app_endpoint, "displayName": "Echo App"},
            PROPAGATED_APP: {"endpoint": propagated_endpoint},
        },
        "keys": {
            ROOT_KEY: {"project": "apps-root", "role": "default"},
            POWER_KEY: {"project": "apps-power", "roles": ["power-user"]},
            LIMITED_KEY: {"project": "apps-limited", "role": "limited"},
            OTHER_KEY: {"project": "apps-other", "role": "limited"},
        },
        "roles": {"limited": {"limits": {"tok-model": {"minute": "30", "day": "1000"}}}},
    }


def app_endpoint(port: int) -> str:
    # The app serves one deployment, `echo-app`, whatever Tollgate calls it.
    return f"http://127.0.0.1:{port}/openai/deployments/echo-app/chat/completions"


@pytest.fixture(scope="module")
def app_ports() -> tuple[int, int]:
    """Chosen before Tollgate starts: its config names the apps, the apps are given its URL."""
    return free_port(), free_port()


@pytest.fixture(scope="module")
def gateway(work_dir: Path, fake_model: FakeModel, app_ports: tuple[int, int]) -> Iterator[Gateway]:
    config = applications_config(fake_model, *map(app_endpoint, app_ports))
    gw = start_gateway(work_dir, [config])
    yield gw
    stop(gw.process)


@pytest.fixture(scope="module")
def echo_app(work_dir: Path, gateway: Gateway, app_ports: tuple[int, int]) -> Iterator[App]:
    app = start_app(work_dir, "echo_app", port=app_ports[0], dial_url=gateway.url)
    yield app
    stop(app.process)


@pytest.fixture(scope="module")
def propagating_app(work_dir: Path, gateway: Gateway, app_ports: tuple[int, int]) -> Iterator[App]:
    app = start_app(
        work_dir,
        "echo_app",
        port=app_ports[1],
        dial_url=gateway.url,
        env={"ECHO_APP_PROPAGATE": "1"},
    )
    yield app
    stop(app.process)


def azure(gateway: Gateway, key: str) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint=gateway.url, api_key=key, api_version=API_VERSION, max_retries=0
    )


def ask_app(
    gateway: Gateway,
    key: str,
    model: str,
    *,
    reply: str = "w w w w w w w w w",
    app: str = APP,
) -> tuple[str, dict[str, Any], str]:
    """One non-streamed call of the app: its content, its callback report, the raw body."""
    with azure(gateway, key) as client:
        raw = client.chat.completions.with_raw_response.create(
            model=app,
            messages=[{"role": "user", "content": "x"}],
            extra_body={"custom_fields": {"configuration": {"model": model}}},
            extra_headers={"X-Fake-Reply": reply},
        )
    completion = raw.parse()
    message = completion.choices[0].message
    extra = message.model_extra or {}
    report: dict[str, Any] = extra["custom_content"]["state"]["callback"]
    return message.content or "", report, raw.http_response.text


def model_hop_key(fake: FakeModel) -> str:
    key: str = dict(fake.last()["headers"])["Api-Key"]
    return key


class TestCallback:
    """(a) The app's callback with its per-request key reaches a model the root caller may use."""

    def test_not_streamed(self, gateway: Gateway, echo_app: App, fake: FakeModel) -> None:
        content, report, raw = ask_app(gateway, ROOT_KEY, "chat-model", reply="one two three")
        assert content == "one two three"
        assert report == {
            "deployment": "chat-model",
            "streamed": False,
            "ok": True,
            "status": 200,
            "total_tokens": 4,
        }
        recorded = fake.last()
        assert recorded["path"] == "/openai/deployments/chat-model/chat/completions"
        assert "stream" not in json.loads(recorded["body"])
        app_key = echo_app.get("/_test/last-key")["key"]
        assert PER_REQUEST_KEY.fullmatch(app_key) and app_key != ROOT_KEY
        # The model hop got a key of its own: neither the root's nor the app's.
        assert model_hop_key(fake) not in (ROOT_KEY, app_key)
        assert ROOT_KEY not in json.dumps(recorded)
        assert app_key not in raw

    def test_streamed(self, gateway: Gateway, echo_app: App, fake: FakeModel) -> None:
        with azure(gateway, ROOT_KEY) as client:
            stream = client.chat.completions.create(
                model=APP,
                messages=[{"role": "user", "content": "x"}],
                stream=True,
                extra_body={"custom_fields": {"configuration": {"model": "chat-model"}}},
                extra_headers={"X-Fake-Reply": "a b c d e", "X-Fake-Chunk-Delay-Ms": "20"},
            )
            pieces: list[str] = []
            reports: list[dict[str, Any]] = []
            for chunk in stream:
                for choice in chunk.choices:
                    if choice.delta.content:
                        pieces.append(choice.delta.content)
                    custom = (choice.delta.model_extra or {}).get("custom_content")
                    if custom and "state" in custom:
                        reports.append(custom["state"]["callback"])
        assert "".join(pieces) == "a b c d e"
        assert len(pieces) > 1  # streamed through both hops, not merged
        assert reports == [
            {
                "deployment": "chat-model",
                "streamed": True,
                "ok": True,
                "status": 200,
                "total_tokens": 6,
            }
        ]
        assert json.loads(fake.last()["body"])["stream"] is True

    def test_each_call_gets_a_fresh_key(self, gateway: Gateway, echo_app: App) -> None:
        keys = []
        for _ in range(2):
            assert ask_app(gateway, ROOT_KEY, "chat-model")[1]["ok"] is True
            keys.append(echo_app.get("/_test/last-key")["key"])
        assert keys[0] != keys[1]

    def test_key_propagated_by_aidial_sdk(
        self, gateway: Gateway, propagating_app: App, fake: FakeModel
    ) -> None:
        """`DIALApp(propagate_auth_headers=True)` puts the key in `api-key` and `Authorization`
        of a call to `DIAL_URL` (spec proxy 15.3): Tollgate takes the pair as one key."""
        content, report, _ = ask_app(
            gateway, ROOT_KEY, "chat-model", reply="hi", app=PROPAGATED_APP
        )
        assert (content, report["ok"], report["status"]) == ("hi", True, 200)
        _, report, _ = ask_app(gateway, ROOT_KEY, "power-model", app=PROPAGATED_APP)
        assert (report["status"], report["error"]["message"]) == (
            403,
            "Forbidden deployment: power-model",
        )


class TestAccess:
    """(b) The callback acts with the root caller's roles."""

    def test_model_closed_to_the_root_caller_is_refused(
        self, gateway: Gateway, echo_app: App, fake: FakeModel
    ) -> None:
        content, report, _ = ask_app(gateway, ROOT_KEY, "power-model")
        assert report == {
            "deployment": "power-model",
            "streamed": False,
            "ok": False,
            "status": 403,
            "error": {"message": "Forbidden deployment: power-model", "code": "403"},
        }
        assert content == ""
        assert fake.requests() == []  # refused before the model

    def test_same_model_is_open_to_a_root_caller_with_the_role(
        self, gateway: Gateway, echo_app: App
    ) -> None:
        content, report, _ = ask_app(gateway, POWER_KEY, "power-model", reply="hi")
        assert (content, report["ok"], report["status"]) == ("hi", True, 200)

    def test_model_closed_to_per_request_keys(self, gateway: Gateway, echo_app: App) -> None:
        # The root caller may use it directly, but not through the app's key.
        with azure(gateway, ROOT_KEY) as client:
            direct = client.chat.completions.create(
                model="no-prk-model", messages=[{"role": "user", "content": "x"}]
            )
        assert direct.choices[0].message.content
        _, report, _ = ask_app(gateway, ROOT_KEY, "no-prk-model")
        assert (report["ok"], report["status"]) == (False, 403)
        assert report["error"] == {
            "message": f"Deployment no-prk-model is not accessible by {APP}",
            "code": "403",
        }


def limits_of(client: httpx.Client, key: str, model: str) -> dict[str, Any]:
    response = client.get(f"/v1/deployments/{model}/limits", headers={"Api-Key": key})
    assert response.status_code == 200, response.text
    stats: dict[str, Any] = response.json()
    return stats


def test_callback_counts_within_the_root_callers_limits(
    gateway: Gateway, echo_app: App, client: httpx.Client
) -> None:
    """(c) Tokens used by the app's callback are the root caller's (spec auth-limits 3.5)."""
    _, report, _ = ask_app(gateway, LIMITED_KEY, "tok-model")  # 1 + 9 tokens
    assert report == {
        "deployment": "tok-model",
        "streamed": False,
        "ok": True,
        "status": 200,
        "total_tokens": 10,
    }
    stats = limits_of(client, LIMITED_KEY, "tok-model")
    assert stats["minuteTokenStats"] == {"total": 30, "used": 10}
    assert stats["hourRequestStats"]["used"] == 1
    usage = client.get("/v1/user/usage", headers={"Api-Key": LIMITED_KEY}).json()
    assert usage["deployments"]["tok-model"]["dayTokenStats"]["used"] == 10
    # Another project with the same role has its own, untouched counters.
    assert limits_of(client, OTHER_KEY, "tok-model")["minuteTokenStats"]["used"] == 0

    _, report, _ = ask_app(gateway, LIMITED_KEY, "tok-model", reply=" ".join(["w"] * 24))
    assert (report["ok"], report["total_tokens"]) == (True, 25)
    assert limits_of(client, LIMITED_KEY, "tok-model")["minuteTokenStats"]["used"] == 35

    # Over the limit: the app's next callback is refused with DIAL's 429...
    _, report, _ = ask_app(gateway, LIMITED_KEY, "tok-model")
    assert (report["ok"], report["status"]) == (False, 429)
    assert report["error"] == {
        "message": "Hit token rate limit. Minute limit: 35 / 30 tokens. Day limit: 35 / 1000 "
        f"tokens. Week limit: 35 / {UNLIMITED} tokens. Month limit: 35 / {UNLIMITED} tokens.",
        "display_message": "You've exceeded your minute token limit",
        "code": "429",
    }
    # ...and so is the root caller itself; the other project is not.
    with azure(gateway, LIMITED_KEY) as root, pytest.raises(openai.RateLimitError):
        root.chat.completions.create(model="tok-model", messages=[{"role": "user", "content": "x"}])
    with azure(gateway, OTHER_KEY) as other:
        other.chat.completions.create(
            model="tok-model", messages=[{"role": "user", "content": "x"}]
        )


async def test_key_is_dead_after_the_hop(gateway: Gateway, echo_app: App) -> None:
    """(d) The key the app was given yields DIAL's 401 once its hop has ended."""
    body = {
        "messages": [{"role": "user", "content": "x"}],
        "custom_fields": {"configuration": {"model": "chat-model"}},
    }
    async with aiohttp.ClientSession(gateway.url) as session:
        for stream in (False, True):
            async with session.post(
                f"/openai/deployments/{APP}/chat/completions",
                headers={"Api-Key": ROOT_KEY},
                json=body | {"stream": stream},
            ) as response:
                assert response.status == 200
                text = await response.text()
            assert '"ok":true' in text.replace(" ", "")
            key = echo_app.get("/_test/last-key")["key"]
            assert PER_REQUEST_KEY.fullmatch(key) and key not in text

            async with session.get("/v1/user/info", headers={"Api-Key": key}) as info:
                assert info.status == 401
                assert await info.json() == {"error": {"message": "Unknown api key", "code": "401"}}
            async with session.post(
                "/openai/deployments/chat-model/chat/completions",
                headers={"Api-Key": key},
                json={"messages": [{"role": "user", "content": "x"}]},
            ) as call:
                assert call.status == 401
                assert await call.json() == {"error": {"message": "Unknown api key", "code": "401"}}
            # The openai SDK style (`Authorization: Bearer`) is refused the same way.
            async with session.get(
                "/v1/user/info", headers={"Authorization": f"Bearer {key}"}
            ) as bearer:
                assert bearer.status == 401


def test_key_dies_when_the_root_caller_disconnects(gateway: Gateway, echo_app: App) -> None:
    """The app's model stream lasts about 6 s; the root caller leaves after the first chunk.
    The app's key must die with the root's request, not when the app is done."""
    body = {
        "stream": True,
        "messages": [{"role": "user", "content": "x"}],
        "custom_fields": {"configuration": {"model": "chat-model"}},
    }
    headers = {
        "Api-Key": ROOT_KEY,
        "X-Fake-Reply": " ".join(["w"] * 30),
        "X-Fake-Chunk-Delay-Ms": "200",
    }
    url = f"{gateway.url}/openai/deployments/{APP}/chat/completions"
    with httpx.stream("POST", url, headers=headers, json=body, timeout=30) as stream:
        next(stream.iter_raw())
        key = echo_app.get("/_test/last-key")["key"]
        alive = httpx.get(f"{gateway.url}/v1/user/info", headers={"Api-Key": key})
        assert alive.status_code == 200
    # Hung up. Tollgate notices at its next write (a chunk comes every 200 ms).
    deadline = time.monotonic() + 2.5
    status = 200
    while status == 200 and time.monotonic() < deadline:
        time.sleep(0.1)
        status = httpx.get(f"{gateway.url}/v1/user/info", headers={"Api-Key": key}).status_code
    assert status == 401
