"""Hardening of what Tollgate prints (issue 11): metric labels are printable (item 16), costs
in the access log are plain decimals (item 19)."""

from __future__ import annotations

import json

from tollgate.observability.logs import AccessLog, plain_usd
from tollgate.observability.metrics import Metrics


def test_control_characters_in_metric_labels_are_escaped() -> None:
    metrics = Metrics()
    metrics.attempt("\x00route\x00files", "#0", "200", 0.01)
    metrics.endpoint("route", "r\x1b[31m\x7f", "p\nq", 200)
    text = metrics.render().decode()
    assert not any((ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) <= 0x9F for c in text)
    assert 'deployment="\\\\x00route\\\\x00files"' in text
    assert 'target="r\\\\x1b[31m\\\\x7f"' in text
    assert 'project="p\\\\x0aq"' in text
    # Every sample is one line: no label value broke one.
    lines = [line for line in text.splitlines() if line.startswith("tollgate_endpoint_requests")]
    assert len(lines) == 1


def test_costs_in_the_access_log_are_plain_decimals() -> None:
    assert [plain_usd(n) for n in (3150, 0, 1, 2_500_000_000, 10**9)] == [
        "0.00000315",
        "0",
        "0.000000001",
        "2.5",
        "1",
    ]
    for log_format in ("text", "json"):
        log = AccessLog(log_format, fd=2)
        line = log._line(0.0, "p", None, None, "m", 200, (1, 2, 3), 3150, None, 1, 1.0, None)
        text = line.decode()
        assert "0.00000315" in text and "e-" not in text, text
        if log_format == "json":
            assert json.loads(text)["cost_usd"] == 0.00000315
