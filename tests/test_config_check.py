"""`tollgate config check`: the checks themselves, and the command as operators run it."""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tollgate.config.load import ConfigError, load_config
from tollgate.config_check import (
    Problem,
    check,
    check_files,
    estimated_bits,
    exit_code,
    json_positions,
)
from tollgate.security.keys import digest_of

STRONG = "Zx8kQ2vR7mN4pL9sT3wY6bC1dF5gH0jK"  # 32 mixed characters: ~190 bits by the estimate


def write(tmp_path: Path, name: str, value: Any) -> str:
    path = tmp_path / name
    path.write_text(value if isinstance(value, str) else json.dumps(value, indent=2))
    return str(path)


def fingerprint(secret: str) -> str:
    return f"sha256:{digest_of(secret)[:4].hex()}…"


def clean_config(**extra: Any) -> dict[str, Any]:
    """A config with nothing to report; tests add one mistake each."""
    config: dict[str, Any] = {
        "models": {"gpt": {"endpoint": "http://model/x", "userRoles": ["admin"]}},
        "keys": {STRONG: {"project": "p", "roles": ["admin"]}},
        "roles": {"admin": {"limits": {"gpt": {"minute": 1000}}}},
    }
    config.update(extra)
    return config


def found(problems: list[Problem]) -> list[tuple[str, str | None, str]]:
    return [(p.severity, p.path, p.message) for p in problems]


class TestErrors:
    def test_clean_config_has_no_problems(self, tmp_path: Path) -> None:
        assert check_files([write(tmp_path, "c.json", clean_config())]) == []

    def test_validation_errors_are_the_loaders_own(self, tmp_path: Path) -> None:
        """Same messages as `serve`: the file that wrote it, the path, DIAL's words."""
        good = write(tmp_path, "good.json", clean_config())
        bad = write(
            tmp_path,
            "bad.json",
            {
                "keys": {"secret-without-project": {"role": "r"}},
                "models": {"gpt": {"type": "painting", "upstreams": "x"}},
            },
        )
        with pytest.raises(ConfigError) as caught:
            load_config([good, bad])
        problems = check_files([good, bad])
        assert all(p.severity == "error" for p in problems)
        assert sorted(f"{p.file}: {p.path}: {p.message}" for p in problems) == sorted(
            caught.value.problems
        )
        assert len(problems) == 3

    def test_errors_carry_the_line_and_column_of_the_field(self, tmp_path: Path) -> None:
        text = '{\n  "models": {\n    "gpt": {\n      "endpoint": "ftp://x"\n    }\n  }\n}'
        path = write(tmp_path, "c.json", text)
        [problem] = check_files([path])
        assert (problem.file, problem.line, problem.column) == (path, 4, 7)
        assert str(problem) == (
            f"{path}:4:7: error: $.models.gpt.endpoint: "
            "endpoint must be an absolute http(s) URL: ftp://x"
        )

    def test_missing_field_points_at_its_object(self, tmp_path: Path) -> None:
        secret = "secret-" + secrets.token_hex(16)
        path = write(tmp_path, "c.json", f'{{"keys": {{\n  "{secret}": {{"role": "r"}}}}}}')
        [problem] = check_files([path])
        assert (problem.line, problem.column) == (2, 3)
        assert problem.path == f'$.keys["{fingerprint(secret)}"]'
        assert problem.message == "Project key is undefined"
        assert secret not in str(problem) + json.dumps(problem.to_json()) + repr(problem)

    def test_syntax_error_has_line_and_column(self, tmp_path: Path) -> None:
        path = write(tmp_path, "c.json", '{\n  "models": {\n    "m": {,}\n  }\n}')
        [problem] = check_files([path])
        assert (problem.file, problem.line, problem.column) == (path, 3, 11)
        assert problem.message == "invalid JSON: Expecting property name enclosed in double quotes"
        assert problem.path is None

    def test_every_unreadable_file_is_reported_and_nothing_else(self, tmp_path: Path) -> None:
        broken = write(tmp_path, "broken.json", "{")
        missing = str(tmp_path / "absent.json")
        not_object = write(tmp_path, "list.json", "[]")
        good_with_typo = write(tmp_path, "good.json", clean_config(kyes={}))
        problems = check_files([broken, missing, not_object, good_with_typo])
        assert [(p.file, p.severity) for p in problems] == [
            (broken, "error"),
            (missing, "error"),
            (not_object, "error"),
        ]
        assert problems[1].message == f"File not found: {missing}"
        assert "top level must be a JSON object" in problems[2].message

    def test_snake_and_camel_case_files_merge_before_validation(self, tmp_path: Path) -> None:
        """A key split over two files is valid once merged, as `serve` would see it."""
        first = write(tmp_path, "a.json", clean_config(keys={STRONG: {"roles": ["admin"]}}))
        second = write(tmp_path, "b.json", {"keys": {STRONG: {"project": "p"}}})
        assert check_files([first]) != []
        assert check_files([first, second]) == []

    def test_no_files(self) -> None:
        [problem] = check_files([])
        assert problem.severity == "error"


