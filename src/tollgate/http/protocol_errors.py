"""aiohttp's log of requests it refuses before Tollgate sees them.

A request line or header over `server.maxHeaderSize`, too many headers, or bytes that are not
HTTP are answered 400 by aiohttp itself, which logs an ERROR with a traceback whose message
quotes up to 100 bytes of the offending line. That line may be an `Api-Key` or `Authorization`
header (compatibility C10), and any client can produce such lines at will: each becomes one INFO
line naming only the status and the kind of problem.
"""

from __future__ import annotations

import logging

from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.log import server_logger


class RefusedRequestFilter(logging.Filter):
    """Rewrites aiohttp's record of a refused malformed request; passes every other record."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            record.msg = "refused a malformed request: %s %s"
            record.args = (error.code, type(error).__name__)
            record.exc_info = None
            record.exc_text = None
            record.levelno = logging.INFO
            record.levelname = "INFO"
        return True


_FILTER = RefusedRequestFilter()


def install() -> None:
    """Idempotent: the filter is added once to `aiohttp.server`."""
    if _FILTER not in server_logger.filters:
        server_logger.addFilter(_FILTER)
