"""A small OTLP/HTTP trace collector for the tests (aiohttp, run as its own process).

`POST /v1/traces` takes an `ExportTraceServiceRequest` (protobuf, optionally gzipped), decodes
it with `opentelemetry-proto` and keeps its spans. Test-only endpoints:

- `GET /_spans`: every span received, oldest first, as JSON objects: `name`, `kind` (SERVER,
  CLIENT...), `trace_id`, `span_id`, `parent_span_id` (hex; "" for a root), `status` (UNSET,
  OK, ERROR), `attributes` and `resource` (name → value);
- `GET /_raw`: every request body received, decoded from gzip, concatenated (to search for
  secrets in exactly what was exported);
- `GET /health`.

    python tests/otlp_collector.py --port 4318
"""

from __future__ import annotations

import argparse
import gzip
from typing import Any

from aiohttp import web
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

SPANS = web.AppKey("spans", list)
RAW = web.AppKey("raw", list)
PROTOBUF = "application/x-protobuf"


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, kind)


def _attributes(pairs: Any) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for pair in pairs:
        assert isinstance(pair, KeyValue)
        result[pair.key] = _value(pair.value)
    return result


async def traces(request: web.Request) -> web.Response:
    body = await request.read()
    if request.headers.get("Content-Encoding") == "gzip" or body[:2] == b"\x1f\x8b":
        body = gzip.decompress(body)
    request.app[RAW].append(body)
    export = ExportTraceServiceRequest()
    try:
        export.ParseFromString(body)
    except DecodeError:
        return web.Response(status=400, text="not an ExportTraceServiceRequest")
    for resource_spans in export.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                request.app[SPANS].append(
                    {
                        "name": span.name,
                        "kind": Span.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_"),
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(),
                        "status": Status.StatusCode.Name(span.status.code).removeprefix(
                            "STATUS_CODE_"
                        ),
                        "attributes": _attributes(span.attributes),
                        "resource": resource,
                        "scope": scope_spans.scope.name,
                    }
                )
    answer = ExportTraceServiceResponse().SerializeToString()
    return web.Response(body=answer, content_type=PROTOBUF)


async def spans(request: web.Request) -> web.Response:
    return web.json_response(request.app[SPANS])


async def raw(request: web.Request) -> web.Response:
    return web.Response(body=b"".join(request.app[RAW]), content_type="application/octet-stream")


async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def build_app() -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[SPANS] = []
    app[RAW] = []
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/_spans", spans)
    app.router.add_get("/_raw", raw)
    app.router.add_get("/health", health)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(build_app(), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