class TestUnknownFields:
    def test_typos_at_every_depth_with_a_suggestion(self, tmp_path: Path) -> None:
        config = clean_config(
            modles={},
            applications={"app": {"endpoint": "http://app/x", "features": {"toolSupported": 1}}},
        )
        config["models"]["gpt"]["upstreams"] = [{"endpoint": "http://u", "wieght": 2}]
        config["keys"][STRONG]["projcet"] = "x"
        config["roles"]["admin"]["limits"]["gpt"]["minutes"] = 5
        problems = check_files([write(tmp_path, "c.json", config)])
        key = f'$.keys["{fingerprint(STRONG)}"]'
        assert [(p.severity, p.path, p.message) for p in problems] == [
            ("warning", path, f'unknown field, ignored (did you mean "{meant}"?)')
            for path, meant in [
                ("$.models.gpt.upstreams[0].wieght", "weight"),
                (f"{key}.projcet", "project"),
                ("$.roles.admin.limits.gpt.minutes", "minute"),
                ("$.modles", "models"),
                ("$.applications.app.features.toolSupported", "toolsSupported"),
            ]
        ]

    def test_free_form_fields_are_not_walked(self, tmp_path: Path) -> None:
        config = clean_config()
        config["models"]["gpt"]["defaults"] = {"anything": {"goes": 1}}
        config["models"]["gpt"]["upstreams"] = [{"endpoint": "http://u", "extraData": {"x": 1}}]
        config["models"]["gpt"]["pricing"] = {"unit": "token", "prompt": {"test": {}}}
        assert check_files([write(tmp_path, "c.json", config)]) == []

    def test_a_field_given_in_both_spellings(self, tmp_path: Path) -> None:
        """pydantic takes the camelCase spelling; the snake_case one is silently dropped."""
        config = clean_config()
        config["models"]["gpt"]["user_roles"] = ["admin", "other"]
        [problem] = check_files([write(tmp_path, "c.json", config)])
        assert problem.path == "$.models.gpt.user_roles"
        assert problem.message == '"userRoles" is also given; this one is ignored'

    def test_snake_case_fields_are_known(self, tmp_path: Path) -> None:
        config = clean_config()
        del config["models"]["gpt"]["userRoles"]
        config["models"]["gpt"].update(user_roles=["admin"], forward_auth_token=True)
        config["rate_limit_schedule"] = {"week_start_day": "MON"}
        assert check_files([write(tmp_path, "c.json", config)]) == []

    def test_newer_dial_sections_are_named_as_unsupported(self, tmp_path: Path) -> None:
        [problem] = check_files([write(tmp_path, "c.json", clean_config(toolsets={}))])
        assert problem.path == "$.toolsets"
        assert "newer DIAL versions that Tollgate does not support" in problem.message

    def test_unknown_fields_are_reported_alongside_errors(self, tmp_path: Path) -> None:
        config = clean_config(kyes={})
        config["models"]["gpt"]["type"] = "painting"
        problems = check_files([write(tmp_path, "c.json", config)])
        assert [(p.severity, p.path) for p in problems] == [
            ("error", "$.models.gpt.type"),
            ("warning", "$.kyes"),
        ]


