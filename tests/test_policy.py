"""Which limits apply: roles, `userRoles`, the `default` role, cost limits (spec 5.4, 9.4)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tollgate.config.schema import UNLIMITED, UNLIMITED_COST, Config
from tollgate.limits.policy import (
    COST_WINDOWS,
    REQUEST_WINDOWS,
    TOKEN_WINDOWS,
    LimitPolicy,
    Limits,
)

U = UNLIMITED
UC = UNLIMITED_COST
NO_LIMITS = Limits((U, U, U, U), (U, U), (UC, UC, UC, UC))


def policy(roles: dict[str, Any]) -> LimitPolicy:
    return LimitPolicy(Config.model_validate({"roles": roles}))


def limits_of(
    roles: dict[str, Any],
    caller: set[str],
    deployment: str = "model",
    user_roles: set[str] | None = None,
) -> Limits:
    return policy(roles).limits(
        frozenset(caller), deployment, None if user_roles is None else frozenset(user_roles)
    )


def test_window_names() -> None:
    assert TOKEN_WINDOWS == ("minute", "day", "week", "month")
    assert REQUEST_WINDOWS == ("hour", "day")
    assert COST_WINDOWS == ("minute", "day", "week", "month")


def test_most_permissive_role_wins() -> None:
    """Spec 9.4 item 5: role1 minute 100, role2 minute 200 -> 200 (a maximum, never a sum)."""
    roles = {
        "role1": {"limits": {"model": {"minute": 100}}},
        "role2": {"limits": {"model": {"minute": 200}}},
    }
    got = limits_of(roles, {"role1", "role2"})
    assert got.tokens == (200, U, U, U)
    assert got.requests == (U, U)
    assert limits_of(roles, {"role1"}).tokens[0] == 100
    assert limits_of(roles, {"role2"}).tokens[0] == 200


def test_field_wise_maximum() -> None:
    roles = {
        "a": {"limits": {"model": {"minute": 100, "day": 5000, "requestHour": 7, "requestDay": 9}}},
        "b": {
            "limits": {"model": {"minute": 300, "day": 1000, "requestHour": 3, "requestDay": 90}}
        },
        "c": {"limits": {"model": {"minute": 1, "day": 1, "requestHour": 1, "requestDay": 1}}},
    }
    got = limits_of(roles, {"a", "b", "c"})
    assert got.tokens == (300, 5000, U, U)
    assert got.requests == (7, 90)


def test_an_unset_field_is_unlimited_and_wins() -> None:
    """Spec 5.4 quirk: {minute: 100} with {day: 1000} gives unlimited for both."""
    roles = {
        "a": {"limits": {"model": {"minute": 100}}},
        "b": {"limits": {"model": {"day": 1000}}},
    }
    assert limits_of(roles, {"a", "b"}) == NO_LIMITS
    assert limits_of(roles, {"a"}).tokens == (100, U, U, U)
    assert limits_of(roles, {"b"}).tokens == (U, 1000, U, U)


def test_no_limits_and_no_default_is_unlimited() -> None:
    """Spec 9.4 item 6."""
    roles = {"plain": {}, "other": {"limits": {"other-model": {"minute": 1}}}}
    got = limits_of(roles, {"plain", "other"})
    assert got == NO_LIMITS
    assert got.unlimited and got.positive
    assert limits_of({}, set()) == NO_LIMITS
    assert limits_of({}, {"ghost"}) == NO_LIMITS  # a role the config does not define


def test_default_role_is_the_fallback() -> None:
    roles = {
        "default": {"limits": {"model": {"minute": 50, "requestDay": 10}}},
        "plain": {},
    }
    expected = Limits((50, U, U, U), (U, 10), (UC, UC, UC, UC))
    assert limits_of(roles, {"plain"}) == expected
    assert limits_of(roles, set()) == expected  # the caller need not hold `default`
    assert limits_of(roles, {"default"}) == expected
    assert limits_of(roles, {"plain"}, deployment="other") == NO_LIMITS


def test_default_empty_entry_is_unlimited() -> None:
    """Spec 9.4 item 9: the `default` role's `{}` entry means all unlimited."""
    assert limits_of({"default": {"limits": {"model": {}}}}, {"default"}) == NO_LIMITS


def test_a_role_with_an_entry_beats_the_default() -> None:
    roles = {
        "default": {"limits": {"model": {"minute": 1_000_000}}},
        "small": {"limits": {"model": {"minute": 10}}},
    }
    # The default is a fallback, not a candidate: the role's own, smaller, limit applies.
    assert limits_of(roles, {"small"}).tokens[0] == 10
    # Unless the caller holds `default` itself, which then counts as any role.
    assert limits_of(roles, {"small", "default"}).tokens[0] == 1_000_000


