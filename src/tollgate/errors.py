"""Errors as values: a status and DIAL's message, raised where known, rendered once at the edge."""

from __future__ import annotations

from collections.abc import Mapping

import orjson


class GatewayError(Exception):
    """A failure the client should see, with DIAL's status code and message (compatibility C49)."""

    __slots__ = ("display_message", "headers", "kind", "message", "status")

    def __init__(
        self,
        status: int,
        message: str,
        *,
        display_message: str | None = None,
        headers: Mapping[str, str] | None = None,
        kind: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.display_message = display_message
        self.headers = headers
        self.kind = kind  # OpenAI's `type` (`invalid_request_error`), where DIAL sends one

    def body(self) -> bytes:
        """The JSON error body: `{"error": {"message", "code", "display_message"?, "type"?}}`."""
        error: dict[str, str] = {"message": self.message, "code": str(self.status)}
        if self.display_message is not None:
            error["display_message"] = self.display_message
        if self.kind is not None:
            error["type"] = self.kind
        try:
            return orjson.dumps({"error": error})
        except TypeError:
            # A message that echoes what a client sent may hold lone surrogates (aiohttp
            # decodes bytes that are not UTF-8 in headers and paths that way): shown escaped.
            return orjson.dumps({"error": {k: _printable(v) for k, v in error.items()}})


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def unauthorized_missing() -> GatewayError:
    return GatewayError(401, "At least API-KEY or Authorization header must be provided")


def unknown_api_key() -> GatewayError:
    return GatewayError(401, "Unknown api key")


def bad_authorization() -> GatewayError:
    return GatewayError(401, "Bad Authorization header")


def forbidden_deployment(deployment_id: str) -> GatewayError:
    return GatewayError(403, f"Forbidden deployment: {deployment_id}")


def unknown_application(deployment_id: str) -> GatewayError:
    return GatewayError(404, f"Unknown application: {deployment_id}")


def no_route() -> GatewayError:
    # An unknown URL is 404; DIAL answers 502 (compatibility C50).
    return GatewayError(404, "No route")


STORE_ERRORS: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, OSError)


def store_errors() -> tuple[type[BaseException], ...]:
    """What a shared store's failure looks like: socket errors, and redis-py's own errors."""
    try:
        import redis.exceptions
    except ImportError:  # pragma: no cover - redis is a dependency
        return STORE_ERRORS
    return (*STORE_ERRORS, redis.exceptions.RedisError)