class TestKeys:
    @pytest.mark.parametrize(
        ("secret", "bits"),
        [
            ("", 0.0),
            ("12345678", 8 * math.log2(10)),
            ("deadbeef" * 4, 128.0),  # hex: 4 bits a character
            ("password", 8 * math.log2(26)),
            ("Pass-word1", 10 * math.log2(10 + 26 + 26 + 32)),
        ],
    )
    def test_estimate(self, secret: str, bits: float) -> None:
        assert estimated_bits(secret) == pytest.approx(bits)

    def test_generated_keys_are_strong(self) -> None:
        for _ in range(20):
            assert estimated_bits(secrets.token_urlsafe(32)) >= 250

    @pytest.mark.parametrize(
        ("secret", "weak"),
        [
            ("dial_api_key", True),  # DIAL's sample key: 12 x log2(26 + 32) = 70 bits
            ("0123456789abcde", True),  # hex: 60 bits
            ("0123456789abcdef" * 2, False),  # hex: 128 bits exactly
            (STRONG, False),
        ],
    )
    def test_weak_keys_are_reported_without_the_secret(
        self, tmp_path: Path, secret: str, weak: bool
    ) -> None:
        config = clean_config(keys={secret: {"project": "p", "roles": ["admin"]}})
        problems = check_files([write(tmp_path, "c.json", config)])
        assert [p.path for p in problems] == ([f'$.keys["{fingerprint(secret)}"]'] if weak else [])
        if weak:
            assert problems[0].message.startswith("weak key: at most about ")
            assert "tollgate keys new" in problems[0].message
            assert secret not in str(problems[0])

    def test_sha256_names_are_not_judged(self, tmp_path: Path) -> None:
        name = "sha256:" + hashlib.sha256(b"x").hexdigest()
        config = clean_config(keys={name: {"project": "p", "roles": ["admin"]}})
        assert check_files([write(tmp_path, "c.json", config)]) == []

    def test_the_same_key_twice(self, tmp_path: Path) -> None:
        """A plain secret and its `sha256:` name are one key: the later entry replaces the other."""
        name = "sha256:" + hashlib.sha256(STRONG.encode()).hexdigest()
        config = clean_config()
        config["keys"][name] = {"project": "q", "roles": ["admin"]}
        [problem] = check_files([write(tmp_path, "c.json", config)])
        assert problem.path == f'$.keys["{fingerprint(STRONG)}"]'
        assert problem.message == (
            f'the same key as $.keys["{fingerprint(STRONG)}"], which it replaces'
        )
        assert STRONG not in str(problem)


class TestRoles:
    def test_key_role_defined_nowhere(self, tmp_path: Path) -> None:
        config = clean_config()
        config["keys"][STRONG].update(roles=["admin", "amdin"], role="ops")
        problems = check_files([write(tmp_path, "c.json", config)])
        key = f'$.keys["{fingerprint(STRONG)}"]'
        no_effect = "is not defined in roles and no userRoles lists it: it has no effect"
        assert found(problems) == [
            ("warning", f"{key}.roles[1]", f'role "amdin" {no_effect}'),
            ("warning", f"{key}.role", f'role "ops" {no_effect}'),
        ]

    def test_key_role_that_only_grants_access_is_fine(self, tmp_path: Path) -> None:
        """DIAL: a role with no `roles` entry still grants access (spec auth-limits 3.4)."""
        config = clean_config(roles={})
        assert check_files([write(tmp_path, "c.json", config)]) == []

    def test_default_role_needs_no_definition(self, tmp_path: Path) -> None:
        config = clean_config()
        config["keys"][STRONG]["roles"] = ["admin", "default"]
        assert check_files([write(tmp_path, "c.json", config)]) == []

    def test_access_role_nobody_can_hold(self, tmp_path: Path) -> None:
        config = clean_config(
            routes={"r": {"paths": ["/x"], "userRoles": ["ghost", "admin"], "response": {}}}
        )
        config["models"]["gpt"]["userRoles"] = ["admin", "power-user"]
        problems = check_files([write(tmp_path, "c.json", config)])
        unreachable = "and roles does not define it: no caller can use it to reach this deployment"
        assert [(p.path, p.message) for p in problems] == [
            ("$.models.gpt.userRoles[1]", f'no key has role "power-user" {unreachable}'),
            ("$.routes.r.userRoles[0]", f'no key has role "ghost" {unreachable}'),
        ]

    def test_access_role_defined_in_roles_is_fine(self, tmp_path: Path) -> None:
        config = clean_config()
        config["models"]["gpt"]["userRoles"] = ["admin", "power-user"]
        config["roles"]["power-user"] = {"limits": {}}
        assert check_files([write(tmp_path, "c.json", config)]) == []

    def test_limit_for_a_deployment_that_does_not_exist(self, tmp_path: Path) -> None:
        config = clean_config(
            routes={"route": {"paths": ["/r"], "response": {}}},
            applications={"app": {"endpoint": "http://app/x"}},
            assistant={"endpoint": "http://assistant/x", "assistants": {"helper": {}}},
        )
        config["roles"]["admin"]["limits"].update(
            {"gtp": {}, "route": {}, "app": {}, "helper": {}, "assistant": {}}
        )
        [problem] = check_files([write(tmp_path, "c.json", config)])
        assert problem.path == "$.roles.admin.limits.gtp"
        assert problem.message == 'no deployment named "gtp": this limit applies to nothing'


