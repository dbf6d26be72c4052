"""The live config: load at start-up, reload on a timer and on SIGHUP, swap one reference.

A reload never stalls the event loop (README, "Reloading the config"): it first compares the
files' bytes with those the current snapshot was built from (their SHA-256, read in a worker
thread) and stops there when nothing changed; a changed config is parsed, validated and built
in a worker thread, in small steps (`config.chunked`), and swapped in on the loop with one
reference assignment. The snapshot it replaces is released in a worker thread too, once no
call holds it any more.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence

from tollgate.config.load import ConfigError, files_digest, load_config
from tollgate.config.schema import Config, Role
from tollgate.limits import tokens
from tollgate.routing.balancer import Balancers
from tollgate.snapshot import Kind, Snapshot, prepare_snapshot, take_apart

log = logging.getLogger("tollgate.config")

RETIRE_WAIT_S = 600.0  # how long a replaced snapshot waits for its last calls to let go


SWITCH_INTERVAL_S = 0.001  # how often a busy worker thread hands the GIL over (default 5 ms)
_switching = threading.Lock()
_working = 0  # reload jobs running in worker threads
_interval = sys.getswitchinterval()


@contextlib.contextmanager
def _quick_switches() -> Iterator[None]:
    """While reload work runs in a worker thread, the interpreter asks it to hand the GIL back
    every millisecond rather than every 5: the event loop waits at most that long for it each
    time it wakes up (a request's latency grows by a few such waits, not by 5 ms each)."""
    global _working, _interval
    with _switching:
        if _working == 0:
            _interval = sys.getswitchinterval()
            sys.setswitchinterval(min(_interval, SWITCH_INTERVAL_S))
        _working += 1
    try:
        yield
    finally:
        with _switching:
            _working -= 1
            if _working == 0:
                sys.setswitchinterval(_interval)


def with_api_roles(config: Config, api_roles: Mapping[str, Role]) -> Config:
    """The files' config with the roles managed through the Configuration API laid over it:
    a role defined in both is the API's, and deleting it there reveals the file's again
    (compatibility C81, as DIAL's merge)."""
    if not api_roles:
        return config
    return config.model_copy(update={"roles": {**config.roles, **api_roles}})


def load_snapshot(
    paths: Sequence[str], *, overwrite_arrays: bool, balancers: Balancers | None = None
) -> Snapshot:
    loaded = load_config(paths, overwrite_arrays=overwrite_arrays)
    return prepare_snapshot(loaded.config, loaded.digest).finish(balancers)


def build(
    paths: Sequence[str],
    *,
    overwrite_arrays: bool,
    balancers: Balancers,
    api_roles: Mapping[str, Role] | None = None,
) -> Snapshot:
    """What a reload does in its worker thread: read, validate and build, in small steps, and
    last carry the balancer state over (`Balancers.sync`, once per successful build).

    `sync` runs here, beside calls on the loop, and that is safe: it only reads what never
    changes once made (the old balancers' upstream identities, their tuples of states and
    tiers), reuses the state objects calls update (so whatever a call records meanwhile is
    kept), and replaces the registry's mapping with one reference assignment. A call keeps
    the balancers of its snapshot; the reload lock keeps two syncs from overlapping.
    """
    loaded = load_config(paths, overwrite_arrays=overwrite_arrays, in_steps=True)
    config = with_api_roles(loaded.config, api_roles or {})
    return prepare_snapshot(config, loaded.digest).finish(balancers)


def preload_tokenizers(snapshot: Snapshot) -> None:
    """Read the token encodings of the snapshot's models now, so that a call estimated on the
    loop never reads one (compatibility C73). At start-up only, before the loop runs: reading
    one holds the GIL for up to half a second, which in a reload's worker thread would stall
    every call; a model a reload adds whose encoding is not read yet is estimated by its bytes
    until the next start."""
    for deployment in snapshot.deployments.values():
        if deployment.kind is Kind.MODEL:
            tokenizer = getattr(deployment.spec, "tokenizer_model", None)
            tokens.preload(tokens.model_hint(deployment.name, deployment.override_name, tokenizer))


def located_problems(paths: Sequence[str], overwrite_arrays: bool, exc: ConfigError) -> list[str]:
    """A refused config's errors as `tollgate config check` prints them: file, line and column,
    JSON path (keys by fingerprint) and message; the loader's own messages if check finds none
    (the files changed again meanwhile)."""
    from tollgate.config_check import check_files

    try:
        found = check_files(paths, overwrite_arrays=overwrite_arrays)
    except Exception:  # the log line must not fail: fall back to the loader's messages
        found = []
    errors = [str(problem) for problem in found if problem.severity == "error"]
    return errors or list(exc.problems)


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
        preload_tokenizers(self.current)  # before the gateway serves (no event loop yet)
        self.reloads = 0
        self.failed_reloads = 0
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one reload at a time: one build, one `sync`, in order
        # The digest of the files last refused, and why: the same bytes are not parsed again.
        self._refused: tuple[str, ConfigError] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._closing = threading.Event()
        self._freezing = False  # whether the process keeps its heap out of the collector
        # Roles managed through the Configuration API, laid over the files' (`set_api_roles`);
        # a version is counted up on each change, and the snapshot says which it was built
        # with, so a reload with unchanged files still rebuilds for a changed role.
        self.api_roles: Mapping[str, Role] = {}
        self._roles_version = 0
        self._built_roles_version = 0

    async def reload(self, *, periodic: bool = False) -> bool:
        """Re-read the files; on any problem keep serving the previous config and log why.
        True if swapped. `periodic`: files refused before and unchanged since are not logged
        again (an explicit reload, SIGHUP, logs them every time)."""
        if periodic and self._refused is not None:
            with contextlib.suppress(ConfigError, OSError):
                digest = await asyncio.to_thread(files_digest, self.paths)
                if digest == self._refused[0]:
                    return False
        try:
            return await self.reload_now()
        except ConfigError as exc:
            lines = await asyncio.to_thread(
                located_problems, self.paths, self.overwrite_arrays, exc
            )
            log.warning(
                "Failed to reload config, the previous one keeps serving: %s", "; ".join(lines)
            )
            return False
        except Exception:  # a bug must not take the gateway down with it
            log.exception("Failed to reload config")
            return False

    async def reload_now(self) -> bool:
        """`reload`, raising the `ConfigError` of a config it refused (the previous one keeps
        serving: nothing is applied until the whole config is valid). For
        `POST /v1/ops/config/reload` (compatibility C53), which answers with it."""
        async with self._lock:
            digest: str | None = None
            try:
                with _quick_switches():
                    digest = await asyncio.to_thread(files_digest, self.paths)
                roles_version = self._roles_version
                if digest == self.current.digest and roles_version == self._built_roles_version:
                    self._refused = None  # back to the bytes that serve
                    return False
                if self._refused is not None and self._refused[0] == digest:
                    raise self._refused[1]  # the same bytes give the same problems
                snapshot = await self._build()
                self._built_roles_version = roles_version
            except ConfigError as exc:
                self.failed_reloads += 1
                if digest is not None:  # None: a file could not be read
                    self._refused = (digest, exc)
                raise
            except BaseException:
                self.failed_reloads += 1
                raise
            retired, self.current = self.current, snapshot
            self._refused = None
            self.reloads += 1
            self._retire(retired)
        log.info("config reloaded from %s", ", ".join(self.paths))
        return True

    async def _build(self) -> Snapshot:
        """Build in a worker thread, with the cyclic garbage collector paused meanwhile: a full
        collection walks every object the build has made so far, in one call (hundreds of
        milliseconds holding the GIL with 100,000 keys). If the process keeps its start-up
        heap out of the collector (`gc.freeze`, as `tollgate serve` does), the new snapshot
        is kept out too."""
        collecting = gc.isenabled()
        gc.disable()
        try:
            with _quick_switches():
                snapshot = await asyncio.to_thread(
                    build,
                    self.paths,
                    overwrite_arrays=self.overwrite_arrays,
                    balancers=self.balancers,
                    api_roles=self.api_roles,
                )
            if collecting and self._freezing:
                gc.freeze()
            return snapshot
        finally:
            if collecting:
                gc.enable()

    async def set_api_roles(self, roles: Mapping[str, Role]) -> None:
        """Serve with these API roles over the files' from now on: the snapshot is rebuilt
        (the files are read again); a file that cannot be used keeps the current snapshot,
        and the roles apply with the next good reload."""
        self.api_roles = dict(roles)
        self._roles_version += 1
        await self.reload()

    def _retire(self, snapshot: Snapshot) -> None:
        """Release a replaced snapshot in a worker thread once no call holds it any more."""
        box = [snapshot]
        del snapshot
        task = asyncio.get_running_loop().create_task(asyncio.to_thread(self._release, box))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _release(self, box: list[Snapshot]) -> None:
        snapshot = box.pop()
        waited = 0.0
        # Held here and by getrefcount's argument only: no call uses it any more.
        while sys.getrefcount(snapshot) > 2 and waited < RETIRE_WAIT_S:
            if self._closing.wait(0.05):
                return  # stopping: released whole
            waited += 0.05
        if waited < RETIRE_WAIT_S:
            with _quick_switches():
                take_apart(snapshot)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        # Asked once: `get_freeze_count` walks the whole frozen heap (tens of milliseconds).
        self._freezing = gc.get_freeze_count() > 0
        self._task = loop.create_task(self._every_period())
        try:
            loop.add_signal_handler(signal.SIGHUP, self._reload_on_signal)
        except (NotImplementedError, RuntimeError):  # not on the main thread / platform
            log.debug("SIGHUP reload not available here")

    def _reload_on_signal(self) -> None:
        log.info("SIGHUP: reloading config")
        task = asyncio.get_running_loop().create_task(self._reload_logged())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _reload_logged(self) -> None:
        await self.reload()

    async def stop(self) -> None:
        self._closing.set()
        tasks = [t for t in (self._task, *self._background) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _every_period(self) -> None:
        while True:
            await asyncio.sleep(self.reload_every_s)
            await self.reload(periodic=True)
