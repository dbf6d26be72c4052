"""`/openapi.json` describes Tollgate's API, and a live Tollgate keeps to it under schemathesis.

The fuzz run is bounded and derandomized (a fixed number of examples per operation, no example
database), so it finds the same things on every run; it takes about two minutes for the 70-odd
operations. The document's examples name the fuzzing key's own bucket, so they write and read
real resources. Every route family the gateway serves is in the document, and the shapes it
documents are checked against real answers of an in-process gateway (`jsonschema`, the `$ref`s
resolved in the document).
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Iterator
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import jsonschema  # type: ignore[import-untyped]
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    ignored_auth,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.result import Err, Ok

from harness import FakeModel, Gateway, start_gateway, stop
from inprocess import Gateways
from tollgate.http import app, config_api, resource_ops, resources_api

KEY = "openapi-fuzz-key-0123456789abcdef"
EXAMPLES_PER_OPERATION = 40
# Operations whose answer is a stream held open until the client leaves.
STREAMS_HELD_OPEN = frozenset({"/v1/ops/resource/subscribe"})
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
        # The project whose bucket the document's examples name (DIAL's test vector, with
        # FUZZ_SETTINGS' encryption pair): the examples write and read the key's own bucket.
        "keys": {KEY: {"project": "EPM-RTC-GPT", "roles": ["admin"], "role": "default"}},
        "roles": {
            "default": {"limits": {"chat-model": {"minute": "100000000", "day": "1000000000"}}}
        },
    }


FUZZ_SETTINGS = {"encryption": {"secret": "password", "key": "salt"}}  # DIAL's test pair


@pytest.fixture(scope="module")
def fuzz_gateway(work_dir: Path, fake_model: FakeModel) -> Iterator[Gateway]:
    gw = start_gateway(work_dir, [fuzz_config(fake_model)], settings=FUZZ_SETTINGS)
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


def operation_of(result: Ok[Any] | Err[Any]) -> Any:
    """An operation of the document; one it describes badly fails the test."""
    assert isinstance(result, Ok), f"an invalid operation: {result}"
    return result.ok()


def test_openapi_document_is_valid_openapi(fuzz_gateway: Gateway) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_gateway.url}/openapi.json")
    operations = [operation_of(result) for result in schema.get_all_operations()]
    assert len(operations) >= 70


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
        operation = operation_of(result)
        if operation.path in STREAMS_HELD_OPEN:
            continue  # an answer that never ends is not a case to call (test_resource_events)

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            derandomize=True,
            database=None,
            deadline=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def exercise(case: schemathesis.Case[Any]) -> None:
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


# --- every route family is documented ---------------------------------------------------------

MINE = "3CcedGxCx23EwiVbVmscVktScRyf46KypuBQ65miviST"  # Keys/EPM-RTC-GPT/ with DIAL's test pair
JSON_GROUPS = ("conversations", "prompts", "applications")
# The route families the document describes, with their methods (OPTIONS, a CORS pre-flight on
# any path, aside): the call path, listings, limits and operations... (Not described yet: the
# typed interfaces, `/openai/v1/responses...` and `/anthropic/v1/...`, and configured routes.)
CALL_PATH_FAMILIES: dict[str, set[str]] = {
    "/health": {"get"},
    "/version": {"get"},
    "/openapi.json": {"get"},
    "/metrics": {"get"},
    "/v1/ops/config/reload": {"post"},
    **{
        f"/openai/deployments/{{deployment_id}}/{api}": {"post"}
        for api in ("chat/completions", "completions", "embeddings")
    },
    **{
        path: {"get"}
        for kind in ("deployments", "models", "applications", "assistants", "addons")
        for path in (f"/openai/{kind}", f"/openai/{kind}/{{{kind[:-1]}_id}}")
    },
    "/v1/deployments": {"get"},
    "/v1/deployments/{deployment_id}": {"get"},
    "/v1/deployments/{deployment_id}/limits": {"get"},
    "/v1/user/limits": {"get"},
    "/v1/user/usage": {"get"},
    "/v1/user/info": {"get"},
    "/v1/{deployment_id}/rate": {"post"},
    "/v1/deployments/{deployment_id}/tokenize": {"post"},
    "/v1/deployments/{deployment_id}/truncate_prompt": {"post"},
    "/v1/deployments/{deployment_id}/configuration": {"get"},
}
# ...and what the resource store holds: the resource, sharing and Configuration APIs.
STORE_FAMILIES: dict[str, set[str]] = {
    # Resources (compatibility C83, C85, C86)
    "/v1/bucket": {"get"},
    "/v1/files/{bucket}/{path}": {"put", "get", "delete"},
    "/v1/metadata/files/{bucket}/{path}": {"get"},
    **{f"/v1/{group}/{{bucket}}/{{path}}": {"put", "get", "delete"} for group in JSON_GROUPS},
    **{f"/v1/metadata/{group}/{{bucket}}/{{path}}": {"get"} for group in JSON_GROUPS},
    # Moves, copies and sharing (C88, C89)
    "/v1/ops/resource/move": {"post"},
    "/v1/ops/resource/copy": {"post"},
    "/v1/ops/resource/subscribe": {"post"},  # C94
    **{
        f"/v1/ops/resource/share/{action}": {"post"}
        for action in ("create", "list", "revoke", "discard", "copy")
    },
    "/v1/invitations": {"get"},
    "/v1/invitations/{id}": {"get", "delete"},
    # The Configuration API (C81)
    "/v1/keys/platform/{name}": {"get", "head", "put", "delete"},
    "/v1/roles/platform/{name}": {"get", "head", "put", "delete"},
    "/v1/metadata/keys/platform/": {"get"},
    "/v1/metadata/roles/platform/": {"get"},
    "/v1/metadata/keys/platform/{name}": {"get"},
    "/v1/metadata/roles/platform/{name}": {"get"},
    "/v1/admin/validate": {"post"},
    "/v1/admin/apply": {"post"},
    "/v1/ops/keys/{name}/rotate": {"post"},
    "/v1/admin/audit": {"get"},
}
ROUTE_FAMILIES = {**CALL_PATH_FAMILIES, **STORE_FAMILIES}
METHODS = {"get", "put", "post", "delete", "head", "patch", "options", "trace"}
# What each path parameter stands for in a request the gateway's router must take.
SAMPLES = {
    "bucket": MINE,
    "path": "folder/plan",
    "name": "billing-service",
    "id": "5GiQnFMwwoqb6gKpw1wtjcXMEf3c9JSwVSXt",
}
CUSTOM_APP = f"applications/{MINE}/app"  # a custom application's id (compatibility C92)
# The routers of the resource, sharing and Configuration APIs: their modules' path patterns.
ROUTERS: dict[str, list[re.Pattern[str]]] = {
    module.__name__: [
        value
        for value in vars(module).values()
        if isinstance(value, re.Pattern) and str(value.pattern).startswith("/+v1/")
    ]
    for module in (resources_api, resource_ops, config_api)
}


def shipped() -> dict[str, Any]:
    document: dict[str, Any] = orjson.loads(
        resources.files("tollgate.http").joinpath("openapi.json").read_bytes()
    )
    return document


def sample(path: str) -> str:
    return re.sub(r"\{([a-z_]+)\}", lambda match: SAMPLES.get(match[1], "chat-model"), path)


def test_every_route_family_is_documented_with_its_methods() -> None:
    paths = shipped()["paths"]
    for path, methods in ROUTE_FAMILIES.items():
        assert path in paths, path
        assert set(paths[path]) & METHODS == methods, path
        for method in methods:
            operation = paths[path][method]
            assert "default" in operation["responses"], (path, method)
            if path not in ("/health", "/version", "/openapi.json"):
                assert {"ApiKey": []} in operation["security"], (path, method)
    # Nothing documented that is not served.
    assert set(paths) == set(ROUTE_FAMILIES)
    # The routers of the store's APIs each serve a documented path, and take only theirs.
    samples = [sample(path) for path in paths]
    assert all(len(patterns) >= 3 for patterns in ROUTERS.values()), ROUTERS
    for module, patterns in ROUTERS.items():
        for pattern in patterns:
            assert any(pattern.fullmatch(s) for s in samples), (module, pattern.pattern)
    for path in paths:
        served = sample(path)
        claimed = [p for patterns in ROUTERS.values() for p in patterns if p.fullmatch(served)]
        # The store's families are theirs; no other path is taken by their routers.
        assert bool(claimed) == (path in STORE_FAMILIES), (path, claimed)
    for api in ("chat/completions", "completions", "embeddings"):
        call = f"/openai/deployments/{CUSTOM_APP}/{api}"
        match = app.DEPLOYMENT_CALL.fullmatch(call)
        assert match is not None and match[1] == CUSTOM_APP, call
        described = paths[f"/openai/deployments/{{deployment_id}}/{api}"]["post"]["description"]
        assert "`applications/<bucket>/<path>`" in described


# --- documented shapes against real answers ---------------------------------------------------

OWNER_KEY = "openapi-owner-key-0123456789abcdef"
OTHER_KEY = "openapi-other-key-0123456789abcdef"
ADMIN_KEY = "openapi-admin-key-0123456789abcdef"
OWNER = {"Api-Key": OWNER_KEY}
OTHER = {"Api-Key": OTHER_KEY}
ADMIN = {"Api-Key": ADMIN_KEY}
DOCUMENT_URI = "urn:tollgate:openapi"


def json_schema(node: Any) -> Any:
    """OpenAPI 3.0's schema objects as JSON Schema: `nullable: true` becomes a `null` type."""
    if isinstance(node, list):
        return [json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {key: json_schema(value) for key, value in node.items()}
    if converted.pop("nullable", False) is True and "type" in converted:
        converted["type"] = [converted["type"], "null"]
        if "enum" in converted:
            converted["enum"] = [*converted["enum"], None]
    return converted


@cache
def registry() -> Registry[Any]:
    """The whole document as one JSON Schema resource, so every `#/components/...` resolves."""
    contents = json_schema(copy.deepcopy(shipped()))
    resource: Resource[Any] = Resource.from_contents(contents, default_specification=DRAFT4)
    documents: Registry[Any] = Registry().with_resource(DOCUMENT_URI, resource)
    return documents


def pointer(*segments: str) -> str:
    escaped = (segment.replace("~", "~0").replace("/", "~1") for segment in segments)
    return quote("/" + "/".join(escaped), safe="/~")


def documented(path: str, method: str, status: int) -> tuple[dict[str, Any], str]:
    """The response the document gives for `status` (explicit: every status these tests meet is
    listed), and its JSON pointer."""
    responses = shipped()["paths"][path][method.lower()]["responses"]
    assert str(status) in responses, f"{method} {path}: {status} is not documented"
    response = responses[str(status)]
    where = pointer("paths", path, method.lower(), "responses", str(status))
    if "$ref" in response:
        where = response["$ref"][1:]
        response = shipped()["components"]["responses"][where.rsplit("/", 1)[1]]
    return response, where


def conforms(answer: httpx.Response, path: str, status: int | None = None) -> Any:
    """`answer` (to a request on the documented `path`) has a documented status, content type
    and JSON shape; returns its JSON, or None for a documented empty answer."""
    method = answer.request.method
    assert status is None or answer.status_code == status, (answer.status_code, answer.text)
    response, where = documented(path, method, answer.status_code)
    content = response.get("content")
    if not content:
        assert answer.content == b"", (method, path, answer.content[:200])
        return None
    media = answer.headers.get("content-type", "").partition(";")[0].strip()
    if media not in content:
        assert "*/*" in content, (method, path, media, sorted(content))
        return answer.content
    if method == "HEAD":
        return None
    body = answer.json()
    schema = {"$ref": f"{DOCUMENT_URI}#{where}{pointer('content', media, 'schema')}"}
    errors = list(jsonschema.Draft4Validator(schema, registry=registry()).iter_errors(body))
    assert not errors, f"{method} {path}: {[e.message for e in errors]}\n{body}"
    for header in response.get("headers", {}):
        if header == "ETag":
            assert answer.headers.get("ETag"), (method, path)
    return body


def shapes_config() -> dict[str, Any]:
    return {
        "models": {},
        "keys": {
            OWNER_KEY: {"project": "EPM-RTC-GPT", "roles": ["basic"]},
            OTHER_KEY: {"project": "EPM-RTC-RAIL", "role": "basic"},
            ADMIN_KEY: {"project": "ops", "roles": ["admin"]},
        },
        "roles": {"basic": {}, "admin": {}},
    }


def shapes_settings(folder: Path) -> dict[str, Any]:
    return {
        "encryption": {"secret": "password", "key": "salt"},
        "access": {
            "admin": {"rules": [{"function": "EQUAL", "source": "roles", "targets": ["admin"]}]}
        },
        "storage": {"overrides": {"jclouds.filesystem.basedir": str(folder)}},
    }


async def test_resources_and_sharing_answer_the_documented_shapes(
    gateways: Gateways, tmp_path: Path
) -> None:
    gw = await gateways.start([shapes_config()], settings=shapes_settings(tmp_path / "store"))
    conversation = f"conversations/{MINE}/folder/plan"
    files = f"files/{MINE}/folder/"
    jsons = "/v1/{group}/{{bucket}}/{{path}}"
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        bucket = conforms(await http.get("/v1/bucket", headers=OWNER), "/v1/bucket", 200)
        assert bucket == {"bucket": MINE}

        # JSON resources: write, read, conditions, metadata.
        conversations = jsons.format(group="conversations")
        body = {"id": "plan", "name": "plan", "messages": []}
        written = await http.put(f"/v1/{conversation}", headers=OWNER, json=body)
        item = conforms(written, conversations, 200)
        assert item["url"] == conversation and item["resourceType"] == "CONVERSATION"
        read = await http.get(f"/v1/{conversation}", headers=OWNER)
        assert conforms(read, conversations, 200) == body
        etag = read.headers["ETag"]
        unchanged = await http.get(f"/v1/{conversation}", headers={**OWNER, "If-None-Match": etag})
        conforms(unchanged, conversations, 304)
        again = await http.put(
            f"/v1/{conversation}", headers={**OWNER, "If-None-Match": "*"}, json=body
        )
        assert conforms(again, conversations, 412)["error"]["message"] == "Resource already exists"
        denied = await http.get(f"/v1/{conversation}", headers=OTHER)
        conforms(denied, conversations, 403)
        missing = await http.get(f"/v1/conversations/{MINE}/nothing", headers=OWNER)
        conforms(missing, conversations, 404)
        metadata = await http.get(f"/v1/metadata/{conversation}", headers=OWNER)
        conforms(metadata, "/v1/metadata/conversations/{bucket}/{path}", 200)
        folder = await http.get(
            f"/v1/metadata/conversations/{MINE}/",
            params={"recursive": "true", "permissions": "true"},
            headers={**OWNER, "Accept": "application/vnd.dial.metadata+json"},
        )
        assert folder.headers["content-type"].startswith("application/vnd.dial.metadata+json")
        listing = conforms(folder, "/v1/metadata/conversations/{bucket}/{path}", 200)
        assert [node["url"] for node in listing["items"]] == [conversation]
        bad_query = await http.get(
            f"/v1/metadata/conversations/{MINE}/", params={"limit": "-1"}, headers=OWNER
        )
        conforms(bad_query, "/v1/metadata/conversations/{bucket}/{path}", 400)

        # Files: a multipart upload, the bytes, a folder's listing with a sub-folder.
        upload = await http.put(
            f"/v1/{files}notes.txt",
            headers=OWNER,
            files={"attachment": ("notes.txt", b"some notes", "text/plain")},
        )
        assert conforms(upload, "/v1/files/{bucket}/{path}", 200)["contentLength"] == 10
        await http.put(
            f"/v1/{files}deeper/more.txt", headers=OWNER, files={"file": ("m.txt", b"more")}
        )
        download = await http.get(f"/v1/{files}notes.txt", headers=OWNER)
        assert conforms(download, "/v1/files/{bucket}/{path}", 200) == b"some notes"
        tree = await http.get(
            f"/v1/metadata/{files}", params={"permissions": "true"}, headers=OWNER
        )
        node = conforms(tree, "/v1/metadata/files/{bucket}/{path}", 200)
        assert {child["nodeType"] for child in node["items"]} == {"ITEM", "FOLDER"}
        assert node["permissions"] == ["READ", "WRITE"]
        paged = await http.get(f"/v1/metadata/{files}", params={"limit": "1"}, headers=OWNER)
        assert "nextToken" in conforms(paged, "/v1/metadata/files/{bucket}/{path}", 200)
        root = await http.get(f"/v1/metadata/files/{MINE}/", headers=OWNER)
        assert conforms(root, "/v1/metadata/files/{bucket}/{path}", 200)["name"] is None
        file_item = await http.get(f"/v1/metadata/{files}notes.txt", headers=OWNER)
        conforms(file_item, "/v1/metadata/files/{bucket}/{path}", 200)

        # A custom application: stored, read back, its ApplicationData as a listing item.
        app_url = f"applications/{MINE}/echo"
        definition = {"displayName": "Echo", "endpoint": "http://127.0.0.1:1/chat/completions"}
        stored = await http.put(f"/v1/{app_url}", headers=OWNER, json=definition)
        conforms(stored, jsons.format(group="applications"), 200)
        own = conforms(
            await http.get(f"/v1/{app_url}", headers=OWNER), jsons.format(group="applications")
        )
        assert own["name"] == app_url and own["endpoint"] == definition["endpoint"]
        data = await http.get(f"/openai/applications/{app_url}", headers=OWNER)
        assert conforms(data, "/openai/applications/{application_id}", 200)["id"] == app_url

        # Sharing: an invitation, read by another project and accepted, and the share lists.
        created = await http.post(
            "/v1/ops/resource/share/create",
            headers=OWNER,
            json={
                "invitationType": "link",
                "resources": [
                    {"url": conversation, "permissions": ["READ", "WRITE"]},
                    {"url": files},
                ],
                "maxAcceptedUsers": 5,
            },
        )
        link = conforms(created, "/v1/ops/resource/share/create", 200)["invitationLink"]
        invitation = link.rsplit("/", 1)[1]
        seen = await http.get(f"/v1/invitations/{invitation}", headers=OTHER)
        shown = conforms(seen, "/v1/invitations/{id}", 200)
        assert "acceptedUserLocations" not in shown and shown["maxAcceptedUsers"] == 5
        accepted = await http.get(
            f"/v1/invitations/{invitation}", params={"accept": "true"}, headers=OTHER
        )
        assert accepted.status_code == 200 and accepted.content == b""
        own_invitations = await http.get("/v1/invitations", headers=OWNER)
        listed = conforms(own_invitations, "/v1/invitations", 200)["invitations"]
        assert listed[0]["acceptedUserLocations"] == ["Keys/EPM-RTC-RAIL/"]
        by_me = await http.post(
            "/v1/ops/resource/share/list",
            headers=OWNER,
            json={
                "resourceTypes": ["CONVERSATION", "FILE"],
                "with": "others",
                "includeUserInfo": True,
            },
        )
        shared = conforms(by_me, "/v1/ops/resource/share/list", 200)["resources"]
        assert [entry["sharedWith"][0]["user"] for entry in shared] == ["EPM-RTC-RAIL"] * 2
        with_me = await http.post(
            "/v1/ops/resource/share/list",
            headers=OTHER,
            json={"resourceTypes": ["CONVERSATION", "FILE"], "with": "me", "includeUserInfo": True},
        )
        received = conforms(with_me, "/v1/ops/resource/share/list", 200)["resources"]
        assert {entry["sharedBy"] for entry in received} == {"EPM-RTC-GPT"}
        bad_list = await http.post("/v1/ops/resource/share/list", headers=OWNER, json={})
        conforms(bad_list, "/v1/ops/resource/share/list", 400)
        copied = await http.post(
            "/v1/ops/resource/copy",
            headers=OWNER,
            json={"sourceUrl": conversation, "destinationUrl": f"{conversation}-copy"},
        )
        conforms(copied, "/v1/ops/resource/copy", 200)
        moved = await http.post(
            "/v1/ops/resource/move",
            headers=OWNER,
            json={"sourceUrl": f"{conversation}-copy", "destinationUrl": conversation},
        )
        conforms(moved, "/v1/ops/resource/move", 400)  # the destination exists
        share_copy = await http.post(
            "/v1/ops/resource/share/copy",
            headers=OWNER,
            json={"sourceUrl": conversation, "destinationUrl": f"{conversation}-copy"},
        )
        conforms(share_copy, "/v1/ops/resource/share/copy", 200)
        revoked = await http.post(
            "/v1/ops/resource/share/revoke",
            headers=OWNER,
            json={"resources": [{"url": conversation, "permissions": ["WRITE"]}]},
        )
        conforms(revoked, "/v1/ops/resource/share/revoke", 200)
        discarded = await http.post(
            "/v1/ops/resource/share/discard", headers=OTHER, json={"resources": [{"url": files}]}
        )
        conforms(discarded, "/v1/ops/resource/share/discard", 200)
        not_owner = await http.delete(f"/v1/invitations/{invitation}", headers=OTHER)
        conforms(not_owner, "/v1/invitations/{id}", 403)
        deleted = await http.delete(f"/v1/invitations/{invitation}", headers=OWNER)
        conforms(deleted, "/v1/invitations/{id}", 200)
        gone = await http.get(f"/v1/invitations/{invitation}", headers=OWNER)
        assert conforms(gone, "/v1/invitations/{id}", 404)["error"]["message"] == (
            f"No invitation found for ID {invitation}"
        )
        removed = await http.delete(f"/v1/{files}notes.txt", headers=OWNER)
        conforms(removed, "/v1/files/{bucket}/{path}", 200)
        conforms(await http.delete(f"/v1/{conversation}", headers=OWNER), conversations, 200)


async def test_the_configuration_api_answers_the_documented_shapes(
    gateways: Gateways, tmp_path: Path
) -> None:
    gw = await gateways.start([shapes_config()], settings=shapes_settings(tmp_path / "store"))
    key_path = "/v1/keys/platform/{name}"
    role_path = "/v1/roles/platform/{name}"
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        role = await http.put(
            "/v1/roles/platform/team",
            headers=ADMIN,
            json={"limits": {"chat-model": {"day": "1000"}}, "share": {"FILE": {}}},
        )
        assert conforms(role, role_path, 200) == {"name": "team"}
        shown_role = conforms(await http.get("/v1/roles/platform/team", headers=ADMIN), role_path)
        assert shown_role["limits"] == {"chat-model": {"day": "1000"}}

        made = await http.put(
            "/v1/keys/platform/ci-bot",
            headers={**ADMIN, "If-None-Match": "*"},
            json={
                "project": "ci",
                "roles": ["team"],
                "expiresAt": "2099-01-01T00:00:00Z",
                "description": "the CI",
            },
        )
        written = conforms(made, key_path, 200)
        assert written["key"].startswith("tg-") and made.headers["Cache-Control"] == "no-store"
        shown = await http.get("/v1/keys/platform/ci-bot", headers=ADMIN)
        record = conforms(shown, key_path, 200)
        assert record["status"] == "valid" and "key" not in record
        etag = shown.headers["ETag"]
        cached = await http.get(
            "/v1/keys/platform/ci-bot", headers={**ADMIN, "If-None-Match": etag}
        )
        conforms(cached, key_path, 304)
        conforms(await http.head("/v1/keys/platform/ci-bot", headers=ADMIN), key_path, 200)
        conforms(await http.get("/v1/keys/platform/nobody", headers=ADMIN), key_path, 404)
        conforms(await http.get("/v1/keys/platform/ci-bot", headers=OWNER), key_path, 403)
        conflict = await http.put(
            "/v1/keys/platform/ci-bot",
            headers={**ADMIN, "If-None-Match": "*"},
            json={"project": "ci", "roles": ["team"]},
        )
        conforms(conflict, key_path, 412)

        rotated = await http.post(
            "/v1/ops/keys/ci-bot/rotate", headers=ADMIN, json={"gracePeriodSeconds": 60}
        )
        answer = conforms(rotated, "/v1/ops/keys/{name}/rotate", 200)
        assert answer["key"].startswith("tg-") and "previousKeyExpiresAt" in answer
        after = conforms(await http.get("/v1/keys/platform/ci-bot", headers=ADMIN), key_path)
        assert after["previousKeyExpiresAt"] == answer["previousKeyExpiresAt"]
        unknown = await http.post("/v1/ops/keys/nobody/rotate", headers=ADMIN)
        conforms(unknown, "/v1/ops/keys/{name}/rotate", 404)

        for kind in ("keys", "roles"):
            listing = await http.get(
                f"/v1/metadata/{kind}/platform/",
                params={"limit": "10"},
                headers={**ADMIN, "Accept": "application/vnd.dial.metadata+json"},
            )
            folder = conforms(listing, f"/v1/metadata/{kind}/platform/", 200)
            assert [item["name"] for item in folder["items"]] == [
                "ci-bot" if kind == "keys" else "team"
            ]
            name = folder["items"][0]["name"]
            one = await http.get(f"/v1/metadata/{kind}/platform/{name}", headers=ADMIN)
            conforms(one, f"/v1/metadata/{kind}/platform/{{name}}", 200)
        bad = await http.get("/v1/metadata/keys/platform/", params={"limit": "5000"}, headers=ADMIN)
        conforms(bad, "/v1/metadata/keys/platform/", 400)

        manifests = [
            {"kind": "Role", "name": "roles/platform/bots", "spec": {"limits": {}}},
            {
                "kind": "Key",
                "name": "keys/platform/bot",
                "spec": {"project": "b", "roles": ["bots"]},
            },
        ]
        checked = await http.post(
            "/v1/admin/validate", headers=ADMIN, json={"manifests": manifests}
        )
        assert conforms(checked, "/v1/admin/validate", 200)["valid"] == 2
        refused = await http.post(
            "/v1/admin/apply",
            headers=ADMIN,
            json={"manifests": [*manifests, {"kind": "Model", "name": "models/platform/m"}]},
        )
        assert conforms(refused, "/v1/admin/apply", 422)["applied"] == 0
        applied = await http.post("/v1/admin/apply", headers=ADMIN, json={"manifests": manifests})
        results = conforms(applied, "/v1/admin/apply", 200)["results"]
        assert [result["status"] for result in results] == ["APPLIED", "APPLIED"]
        envelope = await http.post("/v1/admin/apply", headers=ADMIN, json={"manifests": 1})
        conforms(envelope, "/v1/admin/apply", 400)

        removed = await http.delete("/v1/keys/platform/bot", headers=ADMIN)
        conforms(removed, key_path, 204)
        conforms(await http.delete("/v1/keys/platform/bot", headers=ADMIN), key_path, 404)
        audit = await http.get("/v1/admin/audit", params={"limit": "50"}, headers=ADMIN)
        entries = conforms(audit, "/v1/admin/audit", 200)["items"]
        assert {entry["action"] for entry in entries} == {"create", "rotate", "delete"}
        filtered = await http.get("/v1/admin/audit", params={"type": "team"}, headers=ADMIN)
        conforms(filtered, "/v1/admin/audit", 400)
