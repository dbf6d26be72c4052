"""An immutable, precomputed view of one config: what the request path reads (STYLE).

Building a snapshot does all the work that does not depend on a request: the key table, the
deployment lookup (with DIAL's precedence), each deployment's access set, its balancer (state
carried over from the previous snapshot's), and listing payloads. A reload builds a new
snapshot and swaps one reference.
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from yarl import URL

from tollgate import listings
from tollgate.config import chunked
from tollgate.config.schema import Application, Assistant, Config, Deployable, Model
from tollgate.limits.cost import Prices
from tollgate.limits.policy import LimitPolicy
from tollgate.limits.windows import Clock, Schedule
from tollgate.routing import interfaces, routes
from tollgate.routing.balancer import (
    MAX_ATTEMPTS,
    Balancers,
    DeploymentBalancer,
    UpstreamSet,
    retriable_statuses,
)
from tollgate.routing.interfaces import Target
from tollgate.routing.routes import EMPTY as EMPTY_ROUTES
from tollgate.routing.routes import RouteTable
from tollgate.security.ip_ranges import IpRanges
from tollgate.security.keys import (
    KeyTable,
    ProjectKey,
    digest_of_name,
    fingerprint_of_digest,
)
from tollgate.security.principal import Principal

APPLICATION_ATTEMPTS = 1  # an application's default `maxRetryAttempts` (compatibility C35)
BASE_ASSISTANT = "assistant"  # synthesised when `assistant.endpoint` is set (compatibility C5)


class Kind(enum.Enum):
    MODEL = "model"
    APPLICATION = "application"
    ASSISTANT = "assistant"
    INTERCEPTOR = "interceptor"  # in `Snapshot.interceptors` only: never resolved by id


def may_use(user_roles: frozenset[str] | None, role_set: frozenset[str]) -> bool:
    """DIAL's access rule (compatibility C12).

    `userRoles` absent or null admits everyone; `[]` admits nobody; otherwise one shared role.
    """
    if user_roles is None:
        return True
    return not user_roles.isdisjoint(role_set)


@dataclass(frozen=True, slots=True)
class Deployment:
    """A callable deployment (model, application or assistant), ready for the request path."""

    name: str
    kind: Kind
    endpoint: str | None
    endpoint_url: URL | None  # parsed once: the request path reuses it
    user_roles: frozenset[str] | None
    forward_auth_token: bool
    accessible_by_per_request_key: bool
    defaults: Mapping[str, Any]
    override_name: str | None
    # Attempts per call: `maxRetryAttempts`, else 5, or 1 for applications (compatibility C35).
    max_attempts: int
    # Tollgate's `connectTimeout`, `readTimeout` (ms); None when neither is set (the settings').
    timeouts_ms: tuple[int | None, int | None] | None
    spec: Deployable
    prices: Prices | None  # models with `pricing` only
    # `globalInterceptors` then the deployment's `interceptors`: the chain a call runs through
    # first (compatibility C40). Empty for nearly every deployment: the request path tests it once.
    interceptors: tuple[str, ...] = ()
    # A model whose streamed calls ask the upstream for usage (`includeStreamUsage`,
    # compatibility C70).
    asks_stream_usage: bool = False
    # The API families served through `interfaces` or `responsesEndpoint`, by interface
    # (compatibility C75); the deployments family on the legacy `endpoint` is not in it.
    targets: Mapping[str, Target] = field(default_factory=dict)
    # `defaultHeaders`: added to the upstream request when the client did not send them.
    default_headers: tuple[tuple[str, str], ...] = ()
    # A model upstream without an `id`: the Responses API cannot serve it (compatibility C76).
    anonymous_upstreams: bool = False
    # Endpoint URLs with a client query string appended, by query: clients repeat the same few
    # (`api-version=...`), so each is parsed once. Bounded in forward.upstream_url.
    urls_by_query: dict[str, URL] = field(default_factory=dict, compare=False, repr=False)
    # A custom application's own balancer (compatibility C92): it is in no snapshot's
    # `balancers`. None for every deployment of the config.
    balancer: DeploymentBalancer | None = field(default=None, compare=False, repr=False)


def _deployment(
    name: str,
    kind: Kind,
    spec: Deployable,
    endpoint: str | None,
    global_interceptors: tuple[str, ...] = (),
) -> Deployment:
    features = spec.features
    accessible = features is None or features.accessible_by_per_request_key is not False
    model = spec if isinstance(spec, Model) else None
    return Deployment(
        name=name,
        kind=kind,
        endpoint=endpoint,
        endpoint_url=URL(endpoint) if endpoint else None,
        user_roles=None if spec.user_roles is None else frozenset(spec.user_roles),
        forward_auth_token=spec.forward_auth_token,
        accessible_by_per_request_key=accessible,
        defaults=spec.defaults,
        override_name=model.override_name if model else None,
        max_attempts=(
            spec.max_retry_attempts
            if spec.max_retry_attempts is not None
            # Newer DIAL: one attempt for an application (an agent may act on a call, so a
            # call is not repeated unless its config asks for it), five for the rest.
            else APPLICATION_ATTEMPTS
            if kind is Kind.APPLICATION
            else MAX_ATTEMPTS
        ),
        timeouts_ms=(
            None
            if spec.connect_timeout is None and spec.read_timeout is None
            else (spec.connect_timeout, spec.read_timeout)
        ),
        spec=spec,
        prices=Prices.of(model.pricing) if model else None,
        interceptors=(*global_interceptors, *spec.interceptors),
        asks_stream_usage=(
            model is not None
            and kind is Kind.MODEL
            and model.include_stream_usage
            and model.type != "embedding"
        ),
        targets=interfaces.targets(spec),
        default_headers=tuple(spec.default_headers.items()),
        anonymous_upstreams=model is not None and any(u.id is None for u in model.upstreams),
    )


def custom_application(
    name: str, spec: Application, global_interceptors: tuple[str, ...]
) -> Deployment:
    """A custom application stored as a resource, callable as `name` (its resource URL,
    `applications/<bucket>/<path>`; compatibility C92): a config application's deployment with
    a balancer of its own, and at most `MAX_ATTEMPTS` attempts per call whatever its
    `maxRetryAttempts` says (its author is any caller, not the operator)."""
    deployment = _deployment(name, Kind.APPLICATION, spec, spec.endpoint, global_interceptors)
    return replace(
        deployment,
        max_attempts=min(deployment.max_attempts, MAX_ATTEMPTS),
        balancer=DeploymentBalancer(name, UpstreamSet.of(spec, spec.endpoint)),
    )


def _key_table(config: Config) -> KeyTable:
    """Digest → key. Keys with the same project, roles or IP ranges share one object of each
    (a large config has many keys and few distinct role sets): about a third less memory per
    key with 100,000 keys (bench/RESULTS.md, "Reloads")."""
    entries: dict[bytes, ProjectKey] = {}
    projects: dict[str, str] = {}
    role_sets: dict[tuple[str, ...], tuple[tuple[str, ...], frozenset[str]]] = {}
    ip_ranges: dict[tuple[str, ...], IpRanges] = {}
    for name, key in config.keys.items():
        digest = digest_of_name(name)
        merged = key.merged_roles()
        shared = role_sets.get(merged)
        if shared is None:
            shared = role_sets[merged] = (merged, frozenset(merged))
        project = key.project or ""
        project = projects.setdefault(project, project)
        principal = Principal(
            project=project,
            roles=shared[0],
            role_set=shared[1],
            key_fingerprint=fingerprint_of_digest(digest),
            secured=key.secured,
        )
        ranges = key.allowed_ip_address_ranges
        allowed_ips = None
        if ranges is not None:
            allowed_ips = ip_ranges.get(tuple(ranges))
            if allowed_ips is None:
                allowed_ips = ip_ranges[tuple(ranges)] = IpRanges(ranges)
        # The later of two names wins.
        entries[digest] = ProjectKey(principal, allowed_ips, key.expires_at)
    return KeyTable(entries)


@dataclass(frozen=True, slots=True)
class Listing:
    """One listing's items with their access sets; bodies cached per caller role set."""

    items: Mapping[str, tuple[frozenset[str] | None, dict[str, Any]]]
    _bodies: dict[frozenset[str], bytes] = field(default_factory=dict)

    def visible(self, role_set: frozenset[str]) -> list[dict[str, Any]]:
        return [item for roles, item in self.items.values() if may_use(roles, role_set)]

    def body(
        self, role_set: frozenset[str], render: Callable[[list[dict[str, Any]]], bytes]
    ) -> bytes:
        body = self._bodies.get(role_set)
        if body is None:
            body = render(self.visible(role_set))
            if len(self._bodies) < 4096:  # role sets come from config; bound it all the same
                self._bodies[role_set] = body
        return body

    def find(self, name: str) -> tuple[frozenset[str] | None, dict[str, Any]] | None:
        return self.items.get(name)


