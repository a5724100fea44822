"""Run `lukhas` commands as real child processes, the way a user or a container does."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

BASE_ENV = {
    "LUKHAS_PSEUDONYM_KEY": "integration-test-pseudonym-key-0123456789",
    "LUKHAS_METRICS_PORT": "0",
    # `lukhas up` serves the pages on 8000 by default; tests must not collide on it.
    "LUKHAS_GATEWAY_PORT": "0",
    "LUKHAS_LOG_LEVEL": "INFO",
}


class LukhasProcess:
    """A `python -m workers.cli.main ...` child; its stdout lines are read by a thread."""

    def __init__(self, *args: str, env: Mapping[str, str] | None = None) -> None:
        full_env = {**os.environ, **BASE_ENV, **(env or {})}
        for name in ("LUKHAS_DRY_RUN_MODE", "LUKHAS_OFFLINE"):
            if env is None or name not in env:
                full_env.pop(name, None)
        self.args = args
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workers.cli.main", *args],
            cwd=REPO, env=full_env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, True), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, False), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _pump(self, stream: object, is_stdout: bool) -> None:
        for line in stream:  # type: ignore[attr-defined]
            (self.stdout if is_stdout else self.stderr).append(line.rstrip("\n"))
            if is_stdout:
                self.lines.put(line.rstrip("\n"))
        if is_stdout:
            self.lines.put(None)

    def wait_for_line(self, needle: str, timeout: float = 30.0) -> str:
        """Block until a stdout line contains `needle`; fail with the process's output if not."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            if needle in line:
                return line
        raise AssertionError(
            f"{self.args} printed no line with {needle!r} in {timeout}s "
            f"(exit {self.proc.poll()});\nstdout: {self.stdout[-20:]}\nstderr: {self.stderr[-30:]}"
        )

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        code = self.proc.wait(timeout)
        for thread in self._threads:
            thread.join(timeout)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return code

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait for a graceful exit (SIGKILL if it does not come)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.wait(timeout)
            raise


@contextmanager
def running(*args: str, env: Mapping[str, str] | None = None, ready: str = "ready",
            timeout: float = 60.0) -> Iterator[LukhasProcess]:
    """Start a `lukhas` process, wait for its ready line, and always stop it afterwards."""
    proc = LukhasProcess(*args, env=env)
    try:
        proc.wait_for_line(ready, timeout)
        yield proc
    finally:
        if proc.proc.poll() is None:
            # SIGTERM, as a user stops it: `lukhas up` then stops the nats-server it started,
            # which a SIGKILL would leave running. A stop that hangs is killed (a test that
            # checks shutdown asserts on it itself).
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.stop(timeout)
