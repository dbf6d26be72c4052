"""`/openapi.json` describes Tollgate's API, and a live Tollgate keeps to it under schemathesis.

The fuzz run is bounded and derandomized (a fixed number of examples per operation, no example
database), so it finds the same things on every run and stays well under a minute.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    ignored_auth,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from harness import FakeModel, Gateway, start_gateway, stop

KEY = "openapi-fuzz-key-0123456789abcdef"
EXAMPLES_PER_OPERATION = 40
CHECKS = [
    ignored_auth,  # an operation that needs a key answers 401 without one
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def fuzz_config(fake: FakeModel) -> dict[str, Any]:
    return {
        "models": {
            "chat-model": {
                "type": "chat",
                "endpoint": fake.endpoint("chat-model"),
                "pricing": {"unit": "token", "prompt": "0.001", "completion": "0.002"},
            },
            "text-model": {
                "type": "completion",
                "endpoint": fake.endpoint("text-model", "completions"),
            },
            "embedding-model": {
                "type": "embedding",
                "endpoint": fake.endpoint("embedding-model", "embeddings"),
            },
            "power-model": {"endpoint": fake.endpoint("power-model"), "userRoles": ["power"]},
        },
        "applications": {"echo-app": {"endpoint": fake.endpoint("echo-app")}},
        "addons": {"search-addon": {"endpoint": "http://127.0.0.1:1/search"}},
        "keys": {KEY: {"project": "fuzz", "roles": ["admin"], "role": "default"}},
        "roles": {
            "default": {"limits": {"chat-model": {"minute": "100000000", "day": "1000000000"}}}
        },
    }


@pytest.fixture(scope="module")
def fuzz_gateway(work_dir: Path, fake_model: FakeModel) -> Iterator[Gateway]:
    gw = start_gateway(work_dir, [fuzz_config(fake_model)])
    yield gw
    stop(gw.process)


def test_openapi_document_is_served_without_a_key(fuzz_gateway: Gateway) -> None:
    response = httpx.get(f"{fuzz_gateway.url}/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    document = response.json()
    shipped = resources.files("tollgate.http").joinpath("openapi.json").read_bytes()
    assert document == orjson.loads(shipped)
    assert document["openapi"].startswith("3.")
    # The paths other parts of Tollgate serve are all described.
    for path in (
        "/openai/deployments/{deployment_id}/chat/completions",
        "/v1/deployments/{deployment_id}/limits",
        "/v1/user/info",
        "/v1/ops/config/reload",
        "/metrics",
        "/v1/{deployment_id}/rate",
        "/v1/deployments/{deployment_id}/tokenize",
        "/health",
    ):
        assert path in document["paths"], path
    error = document["components"]["schemas"]["Error"]["properties"]["error"]
    assert set(error["required"]) == {"message", "code"}


def test_openapi_document_is_valid_openapi(fuzz_gateway: Gateway) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_gateway.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 25


def test_error_answers_match_the_documented_shape(fuzz_gateway: Gateway) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_gateway.url}/openapi.json")
    operation = schema["/v1/user/info"]["GET"]
    case = operation.Case(headers={"Api-Key": "not-a-key"})
    response = case.call(base_url=fuzz_gateway.url)
    assert response.status_code == 401
    assert response.json() == {"error": {"message": "Unknown api key", "code": "401"}}
    case.validate_response(response, checks=CHECKS)


def test_schemathesis_finds_no_server_error_and_no_schema_break(fuzz_gateway: Gateway) -> None:
    """Every operation, with a valid key and the fake model upstream: no 5xx, every answer in
    its documented status, content type and schema."""
    schema = schemathesis.openapi.from_url(f"{fuzz_gateway.url}/openapi.json")
    failures: list[str] = []
    calls = 0
    modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)  # valid input, then broken
    for result, mode in itertools.product(list(schema.get_all_operations()), modes):
        operation = result.ok()

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            derandomize=True,
            database=None,
            deadline=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def exercise(case: schemathesis.Case) -> None:
            nonlocal calls
            calls += 1
            headers = {"Api-Key": KEY}
            response = case.call(base_url=fuzz_gateway.url, headers=headers, timeout=15)
            case.validate_response(response, checks=CHECKS, headers=headers)

        try:
            exercise()
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE  # nothing to break in an operation without input
        except (AssertionError, BaseExceptionGroup) as failure:  # one report per operation
            failures.append(f"{operation.label} ({mode.value} data): {failure}")
    assert calls >= 25 * 10
    assert not failures, "\n\n".join(failures)
    assert "Traceback" not in fuzz_gateway.output()
