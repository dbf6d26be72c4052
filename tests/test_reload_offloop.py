"""Reloads never stall the event loop: digest first, build in a worker thread, one swap."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from pathlib import Path
from typing import Any

import pytest

import tollgate.config_store as config_store
from tollgate.config_store import ConfigStore
from tollgate.routing.balancer import Balancers

pytestmark = pytest.mark.unit


def config(key: str) -> dict[str, Any]:
    return {
        "models": {
            "m": {
                "endpoint": "http://127.0.0.1:9/v1/chat",
                "upstreams": [{"endpoint": "http://127.0.0.1:9/a", "key": "upstream-a"}],
            }
        },
        "keys": {key: {"project": "p", "role": "r"}},
        "roles": {"r": {}},
    }


def write(path: Path, tree: dict[str, Any]) -> None:
    path.write_text(json.dumps(tree, indent=1))


@pytest.fixture
def path(tmp_path: Path) -> Path:
    file = tmp_path / "c.json"
    write(file, config("first-key-0123456789"))
    return file


class Counting:
    """Wraps a function of `config_store`, counting calls and the threads they ran on."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.wrapped = getattr(config_store, name)
        self.threads: list[threading.Thread] = []
        monkeypatch.setattr(config_store, name, self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.threads.append(threading.current_thread())
        return self.wrapped(*args, **kwargs)


async def test_an_unchanged_file_is_not_parsed(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ConfigStore([str(path)], overwrite_arrays=False, reload_every_s=3600)
    loads = Counting(monkeypatch, "load_config")
    first = store.current
    assert await store.reload(periodic=True) is False
    assert await store.reload_now() is False
    assert loads.threads == [] and store.current is first

    write(path, config("second-key-0123456789"))
    assert await store.reload(periodic=True) is True
    assert len(loads.threads) == 1 and store.current is not first
    await store.stop()


async def test_a_changed_config_is_built_off_the_loop_while_the_loop_serves(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ConfigStore([str(path)], overwrite_arrays=False, reload_every_s=3600)
    loop = asyncio.get_running_loop()
    served = threading.Event()
    build = config_store.build

    def build_waiting_for_the_loop(*args: Any, **kwargs: Any) -> Any:
        # The loop answers a callback while the build is under way: it is not blocked.
        loop.call_soon_threadsafe(served.set)
        assert served.wait(timeout=30), "the event loop did not run during the build"
        assert threading.current_thread() is not threading.main_thread()
        return build(*args, **kwargs)

    monkeypatch.setattr(config_store, "build", build_waiting_for_the_loop)
    previous = store.current
    write(path, config("other-key-0123456789"))
    assert await store.reload_now() is True
    assert served.is_set() and store.current is not previous
    assert len(store.current.keys) == 1
    await store.stop()


async def test_balancer_state_is_carried_over_once_per_successful_build(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ConfigStore([str(path)], overwrite_arrays=False, reload_every_s=3600)
    syncs: list[object] = []
    sync = Balancers.sync

    def counted(registry: Balancers, sets: Any) -> Any:
        syncs.append(sets)
        return sync(registry, sets)

    monkeypatch.setattr(Balancers, "sync", counted)
    state = store.current.balancers["m"].states[0]
    state.error_count = 2  # health a call recorded

    write(path, config("next-key-0123456789"))
    assert await store.reload_now() is True
    assert len(syncs) == 1
    assert store.current.balancers["m"].states[0] is state  # the same upstream keeps its state

    path.write_text('{"keys": {')  # refused: nothing applied, nothing synced
    assert await store.reload() is False
    assert len(syncs) == 1 and store.failed_reloads == 1
    await store.stop()


async def test_a_refused_reload_logs_file_line_and_path(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = ConfigStore([str(path)], overwrite_arrays=False, reload_every_s=3600)
    broken = config("good-key-0123456789")
    broken["keys"]["roleless-key-0123456789"] = {"project": "p"}
    write(path, broken)
    with caplog.at_level(logging.WARNING, logger="tollgate.config"):
        assert await store.reload() is False
    [record] = [r for r in caplog.records if "Failed to reload config" in r.getMessage()]
    message = record.getMessage()
    assert f"{path}:" in message and ": error: $.keys[" in message
    line = path.read_text().splitlines().index('  "roleless-key-0123456789": {') + 1
    assert f"{path}:{line}:" in message
    assert "Invalid key: at least one role must be assigned to the key p" in message
    assert "roleless-key-0123456789" not in message  # keys by fingerprint only

    # The same refused bytes are not parsed (nor logged) again by the periodic reload.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tollgate.config"):
        assert await store.reload(periodic=True) is False
    assert caplog.records == []
    await store.stop()
