"""The `aidial.config.json` schema (compatibility C4), validated with pydantic.

Field names are snake_case here; every field also accepts DIAL's camelCase spelling. Unknown
fields are kept (DIAL grew many over its versions) so that a newer file still loads.
Integers may be given as numeric strings, as DIAL documents (`"minute": "100000"`).
"""

from __future__ import annotations

import ipaddress
import re
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AliasChoices,
    AliasGenerator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel, to_snake

from tollgate.config.java_regex import JavaRegexError, compile_java
from tollgate.config.key_names import check_name

UNLIMITED = 9223372036854775807  # Java's Long.MAX_VALUE: DIAL's "no limit" (compatibility C4)
UNLIMITED_COST = Decimal(UNLIMITED)


def _both_spellings(name: str) -> AliasChoices:
    return AliasChoices(to_camel(name), name)


class DialModel(BaseModel):
    """Base of every config object: camelCase or snake_case, unknown fields kept, immutable."""

    model_config = ConfigDict(
        alias_generator=AliasGenerator(validation_alias=_both_spellings),
        populate_by_name=True,
        extra="allow",
        frozen=True,
    )


def _null_is_zero(value: Any) -> Any:
    # DIAL binds JSON null on a primitive long to 0: the limit is non-positive (compatibility C4).
    return 0 if value is None else value


def _within_long(value: int) -> int:
    # DIAL reads limits as Java longs: a larger number stops its config load; it must not reach
    # the ledgers (whose counts stay within that range).
    if not -UNLIMITED - 1 <= value <= UNLIMITED:
        raise ValueError(
            f"limit {value} is outside Java's long range (largest {UNLIMITED}, which means no "
            "limit)"
        )
    return value


LimitValue = Annotated[int, BeforeValidator(_null_is_zero), AfterValidator(_within_long)]


def _decimal_text(value: Any) -> Any:
    if value is None or isinstance(value, dict):
        return value  # newer DIAL (>= 0.49) allows decision-tree rates; kept as given
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError("Expected a JSON string")
    try:
        number = Decimal(str(value))
    except InvalidOperation as exc:
        raise ValueError("Expected a JSON string with a valid double") from exc
    if not number.is_finite():
        raise ValueError("Expected a JSON string with a valid double")
    return str(value)


PriceRate = Annotated[str | dict[str, Any] | None, BeforeValidator(_decimal_text)]


# Newest DIAL's typed interfaces (compatibility C75): the API families a deployment serves.
CHAT_COMPLETIONS = "openaiChatCompletions"  # chat/completions and completions
EMBEDDINGS = "openaiEmbeddings"
RESPONSES = "openaiResponses"
ANTHROPIC_MESSAGES = "anthropicMessages"
INTERFACE_TYPES = (CHAT_COMPLETIONS, EMBEDDINGS, RESPONSES, ANTHROPIC_MESSAGES)
# DIAL's enum also binds the snake-case names.
INTERFACE_ALIASES = {to_snake(name): name for name in INTERFACE_TYPES}


def _interface_names(value: Any) -> Any:
    if isinstance(value, dict):
        return {INTERFACE_ALIASES.get(name, name): entry for name, entry in value.items()}
    return value


class UpstreamInterface(DialModel):
    """One upstream's override for one interface (compatibility C75)."""

    endpoint: str | None = None
    key: str | None = Field(default=None, repr=False)
    extra_data: Any = None
    secret_extra_data: Any = Field(default=None, repr=False)


class Upstream(DialModel):
    endpoint: str | None = None
    key: str | None = Field(default=None, repr=False)
    extra_data: Any = None
    weight: int = 1
    tier: int = 0
    id: str | None = None
    base_url: str | None = None
    responses_endpoint: str | None = None
    interfaces: Annotated[dict[str, UpstreamInterface], BeforeValidator(_interface_names)] = Field(
        default_factory=dict
    )


class Features(DialModel):
    """Deployment feature flags; `None` means "not set" so assistants inherit (compatibility C5)."""

    rate_endpoint: str | None = None
    tokenize_endpoint: str | None = None
    truncate_prompt_endpoint: str | None = None
    configuration_endpoint: str | None = None
    system_prompt_supported: bool | None = None
    tools_supported: bool | None = None
    seed_supported: bool | None = None
    url_attachments_supported: bool | None = None
    folder_attachments_supported: bool | None = None
    allow_resume: bool | None = None
    accessible_by_per_request_key: bool | None = None


