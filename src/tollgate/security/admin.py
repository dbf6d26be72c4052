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
from tollgate.settings import AdminRuleSetting, Settings

Matcher = Callable[[str], bool]


@dataclass(frozen=True, slots=True)
class AdminRule:
    source: str
    matchers: tuple[Matcher, ...]

    def matches(self, roles: Iterable[str]) -> bool:
        if self.source != "roles":
            return False  # a JWT claim: an API key has none
        return any(match(role) for role in roles for match in self.matchers)

    @classmethod
    def of(cls, setting: AdminRuleSetting) -> AdminRule:
        return cls(setting.source, tuple(_matcher(setting.function, t) for t in setting.targets))


def _matcher(function: str, target: str) -> Matcher:
    if function == "EQUAL":
        return target.__eq__
    if function == "CONTAIN":
        return lambda value: target in value
    pattern = re.compile(target)  # checked by the settings: it compiles
    return lambda value: pattern.fullmatch(value) is not None


class AdminRules:
    """The rules of the settings; `allows(principal)` is the check of every admin endpoint."""

    __slots__ = ("rules",)

    def __init__(self, rules: Iterable[AdminRule]) -> None:
        self.rules = tuple(rules)

    @classmethod
    def from_settings(cls, settings: Settings | Mapping[str, Any]) -> AdminRules:
        """The rules `load_settings` parsed (`Settings.admin_rules`).

        A mapping is the merged settings tree (`settings.raw`) of a caller written before the
        settings were one model: it is validated as settings first (raising `SettingsError`).
        """
        if not isinstance(settings, Settings):
            from pydantic import ValidationError

            from tollgate.settings import SettingsError, _problem

            try:
                settings = Settings.model_validate(settings)
            except ValidationError as exc:
                raise SettingsError("\n".join(_problem(e) for e in exc.errors())) from None
        return cls(AdminRule.of(rule) for rule in settings.admin_rules)

    def allows(self, principal: Principal) -> bool:
        if not self.rules or principal.source_deployment is not None:
            return False
        return all(rule.matches(principal.roles) for rule in self.rules)