class TestReferences:
    def test_interceptors_and_addons_that_are_not_defined(self, tmp_path: Path) -> None:
        config = clean_config(
            interceptors={"audit": {"endpoint": "http://audit/x"}},
            addons={"search": {"endpoint": "http://search/x"}},
            assistant={"assistants": {"helper": {"addons": ["search", "todo"]}}},
        )
        config["models"]["gpt"]["interceptors"] = ["audit", "pii"]
        problems = check_files([write(tmp_path, "c.json", config)])
        assert found(problems) == [
            ("warning", "$.models.gpt.interceptors[1]", 'no interceptor "pii" in interceptors'),
            ("warning", "$.assistant.assistants.helper.addons[1]", 'no addon "todo" in addons'),
        ]


class TestInterfaces:
    def test_interfaces_that_serve_nothing_are_named(self, tmp_path: Path) -> None:
        config = clean_config()
        config["models"]["claude"] = {
            "userRoles": ["admin"],
            "interfaces": {
                "anthropicMessages": {
                    "baseUrl": "http://a",
                    "overridePaths": {"postNothing": "/x"},
                },
                "openaiEmbedding": {"baseUrl": "http://a"},
                "openaiResponses": {},
                "openaiChatCompletions": {"mode": "translator", "translator": "t"},
            },
            "upstreams": [{"key": "k"}],
            "pricing": {"unit": "char_without_whitespace", "cacheRead": "0.1"},
        }
        problems = found(check_files([write(tmp_path, "c.json", config)]))
        where = "$.models.claude"
        assert problems == [
            (
                "warning",
                f"{where}.interfaces.anthropicMessages.overridePaths.postNothing",
                'unknown operation "postNothing": never used',
            ),
            (
                "warning",
                f"{where}.interfaces.openaiEmbedding",
                "Unsupported interface type 'openaiEmbedding'. Model supports: "
                "openaiChatCompletions, openaiEmbeddings, openaiResponses, anthropicMessages "
                "(kept, but it never serves a call)",
            ),
            (
                "warning",
                f"{where}.interfaces.openaiResponses",
                "no base_url here nor baseUrl on the deployment: serves nothing",
            ),
            (
                "warning",
                f"{where}.interfaces.openaiChatCompletions.mode",
                'mode "translator" is not served by Tollgate: this interface serves nothing '
                "(only passthrough is)",
            ),
            (
                "warning",
                f"{where}.upstreams[0]",
                "an upstream of a model that serves the Responses API needs an id (calls answer "
                "503 Upstream is missing required id)",
            ),
            (
                "warning",
                f"{where}.pricing",
                "cacheRead and cacheWrite apply to unit token only: ignored here",
            ),
        ]

    def test_typed_interfaces_behind_interceptors(self, tmp_path: Path) -> None:
        config = clean_config(interceptors={"audit": {"endpoint": "http://audit/x"}})
        config["models"]["gpt"].update(
            interceptors=["audit"], responsesEndpoint="http://model/v1/responses"
        )
        problems = found(check_files([write(tmp_path, "c.json", config)]))
        assert problems == [
            (
                "warning",
                "$.models.gpt",
                "responsesEndpoint not served: the deployment has interceptors, which speak "
                "chat completions only (calls answer 503)",
            )
        ]


class TestLocation:
    def test_warnings_name_the_file_and_line_that_wrote_them(self, tmp_path: Path) -> None:
        first = write(tmp_path, "a.json", clean_config())
        second = write(tmp_path, "b.json", '{\n  "models": {"gpt": {\n    "user_roles": ["x"]}}}')
        problems = check_files([first, second])
        assert [(p.file, p.line, p.column, p.path) for p in problems] == [
            (second, 3, 5, "$.models.gpt.user_roles"),
        ]

    def test_written_spelling_is_used_in_the_path(self, tmp_path: Path) -> None:
        config = clean_config()
        config["models"]["gpt"] = {"endpoint": "http://m/x", "user_roles": ["admin", "ghost"]}
        [problem] = check_files([write(tmp_path, "c.json", config)])
        assert problem.path == "$.models.gpt.user_roles[1]"
        assert problem.line is not None

    def test_json_positions(self) -> None:
        text = '{"a": {"b\\"c": [1, {"d": true}], "e": null},\n "g": {"f": "}"}, "g": {"h": 2}}'
        positions = json_positions(text)
        assert positions[("a", 'b"c')] == text.index('"b\\"c"')
        assert positions[("a", 'b"c', 1, "d")] == text.index('"d"')
        assert positions[("a", 'b"c', 0)] == text.index("1")
        assert positions[("a", "e")] == text.index('"e"')
        assert positions[("g",)] == text.rindex('"g"')  # the last of a repeated name, as json
        assert positions[("g", "h")] == text.index('"h"')