def _listing(entries: Iterable[tuple[str, Deployable, dict[str, Any]]]) -> Listing:
    return Listing(
        {
            name: (None if spec.user_roles is None else frozenset(spec.user_roles), item)
            for name, spec, item in entries
        }
    )


@dataclass(frozen=True, slots=True)
class SnapshotParts:
    """Everything of a snapshot but its balancers and route table: what is expensive to build
    (keys, deployments, listings, limits), made without touching state that calls share."""

    config: Config
    digest: str
    keys: KeyTable
    deployments: Mapping[str, Deployment]
    models: Listing
    deployments_listing: Listing
    applications: Listing
    assistants: Listing
    addons: Listing
    limit_policy: LimitPolicy
    clock: Clock  # day/week/month periods of `rateLimitSchedule`
    retriable: frozenset[int]  # 429, 502, 503, 504 and `retriableErrorCodes` (compatibility C35)
    # Interceptors by name, reached only through a deployment's chain (compatibility C40).
    interceptors: Mapping[str, Deployment]
    # What `Balancers.sync` is given: each deployment's and each route's upstreams.
    upstream_sets: Mapping[str, UpstreamSet]
    # Roles a key may hold: defined in `roles` or listed in a `userRoles` (`known_roles`).
    role_names: frozenset[str]

    def finish(self, balancers: Balancers | None = None) -> Snapshot:
        """The snapshot, with balancers taken from the registry `balancers`.

        `Balancers.sync` mutates the registry (and reads the health of the balancers calls are
        using), so this runs where the calls run, on the event loop, once per snapshot; it is
        the last step, so a config that fails to build leaves the registry alone.
        """
        synced = (Balancers() if balancers is None else balancers).sync(self.upstream_sets)
        return Snapshot(
            **{part.name: getattr(self, part.name) for part in fields(SnapshotParts)},
            balancers=synced,
            routes=routes.build_table(self.config.routes, synced),
        )