class TokenLimits(DialModel):
    """Model context limits: advertised in listings only, never enforced (compatibility C4)."""

    max_total_tokens: int | None = None
    max_prompt_tokens: int | None = None
    max_completion_tokens: int | None = None


class Pricing(DialModel):
    unit: str | None = None
    prompt: PriceRate = None
    completion: PriceRate = None
    cache_read: PriceRate = None
    cache_write: PriceRate = None


def _absolute(value: str | None, field: str) -> str | None:
    # DIAL would only fail at call time; a gateway should say so when the file is loaded.
    if value is not None and not re.match(r"https?://[^/?#]+", value, re.IGNORECASE):
        raise ValueError(f"{field} must be an absolute http(s) URL: {value}")
    return value


class Interface(DialModel):
    """How a deployment serves one API family (`interfaces.<type>`, compatibility C75)."""

    base_url: str | None = None
    mode: str = "passthrough"
    translator: Any = None
    default_headers: dict[str, str] = Field(default_factory=dict)
    defaults: dict[str, Any] | None = None
    features: Features | None = None
    override_paths: dict[str, str] = Field(default_factory=dict)

    @field_validator("base_url")
    @classmethod
    def _absolute_base(cls, value: str | None) -> str | None:
        checked = _absolute(value, "base_url")
        return None if checked is None else checked.rstrip("/")


class Deployable(DialModel):
    """Fields shared by models, applications, assistants, addons and interceptors."""

    endpoint: str | None = None
    display_name: Any = None
    display_version: str | None = None
    icon_url: str | None = None
    description: str | None = None
    reference: str | None = None
    user_roles: list[str] | None = None
    forward_auth_token: bool = False
    features: Features | None = None
    input_attachment_types: list[str] | None = None
    max_input_attachments: int | None = None
    defaults: dict[str, Any] = Field(default_factory=dict)
    interceptors: list[str] = Field(default_factory=list)
    description_keywords: list[str] = Field(default_factory=list)
    max_retry_attempts: int | None = None  # upstream attempts per call, the first included
    # Tollgate extensions (DIAL has no per-deployment timeouts): milliseconds to connect to the
    # endpoint and that it may stay silent while answering; unset: `upstream.connectTimeout` /
    # `upstream.readTimeout` of the static settings.
    connect_timeout: int | None = Field(default=None, gt=0)
    read_timeout: int | None = Field(default=None, gt=0)
    # Newest DIAL (compatibility C75): headers added to every upstream request the client did
    # not send, the API families served (`interfaces`) and their legacy fields.
    default_headers: dict[str, str] = Field(default_factory=dict)
    base_url: str | None = None
    responses_endpoint: str | None = None
    interfaces: Annotated[dict[str, Interface], BeforeValidator(_interface_names)] = Field(
        default_factory=dict
    )

    @field_validator("endpoint")
    @classmethod
    def _absolute_url(cls, value: str | None) -> str | None:
        return _absolute(value, "endpoint")

    @field_validator("responses_endpoint")
    @classmethod
    def _absolute_responses(cls, value: str | None) -> str | None:
        return _absolute(value, "responsesEndpoint")

    @field_validator("base_url")
    @classmethod
    def _absolute_base(cls, value: str | None) -> str | None:
        checked = _absolute(value, "baseUrl")
        return None if checked is None else checked.rstrip("/")


class Model(Deployable):
    type: Literal["chat", "completion", "embedding"] = "chat"
    upstreams: list[Upstream] = Field(default_factory=list)
    override_name: str | None = None
    tokenizer_model: str | None = None
    limits: TokenLimits | None = None
    pricing: Pricing | None = None
    lifecycle_status: str | None = None
    # Tollgate extension: a streamed chat or completion call asks the upstream for usage
    # (`stream_options.include_usage`) and hides it from a client that did not ask
    # (compatibility C70). `false` for an upstream that refuses the option.
    include_stream_usage: bool = True

    @field_validator("type", mode="before")
    @classmethod
    def _type_any_case(cls, value: Any) -> Any:
        # DIAL's ModelType binds case-insensitively.
        return value.lower() if isinstance(value, str) else value


class Application(Deployable):
    pass


class Addon(Deployable):
    token: str | None = Field(default=None, repr=False)


