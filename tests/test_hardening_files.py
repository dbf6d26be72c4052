"""Hardening of the usage file (issue 11, items 15 and 17): one process per file, and a file
that is not a database never stops start-up with a traceback. Real processes."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from gateway_config import chat, key_headers
from harness import FakeModel, free_port, start_gateway, stop, write_json


def _config(fake: FakeModel) -> dict[str, Any]:
    return {
        "models": {"m": {"endpoint": fake.endpoint("m")}},
        "keys": {"file-key-123": {"project": "p", "role": "r"}},
        "roles": {"r": {"limits": {"m": {}}}},
    }


def _serve_expecting_exit(
    work_dir: Path, config: Path, usage_file: Path
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("aidial.", "AIDIAL_"))}
    env["aidial.limits.embedded.file"] = str(usage_file)
    args = [sys.executable, "-m", "tollgate", "serve", "--host", "127.0.0.1"]
    args += ["--port", str(free_port()), "--config", str(config)]
    return subprocess.run(args, capture_output=True, text=True, timeout=30, env=env)


def test_a_second_gateway_on_the_same_usage_file_refuses_to_start(
    work_dir: Path, fake_model: FakeModel
) -> None:
    usage = work_dir / "shared-usage" / "usage.sqlite"
    config = write_json(work_dir / "files-config.json", _config(fake_model))
    first = start_gateway(work_dir, [config], env={"aidial.limits.embedded.file": str(usage)})
    try:
        assert f"usage counters in {usage})" in first.output()
        second = _serve_expecting_exit(work_dir, config, usage)
        assert second.returncode == 1, second.stdout + second.stderr
        lines = [line for line in second.stderr.splitlines() if "cannot start" in line]
        assert len(lines) == 1 and str(usage) in lines[0] and "another Tollgate" in lines[0]
        assert "Traceback" not in second.stderr
        # The first one still counts, alone, in its file.
        response = httpx.post(
            f"{first.url}/openai/deployments/m/chat/completions",
            headers=key_headers("file-key-123"),
            json=chat(),
        )
        assert response.status_code == 200
    finally:
        stop(first.process)
    # Once the first has stopped, the file is free again.
    again = start_gateway(work_dir, [config], env={"aidial.limits.embedded.file": str(usage)})
    stop(again.process)


def test_a_corrupt_usage_file_is_moved_aside(work_dir: Path, fake_model: FakeModel) -> None:
    folder = work_dir / "corrupt"
    folder.mkdir()
    usage = folder / "usage.sqlite"
    garbage = b"this is not a database, " * 200
    usage.write_bytes(garbage)
    config = write_json(work_dir / "corrupt-config.json", _config(fake_model))
    gw = start_gateway(work_dir, [config], env={"aidial.limits.embedded.file": str(usage)})
    try:
        response = httpx.post(
            f"{gw.url}/openai/deployments/m/chat/completions",
            headers=key_headers("file-key-123"),
            json=chat(),
        )
        assert response.status_code == 200
    finally:
        stop(gw.process)
    output = gw.output()
    assert "Traceback" not in output
    aside = [p for p in folder.iterdir() if p.name.startswith("usage.sqlite.corrupt-")]
    assert len(aside) == 1 and aside[0].read_bytes() == garbage
    assert f"usage file {usage} is not a usable database" in output and str(aside[0]) in output
    # A new file was started, and holds the call.
    with sqlite3.connect(usage) as db:
        assert db.execute("SELECT count(*) FROM usage").fetchone() == (1,)


def test_an_unusable_usage_file_stops_start_up_with_one_line(
    work_dir: Path, fake_model: FakeModel
) -> None:
    usage = work_dir / "foreign.sqlite"
    with sqlite3.connect(usage) as db:  # another program's database, with a `usage` table
        db.execute("CREATE TABLE usage (x INTEGER)")
    config = write_json(work_dir / "foreign-config.json", _config(fake_model))
    result = _serve_expecting_exit(work_dir, config, usage)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "cannot start" in line]
    assert len(lines) == 1 and f"usage file {usage} cannot be used" in lines[0]
    assert usage.exists()  # not moved: it is a database, only not ours
