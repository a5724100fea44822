"""Run Prometheus' `promtool` (Debian package `prometheus`; `make tools`).

Missing promtool skips the test on a developer machine but fails it in CI (`CI=true`), where
`.ci/run` installs it first, so a check can never silently stop running there.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import anyio
import pytest


def promtool_path() -> str:
    path = shutil.which("promtool")
    if path is None:
        message = "promtool not installed (run make tools)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


async def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """`promtool <args>` with `stdin`, run in a thread; returns the finished process."""
    command = [promtool_path(), *args]
    return await anyio.to_thread.run_sync(
        lambda: subprocess.run(
            command, input=stdin, capture_output=True, text=True, timeout=60, check=False
        )
    )