class Assistant(Deployable):
    prompt: str | None = None
    addons: list[str] = Field(default_factory=list)


class AssistantSection(DialModel):
    endpoint: str | None = None
    features: Features | None = None
    assistants: dict[str, Assistant] = Field(default_factory=dict)


class Interceptor(Deployable):
    pass


class RouteResponse(DialModel):
    status: int = Field(default=200, ge=100, le=599)
    body: str = ""


class Route(DialModel):
    paths: list[str] = Field(default_factory=list)
    methods: list[str] = Field(default_factory=list)
    user_roles: list[str] | None = None
    rewrite_path: bool = False
    upstreams: list[Upstream] = Field(default_factory=list)
    response: RouteResponse | None = None
    order: int | None = None
    max_retry_attempts: int | None = None

    @field_validator("paths")
    @classmethod
    def _paths_compile(cls, paths: list[str]) -> list[str]:
        # DIAL's paths are Java regexes (compatibility C44): translated, and refused here when
        # invalid or Java-only, so a bad route stops the load instead of every call.
        for path in paths:
            try:
                compile_java(path)
            except JavaRegexError as exc:
                raise ValueError(str(exc)) from None
        return paths

    @field_validator("upstreams")
    @classmethod
    def _upstream_urls(cls, upstreams: list[Upstream]) -> list[Upstream]:
        # A route's upstream endpoint is the URL called, not a header value (compatibility C46).
        for upstream in upstreams:
            endpoint = upstream.endpoint
            if endpoint is None or not re.match(r"(https?|wss?)://[^/?#]+", endpoint, re.I):
                raise ValueError(f"route upstream endpoint must be an absolute URL: {endpoint}")
        return upstreams


def epoch_ms(value: Any) -> int | None:
    """An ISO 8601 date and time with its offset (`2027-01-31T00:00:00Z`), or epoch
    milliseconds (DIAL Admin's form), as epoch milliseconds; None for null."""
    from datetime import datetime

    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < 253402300800000:  # up to the year 9999
            raise ValueError(f"{value} is not a time in epoch milliseconds")
        return value
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            moment = None
        if moment is not None and moment.tzinfo is not None:
            return int(moment.timestamp() * 1000)
    raise ValueError(
        "expected an ISO 8601 date and time with its offset, such as 2027-01-31T00:00:00Z"
    )


def _validate_cidr(text: str) -> str:
    """DIAL's IP range rules and messages (compatibility C11)."""
    if "/" not in text:
        raise ValueError(f"Invalid CIDR: {text}")
    base, _, prefix = text.partition("/")
    try:
        address = ipaddress.ip_address(base)
    except ValueError as exc:
        raise ValueError(f"Invalid CIDR base address in '{text}': {exc}") from exc
    try:
        length = int(prefix)
    except ValueError as exc:
        raise ValueError(f"Invalid CIDR prefix in '{text}': {prefix}") from exc
    if not 0 <= length <= address.max_prefixlen:
        raise ValueError(
            f"Invalid prefix length {length} for {address.max_prefixlen}-bit address in '{text}'"
        )
    return text


class Key(DialModel):
    project: str | None = None
    role: str | None = None
    roles: list[str] = Field(default_factory=list)
    secured: bool = False
    allowed_ip_address_ranges: list[str] | None = None
    key: str | None = Field(default=None, repr=False)
    # Tollgate extension (compatibility C81): when the key stops working, ISO 8601 with its
    # offset or epoch milliseconds; kept as epoch milliseconds.
    expires_at: Annotated[int | None, BeforeValidator(lambda v: epoch_ms(v))] = None
    # Tollgate extension: a key for demonstrations and tests, whose strength `tollgate config
    # check` does not judge (docs/configuration.md). It authenticates like any other.
    demo: bool = False

    @field_validator("allowed_ip_address_ranges", mode="before")
    @classmethod
    def _ranges(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, list):
            raise ValueError("Expected a JSON array of client IP ranges")
        for item in value:
            if not isinstance(item, str):
                raise ValueError("Expected a JSON string of client IP range")
            _validate_cidr(item)
        return value

    @model_validator(mode="after")
    def _project_and_role(self) -> Key:
        # DIAL's key validation messages, verbatim (compatibility C9).
        if not self.project:
            raise ValueError("Project key is undefined")
        if not self.role and not any(self.roles):
            raise ValueError(
                f"Invalid key: at least one role must be assigned to the key {self.project}"
            )
        return self

    def merged_roles(self) -> tuple[str, ...]:
        """`roles` in order, then `role` (duplicates kept, as DIAL does)."""
        return (*self.roles, self.role) if self.role else tuple(self.roles)


