"""DIAL's texts for a request rejected by a limit, verbatim (compatibility C18).

`token_message`, `request_message` and `cost_message` give the error's `message`;
`display_message` gives its human `display_message`. Windows are named `minute`, `day`,
`week`, `month` (tokens and cost) and `hour`, `day` (requests).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from decimal import ROUND_HALF_EVEN, Context, Decimal
from typing import Literal

from tollgate.config.schema import UNLIMITED

Kind = Literal["token", "request", "cost"]

TOKEN_WINDOWS = ("minute", "day", "week", "month")
REQUEST_WINDOWS = ("hour", "day")
COST_WINDOWS = TOKEN_WINDOWS

# The order and adjective of each window in a display message: longest window first
# (compatibility C18; one DIAL version wrote "minutely" for the hour window, later fixed).
ADJECTIVES: dict[Kind, tuple[tuple[str, str], ...]] = {
    "token": (("month", "monthly"), ("week", "weekly"), ("day", "daily"), ("minute", "minute")),
    "request": (("day", "daily"), ("hour", "hourly")),
    "cost": (("month", "monthly"), ("week", "weekly"), ("day", "daily"), ("minute", "minute")),
}

CENT = Decimal("0.01")
# Java's US currency NumberFormat, which DIAL uses, rounds half-even (compatibility C18).
CURRENCY = Context(prec=100, rounding=ROUND_HALF_EVEN)


def token_message(used: Mapping[str, int], limits: Mapping[str, int]) -> str:
    """`Hit token rate limit. Minute limit: u / l tokens. ...` over all four windows.

    A window missing from `used` counts 0; one missing from `limits` is unlimited and, like
    every unlimited limit, prints as 9223372036854775807 (Java's Long.MAX_VALUE).
    """
    parts = [
        f"{w.capitalize()} limit: {used.get(w, 0)} / {limits.get(w, UNLIMITED)} tokens."
        for w in TOKEN_WINDOWS
    ]
    return "Hit token rate limit. " + " ".join(parts)


def request_message(used: Mapping[str, int], limits: Mapping[str, int]) -> str:
    """`Hit request rate limit. Hour limit: u / l requests. Day limit: u / l requests.`"""
    parts = [
        f"{w.capitalize()} limit: {used.get(w, 0)} / {limits.get(w, UNLIMITED)} requests."
        for w in REQUEST_WINDOWS
    ]
    return "Hit request rate limit. " + " ".join(parts)


def usd(amount: Decimal) -> str:
    """`amount` as Java's US currency format writes it: `$1,234.50`, `-$0.25`.

    Two decimals, thousands separators, rounded half-even as Java does (`$0.125` → `$0.12`).
    A value that rounds to zero prints `$0.00`, never `-$0.00`.
    """
    cents = amount.quantize(CENT, context=CURRENCY)
    sign = "-" if cents < 0 else ""
    return f"{sign}${cents.copy_abs():,f}"


def cost_message(used: Mapping[str, Decimal], limits: Mapping[str, Decimal]) -> str:
    """`Hit cost rate limit. Minute limit: $x / $y. ...` over all four windows.

    An unlimited cost limit is DIAL's sentinel, Long.MAX_VALUE dollars, and prints as Java
    prints it: `$9,223,372,036,854,775,807.00` (a window missing from `limits` prints the
    same; one missing from `used` prints `$0.00`).
    """
    unlimited = Decimal(UNLIMITED)
    parts = [
        f"{w.capitalize()} limit: {usd(used.get(w, Decimal(0)))} / {usd(limits.get(w, unlimited))}."
        for w in COST_WINDOWS
    ]
    return "Hit cost rate limit. " + " ".join(parts)


def display_message(kind: Kind, exceeded: Collection[str]) -> str:
    """`You've exceeded your monthly, weekly and daily token limits` and the like.

    The exceeded windows are listed longest first whatever the order of `exceeded`, joined
    with `, ` and a final ` and `; the noun is plural when more than one window is listed.
    Raises ValueError for a window that `kind` does not have.
    """
    order = ADJECTIVES[kind]
    unknown = set(exceeded).difference(window for window, _ in order)
    if unknown:
        raise ValueError(f"no {kind} window named {', '.join(sorted(unknown))}")
    words = [adjective for window, adjective in order if window in exceeded]
    if len(words) > 1:
        words[-2:] = [f"{words[-2]} and {words[-1]}"]
        return f"You've exceeded your {', '.join(words)} {kind} limits"
    # With no window DIAL writes no adjective: "You've exceeded your token limit".
    return " ".join(["You've exceeded your", *words, f"{kind} limit"])