def test_a_role_without_an_entry_for_the_deployment_is_skipped() -> None:
    roles = {
        "default": {"limits": {"model": {"minute": 5}}},
        "access-only": {"limits": {"other": {"minute": 99}}},
        "limited": {"limits": {"model": {"minute": 20}}},
    }
    # access-only grants access but says nothing about `model`: it is skipped, it does not
    # count as unlimited and it does not pull in the default.
    assert limits_of(roles, {"access-only", "limited"}).tokens[0] == 20
    assert limits_of(roles, {"access-only"}).tokens[0] == 5


def test_user_roles_filter_the_candidates() -> None:
    roles = {
        "role1": {"limits": {"model": {"minute": 100}}},
        "role2": {"limits": {"model": {"minute": 200}}},
        "default": {"limits": {"model": {"minute": 7}}},
    }
    # role2 does not grant access to the deployment: its limit does not apply.
    assert limits_of(roles, {"role1", "role2"}, user_roles={"role1"}).tokens[0] == 100
    assert limits_of(roles, {"role1", "role2"}, user_roles={"role2", "x"}).tokens[0] == 200
    # No granting role: the default entry.
    assert limits_of(roles, {"role1", "role2"}, user_roles={"x"}).tokens[0] == 7
    assert limits_of(roles, {"role1", "role2"}, user_roles=set()).tokens[0] == 7
    # userRoles null: every caller role is a candidate.
    assert limits_of(roles, {"role1", "role2"}, user_roles=None).tokens[0] == 200


def test_default_in_user_roles_counts_only_if_the_caller_holds_it() -> None:
    roles = {
        "default": {"limits": {"model": {"minute": 500}}},
        "role1": {"limits": {"model": {"minute": 100}}},
    }
    assert limits_of(roles, {"role1"}, user_roles={"role1", "default"}).tokens[0] == 100
    assert limits_of(roles, {"role1", "default"}, user_roles={"role1", "default"}).tokens[0] == 500


@pytest.mark.parametrize(
    ("entry", "positive"),
    [
        ({}, True),
        ({"minute": 1, "day": 1, "week": 1, "month": 1, "requestHour": 1, "requestDay": 1}, True),
        ({"day": -1}, False),  # spec 9.4 item 1
        ({"minute": 0}, False),
        ({"week": 0}, False),
        ({"month": -5}, False),
        ({"requestHour": 0}, False),
        ({"requestDay": -1}, False),
        ({"minute": None}, False),  # JSON null binds to 0 in DIAL (spec 2.2)
    ],
)
def test_positive(entry: dict[str, Any], positive: bool) -> None:
    got = limits_of({"r": {"limits": {"model": entry}}}, {"r"})
    assert got.positive is positive


def test_non_positive_in_one_role_is_overridden_by_another() -> None:
    roles = {
        "blocked": {"limits": {"model": {"day": -1}}},
        "open": {"limits": {"model": {"day": 10}}},
    }
    assert limits_of(roles, {"blocked"}).positive is False
    assert limits_of(roles, {"blocked", "open"}).tokens[1] == 10


def test_cost_limits_do_not_affect_positive() -> None:
    """Spec 5.4: CostLimit positivity is not checked on the request path."""
    got = limits_of({"r": {"costLimit": {"day": 0, "minute": "-1"}}}, {"r"})
    assert got.positive is True
    assert got.cost == (Decimal(-1), Decimal(0), UC, UC)


def test_numbers_given_as_strings() -> None:
    roles = {
        "r": {
            "limits": {"model": {"minute": "100", "day": "1000", "requestHour": "3"}},
            "costLimit": {"day": "12.50", "month": 300},
        }
    }
    got = limits_of(roles, {"r"})
    assert got.tokens == (100, 1000, U, U)
    assert got.requests == (3, U)
    assert got.cost == (UC, Decimal("12.50"), UC, Decimal(300))
    assert all(type(n) is int for n in (*got.tokens, *got.requests))


def test_cost_limits_over_all_roles_not_filtered_by_user_roles() -> None:
    roles = {
        "a": {"costLimit": {"minute": "1", "day": "10"}},
        "b": {"costLimit": {"minute": "2", "day": "5"}},
        "c": {"limits": {"model": {"minute": 100}}},
    }
    got = limits_of(roles, {"a", "b", "c"}, user_roles={"c"})
    assert got.tokens[0] == 100  # token limits: only the granting role c
    assert got.cost == (Decimal(2), Decimal(10), UC, UC)  # cost: a and b, though not granting
    # Field-wise maximum; an unset field is unlimited.
    assert limits_of({"a": roles["a"], "d": {"costLimit": {"day": 1}}}, {"a", "d"}).cost == (
        UC,
        Decimal(10),
        UC,
        UC,
    )


