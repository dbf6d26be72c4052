"""The shared test config (keys, deployments, roles) and request helpers used by many modules.

Test modules import these from here (not from `conftest`, which re-exports them for older
modules): a test module never imports another test module.
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

import httpx


class Upstream(Protocol):
    """A fake model server, in a process (`harness.FakeModel`) or in process (`inprocess`)."""

    def endpoint(self, deployment: str, api: str = "chat/completions") -> str: ...


DEFAULT_KEY = "test-key-default-0123456789"
POWER_KEY = "test-key-power-0123456789"
HASHED_SECRET = "hashed-secret-key-0123456789"
IP_KEY = "test-key-ip-0123456789"
LOCAL_IP_KEY = "test-key-local-ip-0123456789"
NO_IP_KEY = "test-key-no-ip-0123456789"
PROVIDER_SECRET = "provider-secret-abcdef"
CLOSED_PORT_ENDPOINT = "http://127.0.0.1:9/openai/deployments/x/chat/completions"


def main_config(fake: Upstream) -> dict[str, Any]:
    return {
        "models": {
            "chat-model": {
                "type": "chat",
                "displayName": "Chat Model",
                "displayVersion": "1.0",
                "endpoint": fake.endpoint("chat-model"),
                "upstreams": [
                    {
                        "endpoint": "https://provider.example/v1/chat/completions",
                        "key": PROVIDER_SECRET,
                        "extraData": {"region": "eu"},
                    },
                    # A fallback: calls go to the first one while it is available.
                    {"endpoint": "https://second.example/v1", "key": "second-secret", "tier": 1},
                ],
                "features": {"rateEndpoint": "http://127.0.0.1:1/rate", "toolsSupported": True},
                "limits": {"maxTotalTokens": 1000, "maxPromptTokens": "200"},
                "pricing": {"unit": "token", "prompt": "0.56", "completion": "0.67"},
                "inputAttachmentTypes": ["image/png"],
                "maxInputAttachments": 3,
            },
            "renamed-model": {
                "type": "chat",
                "endpoint": fake.endpoint("renamed-model"),
                "overrideName": "provider-model-name",
                "defaults": {"temperature": 0.5, "max_tokens": 64},
            },
            "power-model": {
                "type": "chat",
                "endpoint": fake.endpoint("power-model"),
                "userRoles": ["power-user"],
            },
            "nobody-model": {"endpoint": fake.endpoint("nobody-model"), "userRoles": []},
            "embedding-model": {
                "type": "EMBEDDING",
                "endpoint": fake.endpoint("embedding-model", "embeddings"),
            },
            "auth-model": {
                "endpoint": fake.endpoint("auth-model"),
                "forwardAuthToken": True,
            },
            "no-prk-model": {
                "endpoint": fake.endpoint("no-prk-model"),
                "features": {"accessibleByPerRequestKey": False},
            },
            "no-endpoint-model": {"type": "chat"},
            "dead-model": {"endpoint": CLOSED_PORT_ENDPOINT},
            "special[1m]": {"endpoint": fake.endpoint("special")},
        },
        "applications": {
            "echo-app": {
                "endpoint": fake.endpoint("echo-app"),
                "displayName": "Echo App",
                "description": "repeats things",
                "features": {
                    "rateEndpoint": "http://127.0.0.1:1/rate",
                    "systemPromptSupported": False,
                },
                "defaults": {"custom_fields": {"configuration": {"x": 1}}},
            },
            "power-app": {"endpoint": fake.endpoint("power-app"), "userRoles": ["power-user"]},
        },
        "addons": {
            "search-addon": {"endpoint": "http://127.0.0.1:1/search", "displayName": "Search"},
            "power-addon": {"endpoint": "http://127.0.0.1:1/p", "userRoles": ["power-user"]},
        },
        "assistant": {
            "endpoint": fake.endpoint("assistant"),
            "features": {"rateEndpoint": "http://127.0.0.1:1/rate"},
            "assistants": {
                "helper-assistant": {
                    "prompt": "You help.",
                    "addons": ["search-addon"],
                    "displayName": "Helper",
                },
                "power-assistant": {"userRoles": ["power-user"]},
            },
        },
        "keys": {
            DEFAULT_KEY: {"project": "proj-a", "role": "default"},
            POWER_KEY: {"project": "proj-b", "roles": ["power-user"], "role": "default"},
            "sha256:" + hashlib.sha256(HASHED_SECRET.encode()).hexdigest(): {
                "project": "proj-hashed",
                "role": "default",
            },
            IP_KEY: {
                "project": "proj-ip",
                "role": "default",
                "allowedIpAddressRanges": ["10.1.0.0/16"],
            },
            LOCAL_IP_KEY: {
                "project": "proj-local",
                "role": "default",
                "allowedIpAddressRanges": ["127.0.0.0/8", "::1/128"],
            },
            NO_IP_KEY: {"project": "proj-no-ip", "role": "default", "allowedIpAddressRanges": []},
        },
        "roles": {
            "default": {"limits": {"chat-model": {}}},
            "power-user": {"limits": {"power-model": {"minute": "100000"}}},
        },
    }


def chat(content: str = "Say hello", **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], **extra}


def key_headers(key: str = DEFAULT_KEY) -> dict[str, str]:
    return {"Api-Key": key, "Content-Type": "application/json"}


def error_of(response: httpx.Response) -> tuple[int, str]:
    assert response.headers["content-type"].startswith("application/json"), response.text
    body = response.json()
    return response.status_code, body["error"]["message"]