@dataclass(frozen=True, slots=True)
class Snapshot(SnapshotParts):
    """The parts, with the balancers and the route table that calls share."""

    # One per deployment, by name; state carried over from the last snapshot (compatibility C32).
    balancers: Mapping[str, DeploymentBalancer]
    # `routes`, compiled in the order they are tried (compatibility C44); falsy when none.
    routes: RouteTable = EMPTY_ROUTES

    def resolve(self, deployment_id: str) -> Deployment | None:
        return self.deployments.get(deployment_id)


def known_roles(snapshot: Snapshot) -> frozenset[str]:
    """Roles a key may hold: those `roles` defines and those a `userRoles` lists (what
    `tollgate config check` accepts without a warning)."""
    return snapshot.role_names


def _role_names(config: Config, deployments: Iterable[Deployment]) -> frozenset[str]:
    names = set(config.roles)
    for deployment in deployments:
        if deployment.user_roles is not None:
            names |= deployment.user_roles
    for route in config.routes.values():
        names |= set(route.user_roles or ())
    return frozenset(names)


def take_apart(snapshot: Snapshot) -> None:
    """Release a snapshot that nobody uses any more in small steps, in a worker thread: its key
    table and config hold hundreds of thousands of objects, and releasing them at once is one
    long hold of the GIL (see `config.chunked`)."""
    snapshot.keys.take_apart()
    config = snapshot.config
    # Held by the snapshot, its limit policy and `config` here (getrefcount's argument aside):
    # if anything else still has the config, it is left whole.
    if sys.getrefcount(config) - 1 <= 3:
        chunked.dispose([config.keys, config.models, config.roles], owned=True)