class TestExitCode:
    def test_codes(self) -> None:
        error, warning = Problem("error", "e"), Problem("warning", "w")
        assert exit_code([]) == 0
        assert exit_code([warning]) == 2
        assert exit_code([warning], strict=True) == 1
        assert exit_code([warning, error]) == 1
        assert exit_code([], strict=True) == 0


class TestSettings:
    def test_overwrite_arrays_from_settings(self, tmp_path: Path) -> None:
        """Merged exactly as `serve` merges: here arrays replace instead of concatenating."""
        first_roles = clean_config()
        first_roles["models"]["gpt"]["userRoles"] = ["typo"]
        first = write(tmp_path, "a.json", first_roles)
        second = write(tmp_path, "b.json", {"models": {"gpt": {"userRoles": ["admin"]}}})
        overwrite = write(
            tmp_path, "s.json", {"config": {"jsonMergeStrategy": {"overwriteArrays": True}}}
        )
        assert [p.path for p in check([first, second], environ={})] == ["$.models.gpt.userRoles[0]"]
        assert check([first, second], settings_file=overwrite, environ={}) == []

    def test_files_from_settings(self, tmp_path: Path) -> None:
        config = write(tmp_path, "c.json", clean_config(kyes={}))
        settings = write(tmp_path, "s.json", {"config": {"files": [config]}})
        [problem] = check([], settings_file=settings, environ={})
        assert (problem.file, problem.path) == (config, "$.kyes")
        assert check([], environ={"AIDIAL_SETTINGS": settings}) == [problem]

    def test_no_files_anywhere(self) -> None:
        [problem] = check([], environ={})
        assert problem.severity == "error" and "no config files" in problem.message

    def test_broken_settings_file(self, tmp_path: Path) -> None:
        config = write(tmp_path, "c.json", clean_config())
        settings = write(tmp_path, "s.json", '{\n  "server": {"port": }\n}')
        [problem] = check([config], settings_file=settings, environ={})
        assert (problem.file, problem.line, problem.column) == (settings, 2, 22)
        assert problem.message.startswith("invalid JSON at line 2 column 22")

    def test_bad_setting_value_from_the_environment(self, tmp_path: Path) -> None:
        config = write(tmp_path, "c.json", clean_config())
        [problem] = check([config], environ={"aidial.server.port": "99999"})
        assert problem.file is None
        assert problem.message == "setting server.port: 99999 is not a TCP port"


# --- The command ---------------------------------------------------------------------------------


