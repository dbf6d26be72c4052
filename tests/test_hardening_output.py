"""Hardening of what Tollgate prints (issue 11): metric labels are printable (item 16), costs
in the access log are plain decimals (item 19)."""

from __future__ import annotations

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
