"""Loading DIAL config files: merge, validation and the messages operators see (spec 1-2)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tollgate.config.load import ConfigError, load_config
from tollgate.config.merge import deep_merge
from tollgate.config.schema import UNLIMITED
from tollgate.security.keys import digest_of
from tollgate.snapshot import build_snapshot, may_use


def write(tmp_path: Path, name: str, value: Any) -> str:
    path = tmp_path / name
    path.write_text(value if isinstance(value, str) else json.dumps(value, indent=2))
    return str(path)


def problems(paths: list[str]) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(paths)
    return "\n".join(caught.value.problems)


class TestMerge:
    def test_objects_merge_arrays_concatenate_scalars_win(self) -> None:
        base = {"a": {"x": 1, "list": [1]}, "s": "old"}
        update = {"a": {"y": 2, "list": [2]}, "s": "new"}
        assert deep_merge(base, update, overwrite_arrays=False) == {
            "a": {"x": 1, "y": 2, "list": [1, 2]},
            "s": "new",
        }
        assert deep_merge(base, update, overwrite_arrays=True)["a"]["list"] == [2]

    @given(
        st.recursive(
            st.integers() | st.text(max_size=3),
            lambda c: st.dictionaries(st.text(max_size=2), c, max_size=3),
            max_leaves=8,
        )
    )
    def test_merging_into_nothing_is_identity(self, tree: Any) -> None:
        assert deep_merge({}, {"k": tree}, overwrite_arrays=False) == {"k": tree}

    def test_files_merge_in_order(self, tmp_path: Path) -> None:
        first = write(
            tmp_path,
            "a.json",
            {
                "models": {"m": {"endpoint": "http://a/x", "userRoles": ["r1"]}},
                "keys": {"k": {"project": "p"}},
            },
        )
        second = write(
            tmp_path,
            "b.json",
            {
                "models": {"m": {"userRoles": ["r2"], "displayName": "M"}},
                "keys": {"k": {"role": "r1"}},
            },
        )
        config = load_config([first, second]).config
        assert config.models["m"].user_roles == ["r1", "r2"]
        assert config.models["m"].endpoint == "http://a/x"
        assert config.keys["k"].merged_roles() == ("r1",)


class TestValidation:
    def test_key_without_project(self, tmp_path: Path) -> None:
        path = write(tmp_path, "c.json", {"keys": {"secret-value-1": {"role": "r"}}})
        text = problems([path])
        fingerprint = digest_of("secret-value-1")[:4].hex()
        assert text == f'{path}: $.keys["sha256:{fingerprint}…"]: Project key is undefined'
        assert "secret-value-1" not in text  # a key's name is its secret

    def test_key_without_role(self, tmp_path: Path) -> None:
        path = write(
            tmp_path,
            "c.json",
            {"keys": {"s": {"project": "EPM"}, "t": {"project": "X", "roles": []}}},
        )
        text = problems([path])
        assert "Invalid key: at least one role must be assigned to the key EPM" in text
        assert "Invalid key: at least one role must be assigned to the key X" in text

    def test_the_file_that_wrote_the_problem_is_named(self, tmp_path: Path) -> None:
        good = write(tmp_path, "good.json", {"models": {"m": {"endpoint": "http://a/x"}}})
        bad = write(tmp_path, "bad.json", {"models": {"m": {"type": "painting"}}})
        text = problems([good, bad])
        assert text.startswith(f"{bad}: $.models.m.type: ")

    def test_syntax_error_names_line_and_column(self, tmp_path: Path) -> None:
        path = write(tmp_path, "c.json", '{\n  "models": {\n    "m": {,}\n  }\n}')
        assert problems([path]).startswith(f"{path}: line 3 column 11: invalid JSON")

    def test_missing_file(self, tmp_path: Path) -> None:
        missing = str(tmp_path / "nope.json")
        assert problems([missing]) == f"{missing}: File not found: {missing}"

    def test_top_level_must_be_an_object(self, tmp_path: Path) -> None:
        assert "top level must be a JSON object" in problems([write(tmp_path, "c.json", "[]")])

    @pytest.mark.parametrize(
        ("ranges", "message"),
        [
            (["10.0.0.1"], "Invalid CIDR: 10.0.0.1"),
            (["10.0.0.300/8"], "Invalid CIDR base address in '10.0.0.300/8'"),
            (["10.0.0.0/x"], "Invalid CIDR prefix in '10.0.0.0/x'"),
            (["10.0.0.0/33"], "Invalid prefix length 33 for 32-bit address in '10.0.0.0/33'"),
            ("10.0.0.0/8", "Expected a JSON array of client IP ranges"),
            ([7], "Expected a JSON string of client IP range"),
        ],
    )
    def test_ip_ranges(self, tmp_path: Path, ranges: Any, message: str) -> None:
        config = {"keys": {"k": {"project": "p", "role": "r", "allowedIpAddressRanges": ranges}}}
        assert message in problems([write(tmp_path, "c.json", config)])

    def test_pricing_must_be_decimal(self, tmp_path: Path) -> None:
        config = {"models": {"m": {"pricing": {"unit": "token", "prompt": "cheap"}}}}
        text = problems([write(tmp_path, "c.json", config)])
        assert "$.models.m.pricing.prompt: Expected a JSON string with a valid double" in text

    def test_every_problem_is_reported(self, tmp_path: Path) -> None:
        config = {"keys": {"a": {"role": "r"}}, "models": {"m": {"upstreams": "x"}}}
        text = problems([write(tmp_path, "c.json", config)])
        assert "Project key is undefined" in text and "$.models.m.upstreams" in text


class TestSchema:
    def test_numbers_as_strings_and_camel_or_snake_case(self, tmp_path: Path) -> None:
        config = {
            "models": {"m": {"type": "Chat", "user_roles": ["r"], "forward_auth_token": True}},
            "roles": {"r": {"limits": {"m": {"minute": "100000", "requestHour": 5}}}},
            "keys": {"k": {"project": "p", "role": "r"}},
            "rateLimitSchedule": {"timezone": "Europe/Berlin", "weekStartDay": "SUN"},
            "someFutureTopLevel": {"ignored": True},
        }
        loaded = load_config([write(tmp_path, "c.json", config)]).config
        limit = loaded.roles["r"].limits["m"]
        assert (limit.minute, limit.request_hour, limit.day) == (100000, 5, UNLIMITED)
        assert loaded.models["m"].type == "chat" and loaded.models["m"].forward_auth_token
        assert loaded.rate_limit_schedule.week_start_day == "SUNDAY"

    def test_dial_sample_shapes_load(self, tmp_path: Path) -> None:
        """The shapes of DIAL's docker-compose configs (spec proxy 1)."""
        config = {
            "routes": {},
            "models": {
                "gpt-4": {
                    "type": "chat",
                    "displayName": "GPT-4",
                    "endpoint": "http://adapter-openai:5000/openai/deployments/gpt-4/chat/completions",
                    "upstreams": [
                        {
                            "endpoint": "https://x.openai.azure.com/openai/deployments/gpt-4/chat/completions",
                            "key": "k",
                        }
                    ],
                },
            },
            "applications": {
                "echo": {"endpoint": "http://echo:5000/openai/deployments/echo/chat/completions"}
            },
            "addons": {"todo": {"endpoint": "http://todo:5000/.well-known/ai-plugin.json"}},
            "assistant": {
                "endpoint": "http://assistant:5000/openai/deployments/assistant/chat/completions",
                "assistants": {"todo-assistant": {"prompt": "p", "addons": ["todo"]}},
            },
            "keys": {"dial_api_key": {"project": "TEST-PROJECT", "role": "default"}},
            "roles": {"default": {"limits": {"gpt-4": {}, "echo": {}}}},
        }
        snapshot = build_snapshot(load_config([write(tmp_path, "c.json", config)]).config)
        assert snapshot.resolve("todo-assistant") is not None
        assert snapshot.resolve("assistant") is not None  # the synthetic base assistant
        assert snapshot.keys.lookup_digest(digest_of("dial_api_key")) is not None

    def test_lookup_precedence(self, tmp_path: Path) -> None:
        config = {
            "models": {"same": {"endpoint": "http://model/x"}},
            "applications": {"same": {"endpoint": "http://app/x"}},
        }
        snapshot = build_snapshot(load_config([write(tmp_path, "c.json", config)]).config)
        deployment = snapshot.resolve("same")
        assert deployment is not None and deployment.endpoint == "http://app/x"

    def test_sha256_named_keys(self, tmp_path: Path) -> None:
        name = "sha256:" + hashlib.sha256(b"the-secret").hexdigest().upper()
        config = {"keys": {name: {"project": "p", "role": "r"}}}
        snapshot = build_snapshot(load_config([write(tmp_path, "c.json", config)]).config)
        key = snapshot.keys.lookup_digest(digest_of("the-secret"))
        assert key is not None and key.principal.project == "p"
        assert key.principal.key_fingerprint == hashlib.sha256(b"the-secret").hexdigest()[:8]


@pytest.mark.parametrize(
    ("user_roles", "caller", "allowed"),
    [
        (None, [], True),
        (frozenset(), ["admin"], False),
        (frozenset({"role1"}), [], False),
        (frozenset({"role1", "role3"}), ["role2", "role3"], True),
        (frozenset({"Role1"}), ["role1"], False),
    ],
)
def test_access_rule(user_roles: frozenset[str] | None, caller: list[str], allowed: bool) -> None:
    """DIAL's `DeploymentControllerTest` cases (spec auth-limits 9.3)."""
    assert may_use(user_roles, frozenset(caller)) is allowed


def test_endpoint_must_be_an_absolute_url(tmp_path: Path) -> None:
    config = {"applications": {"a": {"endpoint": "localhost:5000/chat"}}}
    text = problems([write(tmp_path, "c.json", config)])
    assert "$.applications.a.endpoint: endpoint must be an absolute http(s) URL" in text