def tollgate(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed console script (or `python -m tollgate` when there is none)."""
    script = shutil.which("tollgate", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "tollgate"]
    clean_env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("aidial.", "proxy.")) and name != "AIDIAL_SETTINGS"
    }
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean_env, **(env or {})},
    )


class TestCommand:
    def test_clean(self, tmp_path: Path) -> None:
        result = tollgate("config", "check", write(tmp_path, "c.json", clean_config()))
        assert (result.returncode, result.stdout) == (0, "no problems found\n")

    def test_errors_exit_1_and_never_show_a_secret(self, tmp_path: Path) -> None:
        secret = "leak-me-" + secrets.token_hex(8)
        path = write(
            tmp_path, "c.json", '{"keys": {\n  "' + secret + '": {"role": "r"}\n}, "kyes": {}}'
        )
        result = tollgate("config", "check", path)
        assert result.returncode == 1
        assert result.stdout.splitlines() == [
            f'{path}:2:3: error: $.keys["{fingerprint(secret)}"]: Project key is undefined',
            f'{path}:3:4: warning: $.kyes: unknown field, ignored (did you mean "keys"?)',
            "1 error, 1 warning",
        ]
        as_json = tollgate("config", "check", "--json", path)
        assert secret not in result.stdout + result.stderr + as_json.stdout + as_json.stderr

    def test_syntax_error(self, tmp_path: Path) -> None:
        path = write(tmp_path, "c.json", '{\n  "models": }')
        result = tollgate("config", "check", path)
        assert result.returncode == 1
        assert result.stdout.startswith(f"{path}:2:13: error: invalid JSON: Expecting value\n")

    def test_warnings_exit_2_or_1_when_strict(self, tmp_path: Path) -> None:
        weak = "weak-" + secrets.token_hex(3)
        path = write(
            tmp_path, "c.json", clean_config(keys={weak: {"project": "p", "role": "admin"}})
        )
        result = tollgate("config", "check", path)
        assert result.returncode == 2
        assert f'warning: $.keys["{fingerprint(weak)}"]: weak key' in result.stdout
        assert weak not in result.stdout + result.stderr
        assert tollgate("config", "check", "--strict", path).returncode == 1

    def test_json_output(self, tmp_path: Path) -> None:
        first = write(tmp_path, "a.json", clean_config())
        second = write(tmp_path, "b.json", {"models": {"gpt": {"type": "painting"}}, "kyes": 1})
        result = tollgate("config", "check", "--json", first, second)
        assert result.returncode == 1
        report = json.loads(result.stdout)
        assert (report["errors"], report["warnings"], report["exitCode"]) == (1, 1, 1)
        error, warning = report["problems"]
        assert error["severity"] == "error" and error["file"] == second
        assert error["path"] == "$.models.gpt.type" and error["line"] == 4
        assert warning == {
            "severity": "warning",
            "file": second,
            "line": 7,
            "column": 3,
            "path": "$.kyes",
            "message": 'unknown field, ignored (did you mean "keys"?)',
        }

    def test_settings_option(self, tmp_path: Path) -> None:
        config = write(tmp_path, "c.json", clean_config())
        settings = write(tmp_path, "s.json", {"config": {"files": [config], "reload": 0}})
        result = tollgate("config", "check", "--settings", settings)
        assert result.returncode == 1
        assert "setting config.reload: must be a positive number of milliseconds" in result.stdout
        good = write(tmp_path, "good.json", {"config": {"files": [config]}})
        assert tollgate("config", "check", "--settings", good).returncode == 0
        # The settings the environment names are read too, as `serve` reads them.
        assert tollgate("config", "check", env={"AIDIAL_SETTINGS": settings}).returncode == 1


def test_the_storage_settings_are_checked_as_serve_checks_them(tmp_path: Path) -> None:
    """`storage.*` (the resource store of API-managed keys) is refused by `config check` with
    the message `tollgate serve` stops with."""
    from tollgate.config_check import check_settings

    settings = tmp_path / "settings.json"
    settings.write_text('{"storage": {"provider": "ftp"}}')
    loaded, problems = check_settings(str(settings))
    assert loaded is None
    assert [p.message for p in problems] == [
        "setting storage.provider: expected one of filesystem, s3, aws-s3, "
        "google-cloud-storage, azureblob, got 'ftp'"
    ]


def test_share_limits_are_checked_and_unknown_type_names_warned_about(tmp_path: Path) -> None:
    """`roles.<r>.share.<TYPE>` (compatibility C87): DIAL's upper-case type names, both field
    spellings, numbers or numeric strings; a lower-case key, which DIAL ignores without a word
    (how its own admin screen once shipped a bug), is a warning that names the fix."""
    config = clean_config(
        roles={
            "basic": {
                "share": {
                    "conversation": {"max_accepted_users": "10"},
                    "FILE": {"maxAcceptedUsers": 5, "invitationTtl": "24"},
                    "PROMPT": {},
                }
            }
        }
    )
    problems = check_files([write(tmp_path, "share.json", config)])
    assert [(p.severity, p.message) for p in problems] == [
        (
            "warning",
            'share type "conversation" is not one DIAL knows, and DIAL ignores it without a '
            "word: did you mean CONVERSATION?",
        )
    ]
    bad = clean_config(
        roles={
            "basic": {
                "share": {
                    "PROMPT": {"invitation_ttl": "soon"},
                    "APPLICATION": {"max_accepted_users": -5},
                }
            }
        }
    )
    messages = sorted(p.message for p in check_files([write(tmp_path, "bad.json", bad)]))
    assert messages == [
        "expected -1 (the type's default) or 0 to 2147483647, got -5",
        "expected a whole number, got 'soon'",
    ]