def test_cost_limit_is_the_same_for_every_deployment() -> None:
    p = policy({"a": {"costLimit": {"day": "3"}}})
    assert (
        p.limits(frozenset({"a"}), "m1", None).cost == p.limits(frozenset({"a"}), "m2", None).cost
    )


def test_cost_default_fallback() -> None:
    roles = {
        "default": {"costLimit": {"day": "100.00"}},
        "plain": {},
        "spender": {"costLimit": {"day": "1.5"}},
    }
    assert limits_of(roles, {"plain"}).cost == (UC, Decimal("100.00"), UC, UC)
    assert limits_of(roles, set()).cost == (UC, Decimal("100.00"), UC, UC)
    # A role with its own costLimit: the default is not consulted.
    assert limits_of(roles, {"plain", "spender"}).cost == (UC, Decimal("1.5"), UC, UC)
    # No costLimit anywhere: unlimited.
    assert limits_of({"plain": {}}, {"plain"}).cost == (UC, UC, UC, UC)
    assert limits_of({"default": {}}, {"default"}).cost == (UC, UC, UC, UC)


def test_empty_cost_limit_is_unlimited() -> None:
    roles = {
        "a": {"costLimit": {}},
        "b": {"costLimit": {"day": 1}},
        "default": {"costLimit": {"day": 2}},
    }
    assert limits_of(roles, {"a", "b"}).cost == (UC, UC, UC, UC)


def test_unlimited_property() -> None:
    assert NO_LIMITS.unlimited
    assert not limits_of({"r": {"limits": {"model": {"requestDay": 5}}}}, {"r"}).unlimited
    assert not limits_of({"r": {"costLimit": {"month": 5}}}, {"r"}).unlimited


def test_results_are_cached_per_role_set_deployment_and_user_roles() -> None:
    p = policy(
        {
            "role1": {"limits": {"model": {"minute": 100}}},
            "role2": {"limits": {"model": {"minute": 200}}},
        }
    )
    both = frozenset({"role1", "role2"})
    first = p.limits(both, "model", frozenset({"role1"}))
    assert p.limits(both, "model", frozenset({"role1"})) is first
    # A different userRoles set is a different answer, not the cached one.
    assert p.limits(both, "model", frozenset({"role2"})).tokens[0] == 200
    assert p.limits(both, "model", None).tokens[0] == 200
    assert p.limits(both, "model", frozenset({"role1"})).tokens[0] == 100


# --- property: the rule of spec 5.4, computed independently ------------------------------

ROLE_NAMES = ("default", "r1", "r2", "r3", "r4")
FIELDS = ("minute", "day", "week", "month", "requestHour", "requestDay")
entries = st.dictionaries(st.sampled_from(FIELDS), st.integers(-2, 10**6), max_size=6)
role_configs = st.fixed_dictionaries(
    {},
    optional={
        "limits": st.dictionaries(st.sampled_from(("model", "other")), entries, max_size=2),
        "costLimit": st.dictionaries(
            st.sampled_from(("minute", "day", "week", "month")),
            st.decimals(0, 10**6, places=3),
            max_size=4,
        ),
    },
)


@settings(max_examples=150, deadline=None)
@given(
    roles=st.dictionaries(st.sampled_from(ROLE_NAMES), role_configs, max_size=5),
    caller=st.frozensets(st.sampled_from((*ROLE_NAMES, "ghost")), max_size=4),
    user_roles=st.none() | st.frozensets(st.sampled_from((*ROLE_NAMES, "ghost")), max_size=4),
)
def test_matches_the_spec_rule(
    roles: dict[str, dict[str, Any]],
    caller: frozenset[str],
    user_roles: frozenset[str] | None,
) -> None:
    got = policy(roles).limits(caller, "model", user_roles)

    candidates = caller if user_roles is None else caller & user_roles
    found = [
        roles[r]["limits"]["model"]
        for r in candidates
        if r in roles and "model" in roles[r].get("limits", {})
    ]
    if not found:
        fallback = roles.get("default", {}).get("limits", {}).get("model")
        found = [fallback if fallback is not None else {}]
    expected = tuple(max(entry.get(f, U) for entry in found) for f in FIELDS)
    assert (*got.tokens, *got.requests) == expected

    costs = [roles[r]["costLimit"] for r in caller if r in roles and "costLimit" in roles[r]]
    if not costs:
        costs = [roles.get("default", {}).get("costLimit", {})]
    expected_cost = tuple(max(Decimal(c.get(w, UC)) for c in costs) for w in COST_WINDOWS)
    assert got.cost == expected_cost
    assert got.positive == all(v > 0 for v in expected)
