"""DIAL's 429 texts, verbatim (spec auth-limits 5.8)."""

from __future__ import annotations

from collections.abc import Collection
from decimal import Decimal

import pytest

from tollgate.limits.messages import (
    Kind,
    cost_message,
    display_message,
    request_message,
    token_message,
    usd,
)

D = Decimal
UNLIMITED = 9223372036854775807


# --- token_message ---------------------------------------------------------------------------


def test_token_message_dial() -> None:
    """DIAL's RateLimiterTest: minute 100 / day 10000, 180 tokens used."""
    used = {"minute": 180, "day": 180, "week": 180, "month": 180}
    limits = {"minute": 100, "day": 10000, "week": UNLIMITED, "month": UNLIMITED}
    assert token_message(used, limits) == (
        "Hit token rate limit. Minute limit: 180 / 100 tokens. Day limit: 180 / 10000 tokens."
        " Week limit: 180 / 9223372036854775807 tokens."
        " Month limit: 180 / 9223372036854775807 tokens."
    )


def test_token_message_lists_all_four_windows() -> None:
    """A window missing from `used` counts 0, one missing from `limits` is unlimited."""
    assert token_message({"day": 5}, {"day": 5}) == (
        "Hit token rate limit. Minute limit: 0 / 9223372036854775807 tokens."
        " Day limit: 5 / 5 tokens. Week limit: 0 / 9223372036854775807 tokens."
        " Month limit: 0 / 9223372036854775807 tokens."
    )


# --- request_message -------------------------------------------------------------------------


def test_request_message_dial() -> None:
    message = request_message({"hour": 1, "day": 1}, {"hour": 1, "day": 10})
    assert (
        message == "Hit request rate limit. Hour limit: 1 / 1 requests. Day limit: 1 / 10 requests."
    )


def test_request_message_unlimited() -> None:
    message = request_message({"hour": 2, "day": 2}, {"hour": 2})
    assert message == (
        "Hit request rate limit. Hour limit: 2 / 2 requests."
        " Day limit: 2 / 9223372036854775807 requests."
    )


# --- cost_message ----------------------------------------------------------------------------


def test_cost_message_dial() -> None:
    """DIAL's RateLimiterTest: $0.20 spent against minute $0.20 and day $20."""
    used = dict.fromkeys(("minute", "day", "week", "month"), D("0.2"))
    limits = {"minute": D("0.20"), "day": D(20), "week": D(UNLIMITED), "month": D(UNLIMITED)}
    assert cost_message(used, limits) == (
        "Hit cost rate limit. Minute limit: $0.20 / $0.20. Day limit: $0.20 / $20.00."
        " Week limit: $0.20 / $9,223,372,036,854,775,807.00."
        " Month limit: $0.20 / $9,223,372,036,854,775,807.00."
    )


def test_cost_message_missing_windows() -> None:
    assert cost_message({"minute": D("1234.5")}, {"minute": D(1000)}) == (
        "Hit cost rate limit. Minute limit: $1,234.50 / $1,000.00."
        " Day limit: $0.00 / $9,223,372,036,854,775,807.00."
        " Week limit: $0.00 / $9,223,372,036,854,775,807.00."
        " Month limit: $0.00 / $9,223,372,036,854,775,807.00."
    )


@pytest.mark.parametrize(
    ("amount", "text"),
    [
        ("0", "$0.00"),
        ("0.2", "$0.20"),
        ("1234.5", "$1,234.50"),
        ("999.994", "$999.99"),
        ("999.995", "$1,000.00"),
        ("0.125", "$0.12"),  # half-even, as Java's NumberFormat in DIAL
        ("0.135", "$0.14"),
        ("1234567.891", "$1,234,567.89"),
        ("0.000000001", "$0.00"),
        ("-0.001", "$0.00"),
        ("-1234.5", "-$1,234.50"),
        ("9223372036854775807", "$9,223,372,036,854,775,807.00"),
        ("1E+3", "$1,000.00"),
    ],
)
def test_usd(amount: str, text: str) -> None:
    assert usd(D(amount)) == text


# --- display_message -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "exceeded", "text"),
    [
        ("token", ["day"], "You've exceeded your daily token limit"),
        (
            "token",
            ["day", "week", "month"],
            "You've exceeded your monthly, weekly and daily token limits",
        ),
        ("token", ["minute", "month"], "You've exceeded your monthly and minute token limits"),
        (
            "token",
            {"minute", "day", "week", "month"},
            "You've exceeded your monthly, weekly, daily and minute token limits",
        ),
        ("request", ["hour", "day"], "You've exceeded your daily and hourly request limits"),
        ("request", ["hour"], "You've exceeded your hourly request limit"),
        ("request", ("day",), "You've exceeded your daily request limit"),
        ("cost", ["minute"], "You've exceeded your minute cost limit"),
        ("cost", ["week", "day"], "You've exceeded your weekly and daily cost limits"),
        ("token", [], "You've exceeded your token limit"),
    ],
)
def test_display_message(kind: Kind, exceeded: Collection[str], text: str) -> None:
    assert display_message(kind, exceeded) == text


def test_display_message_refuses_a_window_the_kind_lacks() -> None:
    with pytest.raises(ValueError, match="hour"):
        display_message("token", ["hour"])
    with pytest.raises(ValueError, match="minute"):
        display_message("request", ["minute"])
