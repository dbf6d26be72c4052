"""Logging set-up (`log.format`, `log.level`) and the access log: one line per call.

`json` writes every record as one JSON object per line (`time` in UTC ISO-8601, `level`,
`logger`, `message`, and `exception` when there is one), for log shippers; `text` is the
classic `time LEVEL logger: message`.

The access log (logger `tollgate.access`, INFO) bypasses the `logging` machinery: a call hands
its facts over (one tuple), and lines are formatted (orjson, or one f-string) and written with
one `os.write` in batches, at most `FLUSH_AFTER_S` after the first call of a batch, once
`FLUSH_LINES` are waiting, and when the gateway stops. Both halves were measured in a busy
gateway: a system call per line cost a fifth of its CPU, and formatting each line amid a
request's work about 14 µs of CPU per call (2 µs in a loop). Lines never interleave. It follows
the logger's level, read once at start-up, and goes where the root handler writes: standard
error.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any, Final, Literal

import orjson

TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FLUSH_AFTER_S: Final = 0.05
FLUSH_LINES: Final = 512
ACCESS_LOGGER: Final = "tollgate.access"
_PLAIN: Final = re.compile(r"[\w.:@/+\-\[\]]+")

LogFormat = Literal["text", "json"]
Facts = Callable[..., tuple[Any, ...]]
# A line not yet written: when, and its fields (or how to work them out, and from what).
_Pending = tuple[float, Facts, tuple[Any, ...]]


class _Stamp:
    """Timestamps for log lines; the formatting of the second is cached (a line per call)."""

    __slots__ = ("_iso", "_iso_second", "_text", "_text_second")

    def __init__(self) -> None:
        self._iso_second = self._text_second = -1
        self._iso = self._text = ""

    def iso(self, at: float) -> str:
        """`2026-11-22T22:30:01.123Z` (UTC)."""
        second = int(at)
        if second != self._iso_second:
            self._iso_second = second
            self._iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._iso}.{int((at - second) * 1000):03d}Z"

    def text(self, at: float) -> str:
        """`2026-11-22 22:30:01,123` (local time), as `logging`'s default `asctime`."""
        second = int(at)
        if second != self._text_second:
            self._text_second = second
            self._text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return f"{self._text},{int((at - second) * 1000):03d}"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def __init__(self) -> None:
        super().__init__()
        self._stamp = _Stamp()

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self._stamp.iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def configure(level: str, log_format: LogFormat) -> None:
    """Replace the root handler: standard error, in `log_format`, at `level`."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    root.addHandler(handler)
    root.setLevel(level.upper())


def _text_value(value: object) -> str:
    """A value of a `key=value` text line; quoted (JSON) when it has spaces or odd characters."""
    if type(value) is not str:
        return str(value)  # a number
    quoted = _QUOTED.get(value)
    if quoted is None:
        # Names repeat from call to call (projects, deployments, upstreams): cached, bounded.
        if len(_QUOTED) >= 4096:
            _QUOTED.clear()
        quoted = _QUOTED[value] = value if _PLAIN.fullmatch(value) else orjson.dumps(value).decode()
    return quoted


_QUOTED: dict[str, str] = {}


def plain_usd(nano: int) -> str:
    """Nano-dollars as a plain decimal (`0.00000315`, never `3.15e-06`), trailing zeros cut."""
    whole, fraction = divmod(nano, 1_000_000_000)
    text = f"{whole}.{fraction:09d}".rstrip("0")
    return text[:-1] if text.endswith(".") else text


# The fields of a JSON access line that are left out when they are None.
_OPTIONAL: Final = ("project", "key", "via", "cost_usd", "upstream", "duration_ms", "trace_id")


class AccessLog:
    """Writes the access-log line of each call to standard error (see the module docstring)."""

    __slots__ = ("_fd", "_flush", "_json", "_pending", "_stamp")

    def __init__(self, log_format: LogFormat, fd: int | None = None) -> None:
        self._json = log_format == "json"
        self._fd = sys.stderr.fileno() if fd is None else fd
        self._stamp = _Stamp()
        # Calls not yet written, as their facts: lines are formatted in a batch at `flush`.
        self._pending: list[_Pending] = []
        self._flush: asyncio.TimerHandle | None = None

    @staticmethod
    def enabled() -> bool:
        return logging.getLogger(ACCESS_LOGGER).isEnabledFor(logging.INFO)

    def later(self, facts: Facts, args: tuple[Any, ...]) -> None:
        """One call's line, whose fields `facts(*args)` gives in `_line`'s order (None values
        are left out of the line).

        Only `args` are kept now: the fields are worked out and the line formatted with the
        others at `flush`. Formatting lines one after another costs a fraction of formatting
        each amid a request's work (about 14 µs of CPU per call measured in a busy gateway,
        against 2 µs in a loop).
        """
        self._add((time.time(), facts, args))

    def _add(self, entry: _Pending) -> None:
        pending = self._pending
        pending.append(entry)
        if len(pending) >= FLUSH_LINES:
            self.flush()
        elif self._flush is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no event loop (a tool, a test): written now
                self.flush()
                return
            self._flush = loop.call_later(FLUSH_AFTER_S, self.flush)

    def _line(
        self,
        now: float,
        project: str | None,
        key: str | None,
        via: str | None,
        deployment: str,
        status: int,
        tokens: tuple[int, int, int],
        cost_nano: int | None,
        upstream: str | None,
        attempts: int,
        duration_ms: float | None,
        trace_id: str | None,
        usage_estimated: bool = False,
        reason: str | None = None,
    ) -> bytes:
        prompt, completion, total = tokens
        cost_usd = None if cost_nano is None else plain_usd(cost_nano)
        if self._json:
            entry: dict[str, Any] = {
                "time": self._stamp.iso(now),
                "level": "INFO",
                "logger": ACCESS_LOGGER,
                "message": "call",
                "project": project,
                "key": key,
                "via": via,
                "deployment": deployment,
                "status": status,
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": total,
                # A JSON number written as a plain decimal, as in the text format.
                "cost_usd": None if cost_usd is None else orjson.Fragment(cost_usd),
                "upstream": upstream,
                "attempts": attempts,
                "duration_ms": duration_ms,
                "trace_id": trace_id,
            }
            for name in _OPTIONAL:
                if entry[name] is None:
                    del entry[name]
            if usage_estimated:  # the tokens are Tollgate's count (compatibility C71)
                entry["usage_estimated"] = True
            if reason is not None:  # why a known key was refused (compatibility C81)
                entry["reason"] = reason
            return orjson.dumps(entry, option=orjson.OPT_APPEND_NEWLINE)
        q = _text_value
        return (
            f"{self._stamp.text(now)} INFO {ACCESS_LOGGER}: call"
            f"{'' if project is None else ' project=' + q(project)}"
            f"{'' if key is None else ' key=' + key}"
            f"{'' if via is None else ' via=' + q(via)}"
            f" deployment={q(deployment)}"
            f" status={status} prompt_tokens={prompt} completion_tokens={completion}"
            f" total_tokens={total}"
            f"{' usage_estimated=true' if usage_estimated else ''}"
            f"{'' if cost_usd is None else f' cost_usd={cost_usd}'}"
            f"{'' if upstream is None else ' upstream=' + q(upstream)}"
            f" attempts={attempts}"
            f"{'' if duration_ms is None else f' duration_ms={duration_ms}'}"
            f"{'' if trace_id is None else ' trace_id=' + trace_id}"
            f"{'' if reason is None else ' reason=' + reason}\n"
        ).encode()

    def flush(self) -> None:
        """Write the buffered lines, in order (also called when the gateway stops)."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if not self._pending:
            return
        line = self._line
        data = b"".join([line(now, *facts(*args)) for now, facts, args in self._pending])
        self._pending.clear()
        try:
            written = os.write(self._fd, data)
            while written < len(data):  # a short write (a full pipe): the rest, in order
                written += os.write(self._fd, data[written:])
        except OSError:
            pass  # a log that cannot be written must not fail the call
