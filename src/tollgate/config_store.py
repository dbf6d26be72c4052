"""The live config: load at start-up, reload on a timer and on SIGHUP, swap one reference."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence

from tollgate.config.load import ConfigError, load_config
from tollgate.routing.balancer import Balancers
from tollgate.snapshot import Snapshot, build_snapshot

log = logging.getLogger("tollgate.config")


def load_snapshot(
    paths: Sequence[str], *, overwrite_arrays: bool, balancers: Balancers | None = None
) -> Snapshot:
    loaded = load_config(paths, overwrite_arrays=overwrite_arrays)
    return build_snapshot(loaded.config, loaded.digest, balancers)


class ConfigStore:
    """Holds the current snapshot. A request reads `current` once and keeps that snapshot.

    `balancers` is the process's one balancer registry: each snapshot built here takes its
    balancers from it, so upstream health and round-robin counters survive a reload that keeps
    the upstream (compatibility C32), while a call keeps the balancers of the snapshot it started
    with.
    """

    def __init__(
        self, paths: Sequence[str], *, overwrite_arrays: bool, reload_every_s: float
    ) -> None:
        self.paths = tuple(paths)
        self.overwrite_arrays = overwrite_arrays
        self.reload_every_s = reload_every_s
        self.balancers = Balancers()
        # Raises ConfigError at start-up: the caller exits non-zero with the message.
        self.current: Snapshot = load_snapshot(
            self.paths, overwrite_arrays=overwrite_arrays, balancers=self.balancers
        )
        self.reloads = 0
        self.failed_reloads = 0
        self._task: asyncio.Task[None] | None = None

    def reload(self) -> bool:
        """Re-read the files; on any problem keep serving the previous config. True if swapped."""
        try:
            return self.reload_now()
        except ConfigError as exc:
            log.warning("Failed to reload config: %s", "; ".join(exc.problems))
            return False
        except Exception:  # a bug must not take the gateway down with it
            log.exception("Failed to reload config")
            return False

    def reload_now(self) -> bool:
        """`reload`, raising the `ConfigError` of a config it refused (the previous one keeps
        serving: nothing is applied until the whole config is valid). For
        `POST /v1/ops/config/reload` (compatibility C53), which answers with it."""
        try:
            loaded = load_config(self.paths, overwrite_arrays=self.overwrite_arrays)
            if loaded.digest == self.current.digest:
                return False
            snapshot = build_snapshot(loaded.config, loaded.digest, self.balancers)
        except BaseException:
            self.failed_reloads += 1
            raise
        self.current = snapshot
        self.reloads += 1
        log.info("config reloaded from %s", ", ".join(self.paths))
        return True

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._task = loop.create_task(self._every_period())
        try:
            loop.add_signal_handler(signal.SIGHUP, self._reload_on_signal)
        except (NotImplementedError, RuntimeError):  # not on the main thread / platform
            log.debug("SIGHUP reload not available here")

    def _reload_on_signal(self) -> None:
        log.info("SIGHUP: reloading config")
        self.reload()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _every_period(self) -> None:
        while True:
            await asyncio.sleep(self.reload_every_s)
            self.reload()
