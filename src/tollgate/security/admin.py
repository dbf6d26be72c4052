"""Who is an administrator: the static setting `access.admin.rules` (compatibility C52).

DIAL evaluates each rule against a JWT claim named by its `source`; every rule must match, and a
rule matches when one of the caller's values does for one of its `targets`: `EQUAL` (the same
text), `CONTAIN` (the value contains the target) or `REGEX` (the value matches the whole
pattern). Tollgate has no identity provider (compatibility C7): a rule whose source is `roles` is
evaluated against the API key's roles, so a key can be an administrator; a rule on any other
claim never matches an API key.

Two choices of the newest DIAL, which protect the admin surface:

- no rules (`[]` or absent) means nobody is an administrator there (`hasExplicitAdminAccess`),
  not everyone, as its older `RuleMatcher` made it;
- a per-request key, given to an application for one call, is never an administrator.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tollgate.security.principal import Principal
from tollgate.settings import SettingsError

Matcher = Callable[[str], bool]
FUNCTIONS = ("EQUAL", "CONTAIN", "REGEX")


@dataclass(frozen=True, slots=True)
class AdminRule:
    source: str
    matchers: tuple[Matcher, ...]

    def matches(self, roles: Iterable[str]) -> bool:
        if self.source != "roles":
            return False  # a JWT claim: an API key has none
        return any(match(role) for role in roles for match in self.matchers)


def _matcher(function: str, target: str) -> Matcher:
    if function == "EQUAL":
        return target.__eq__
    if function == "CONTAIN":
        return lambda value: target in value
    pattern = re.compile(target)
    return lambda value: pattern.fullmatch(value) is not None


class AdminRules:
    """The parsed rules; `allows(principal)` is the check of every admin endpoint."""

    __slots__ = ("rules",)

    def __init__(self, rules: Iterable[AdminRule]) -> None:
        self.rules = tuple(rules)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> AdminRules:
        """From the merged static settings; raises `SettingsError` on a malformed rule."""
        node: Any = settings.get("access")
        node = node.get("admin") if isinstance(node, Mapping) else None
        raw = node.get("rules") if isinstance(node, Mapping) else None
        if raw is None:
            return cls(())
        if not isinstance(raw, list):
            raise SettingsError("setting access.admin.rules: expected a list of rules")
        rules = []
        for index, item in enumerate(raw):
            where = f"setting access.admin.rules[{index}]"
            if not isinstance(item, Mapping):
                raise SettingsError(f"{where}: expected an object")
            source, function, targets = (
                item.get("source"),
                item.get("function"),
                item.get("targets"),
            )
            if not isinstance(source, str) or not source:
                raise SettingsError(f"{where}.source: expected a claim name such as roles")
            if not isinstance(function, str) or function.upper() not in FUNCTIONS:
                raise SettingsError(f"{where}.function: expected EQUAL, CONTAIN or REGEX")
            if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
                raise SettingsError(f"{where}.targets: expected a list of strings")
            try:
                matchers = tuple(_matcher(function.upper(), target) for target in targets)
            except re.error as exc:
                raise SettingsError(f"{where}.targets: invalid regular expression: {exc}") from exc
            rules.append(AdminRule(source, matchers))
        return cls(rules)

    def allows(self, principal: Principal) -> bool:
        if not self.rules or principal.source_deployment is not None:
            return False
        return all(rule.matches(principal.roles) for rule in self.rules)