# A `keys` entry's name: the secret, or `sha256:<64 hex digits>` (any case of the prefix).
KeyName = Annotated[str, AfterValidator(check_name)]


class Limit(DialModel):
    minute: LimitValue = UNLIMITED
    day: LimitValue = UNLIMITED
    week: LimitValue = UNLIMITED
    month: LimitValue = UNLIMITED
    request_hour: LimitValue = UNLIMITED
    request_day: LimitValue = UNLIMITED


class CostLimit(DialModel):
    minute: Decimal = UNLIMITED_COST
    day: Decimal = UNLIMITED_COST
    week: Decimal = UNLIMITED_COST
    month: Decimal = UNLIMITED_COST


# `roles.<r>.share.<TYPE>`: DIAL's resource types, matched by their upper-case names (newer
# DIAL's share limits; compatibility C87). DIAL ignores any other key without a word.
SHARE_TYPES = ("APPLICATION", "TOOL_SET", "CREDENTIALS", "SKILL", "CONVERSATION", "FILE", "PROMPT")


def _share_number(value: Any) -> Any:
    # DIAL: a number or a numeric string; null or absent is -1, the type's default.
    if value is None:
        return -1
    if isinstance(value, bool):
        raise ValueError("expected a whole number")
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise ValueError(f"expected a whole number, got {value!r}") from None
    return value


def _share_range(value: int) -> int:
    if value < -1 or value > 2147483647:
        raise ValueError(f"expected -1 (the type's default) or 0 to 2147483647, got {value}")
    return value


ShareNumber = Annotated[int, BeforeValidator(_share_number), AfterValidator(_share_range)]


class ShareLimit(DialModel):
    """One resource type's share limit; both DIAL spellings of each field are read."""

    max_accepted_users: ShareNumber = Field(
        -1, validation_alias=AliasChoices("max_accepted_users", "maxAcceptedUsers")
    )
    invitation_ttl: ShareNumber = Field(  # hours
        -1, validation_alias=AliasChoices("invitation_ttl", "invitationTtl")
    )


class Role(DialModel):
    limits: dict[str, Limit] = Field(default_factory=dict)
    cost_limit: CostLimit | None = None
    share: dict[str, ShareLimit] | None = None


WEEKDAYS = ("MONDAY", "TUESDAY", "WEDNESDAY", "THURSDAY", "FRIDAY", "SATURDAY", "SUNDAY")


class RateLimitSchedule(DialModel):
    timezone: str = "UTC"
    week_start_day: str = "MONDAY"
    reset_time: str = "00:00"

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"Unknown timezone: {value}") from exc
        return value

    @field_validator("week_start_day")
    @classmethod
    def _weekday(cls, value: str) -> str:
        upper = value.upper()
        match = next((day for day in WEEKDAYS if day.startswith(upper) and len(upper) >= 3), None)
        if match is None:
            raise ValueError(f"Invalid weekStartDay: {value}")
        return match

    @field_validator("reset_time")
    @classmethod
    def _reset(cls, value: str) -> str:
        if not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", value):
            raise ValueError(f"Invalid resetTime (expected HH:mm): {value}")
        return value


class Config(DialModel):
    """The whole dynamic settings document. Unknown top-level keys are ignored, as in DIAL."""

    model_config = ConfigDict(extra="ignore")

    routes: dict[str, Route] = Field(default_factory=dict)
    models: dict[str, Model] = Field(default_factory=dict)
    addons: dict[str, Addon] = Field(default_factory=dict)
    applications: dict[str, Application] = Field(default_factory=dict)
    assistant: AssistantSection = Field(default_factory=AssistantSection)
    keys: dict[KeyName, Key] = Field(default_factory=dict)
    roles: dict[str, Role] = Field(default_factory=dict)
    retriable_error_codes: list[int] = Field(default_factory=list)
    interceptors: dict[str, Interceptor] = Field(default_factory=dict)
    # Newer DIAL: interceptor names run before every deployment's own (compatibility C40).
    global_interceptors: list[str] = Field(default_factory=list)
    rate_limit_schedule: RateLimitSchedule = Field(default_factory=RateLimitSchedule)