def build_snapshot(
    config: Config, digest: str = "", balancers: Balancers | None = None
) -> Snapshot:
    """The snapshot of `config`; `balancers` is the registry whose state outlives snapshots.

    Without one (config checks, tests), the snapshot's balancers start afresh. A reload does
    the same in two steps: `prepare_snapshot` in a worker thread, `finish` on the event loop.
    """
    return prepare_snapshot(config, digest).finish(balancers)


def prepare_snapshot(config: Config, digest: str = "") -> SnapshotParts:
    """The expensive part of `build_snapshot`: pure, so it may run in a worker thread."""
    section = config.assistant
    assistants: dict[str, Assistant] = dict(section.assistants)
    deployments: dict[str, Deployment] = {}
    chain = tuple(config.global_interceptors)
    # DIAL's lookup precedence: applications, then models, then assistants (compatibility C5).
    for name, assistant in assistants.items():
        endpoint = assistant.endpoint or section.endpoint
        # Unset features come from `assistant.features` (compatibility C5), as the listing shows.
        inherited = listings.inherit_features(assistant.features, section.features)
        spec = assistant.model_copy(update={"features": inherited})
        deployments[name] = _deployment(name, Kind.ASSISTANT, spec, endpoint, chain)
    if section.endpoint and BASE_ASSISTANT not in assistants:
        base = Assistant(endpoint=section.endpoint, features=section.features)
        deployments[BASE_ASSISTANT] = _deployment(
            BASE_ASSISTANT, Kind.ASSISTANT, base, section.endpoint, chain
        )
    for name, model in config.models.items():
        deployments[name] = _deployment(name, Kind.MODEL, model, model.endpoint, chain)
    for name, application in config.applications.items():
        deployments[name] = _deployment(
            name, Kind.APPLICATION, application, application.endpoint, chain
        )
    interceptors = {
        name: _deployment(name, Kind.INTERCEPTOR, interceptor, interceptor.endpoint)
        for name, interceptor in config.interceptors.items()
    }
    return SnapshotParts(
        config=config,
        digest=digest,
        keys=_key_table(config),
        deployments=deployments,
        models=_listing((n, m, listings.model_item(n, m)) for n, m in config.models.items()),
        deployments_listing=_listing(
            (n, m, listings.deployment_item(n, m)) for n, m in config.models.items()
        ),
        applications=_listing(
            (n, a, listings.application_item(n, a)) for n, a in config.applications.items()
        ),
        assistants=_listing(
            (n, a, listings.assistant_item(n, a, section.features))
            for n, a in assistants.items()
            if n != BASE_ASSISTANT
        ),
        addons=_listing((n, a, listings.addon_item(n, a)) for n, a in config.addons.items()),
        limit_policy=LimitPolicy(config),
        clock=Clock(Schedule.of(config.rate_limit_schedule)),
        retriable=retriable_statuses(config.retriable_error_codes),
        interceptors=interceptors,
        upstream_sets={
            **{name: UpstreamSet.of(d.spec, d.endpoint) for name, d in deployments.items()},
            # Routes have entries of their own, so their upstreams' health survives
            # reloads too (compatibility C32).
            **routes.upstream_sets(config.routes),
        },
        role_names=_role_names(config, (*deployments.values(), *interceptors.values())),
    )
