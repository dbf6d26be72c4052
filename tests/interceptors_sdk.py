"""A virtualenv of its own for interceptors built with `aidial-interceptors-sdk`.

The SDK pins `openai<2` while the test environment has openai 2, so its interceptor app runs
from a separate virtualenv: created once under `.cache/interceptors-venv/<hash>` in the
repository root (git-ignored; CI keeps `.cache`), keyed by a hash of the requirements and the
interpreter's version, and reused while neither changes. Creating it needs PyPI: without it the
tests fail, saying so (they are not skipped).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness import _wait_healthy, free_port

TESTS_DIR = Path(__file__).resolve().parent
CACHE_DIR = TESTS_DIR.parent / ".cache" / "interceptors-venv"
REQUIREMENTS = ("aidial-interceptors-sdk==0.9.0", "uvicorn>=0.23")
# The SDK's `Requires-Python` (0.9.0): >=3.11,<3.14.
SUPPORTED = ((3, 11), (3, 12), (3, 13))
INSTALL_TIMEOUT_S = 900


def interpreter() -> tuple[str, str]:
    """A Python the SDK supports, and its version: the tests' own when it fits."""
    if sys.version_info[:2] in SUPPORTED:
        return sys.executable, f"{sys.version_info[0]}.{sys.version_info[1]}"
    for major, minor in reversed(SUPPORTED):
        found = shutil.which(f"python{major}.{minor}")
        if found:
            return found, f"{major}.{minor}"
    pytest.fail(
        "aidial-interceptors-sdk needs Python 3.11 to 3.13; none found "
        f"(this is {sys.version.split()[0]})"
    )


def ensure_venv() -> Path:
    """The virtualenv's python, creating the virtualenv first when needed."""
    python, version = interpreter()
    digest = hashlib.sha256("\n".join((version, *REQUIREMENTS)).encode()).hexdigest()[:16]
    target = CACHE_DIR / digest
    venv_python = target / "bin" / "python"
    done = target / ".complete"
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with (CACHE_DIR / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run may be building the same one
        if done.exists():
            return venv_python
        shutil.rmtree(target, ignore_errors=True)  # a build that was interrupted
        subprocess.run([python, "-m", "venv", str(target)], check=True, timeout=300)
        install = subprocess.run(
            [
                str(venv_python),
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "-q",
                *REQUIREMENTS,
            ],
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT_S,
        )
        if install.returncode != 0:
            shutil.rmtree(target, ignore_errors=True)
            pytest.fail(
                f"could not install {', '.join(REQUIREMENTS)} from PyPI into {target} "
                "(is PyPI reachable?):\n" + install.stderr[-4000:]
            )
        done.write_text("\n".join(REQUIREMENTS) + "\n")
    return venv_python


def start_sdk_interceptor(
    log_dir: Path, *, dial_url: str, port: int | None = None
) -> tuple[int, subprocess.Popen[bytes]]:
    """Run `apps/sdk_interceptor.py` from the SDK's virtualenv; returns its port and process."""
    python = ensure_venv()
    port = port or free_port()
    log = log_dir / f"sdk-interceptor-{port}.log"
    env = {
        k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH")
    }
    env["PYTHONPATH"] = str(TESTS_DIR)
    env["DIAL_URL"] = dial_url
    args = [str(python), "-m", "uvicorn", "apps.sdk_interceptor:app"]
    args += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    with log.open("wb") as out:
        process = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=TESTS_DIR
        )
    _wait_healthy(f"http://127.0.0.1:{port}/health", process, log)
    return port, process
