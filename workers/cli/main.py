"""The `lukhas` command: run the stack or a worker, call the slices, watch MATRIZ.

Process wiring lives in `workers/`; its modules are imported inside the commands that need
them, so `lukhas --help` and the client commands start fast.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio

from lukhas import __version__
from lukhas.config import Settings
from lukhas.errors import ConfigError
from lukhas.subjects import OBSERVABILITY_STATS
from lukhas.transparency import cli as consent_cli

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_PORT = 4222

EPILOG = """\
environment: LUKHAS_DRY_RUN_MODE, LUKHAS_OFFLINE, NATS_URL, FEATURE_* flags and more; see
README.md. Examples:
  lukhas up                                  # embedded nats-server + slices + observability
  lukhas request lukhas.governance.consent.record '{"user_id":"u1","scope":"gmail.read"}'
  echo '{"ctx":{"k":"v"}}' | lukhas request lukhas.orchestration.context.handoff -
  lukhas matriz tail 'matriz.CONSENT.>'
exit status: 0 done; 1 the service answered ok:false (health: none answered); 2 could not
do it (usage, configuration, connection, timeout, permission), message on stderr.
"""

#: Exit statuses (see EPILOG).
EXIT_FAILED_REPLY = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
#: What a shell reports for a process killed by SIGPIPE (`lukhas matriz stats | head`).
EXIT_BROKEN_PIPE = 141


class CliError(Exception):
    """The command cannot run as asked; `main` prints `lukhas: <message>` and exits 2."""


def _print(line: str) -> None:
    print(line, flush=True)


def _client_url(args: argparse.Namespace, settings: Settings) -> str:
    return args.nats_url or settings.nats_url or DEFAULT_NATS_URL


def _client_settings(args: argparse.Namespace, settings: Settings) -> Settings:
    """Settings for a command that talks to a running stack over NATS.

    Raises:
        CliError: LUKHAS_OFFLINE is on, which forbids any network connection.
    """
    from dataclasses import replace

    if settings.offline:
        raise CliError(
            f"LUKHAS_OFFLINE=true forbids network connections, and `lukhas {args.command}` "
            "talks to a running stack over NATS. Unset LUKHAS_OFFLINE, or stay in one process "
            "(`LUKHAS_OFFLINE=true lukhas demo`, or the Python API: see README)"
        )
    return replace(settings, nats_url=_client_url(args, settings), dry_run=False, offline=False)


def _read_body(text: str) -> object:
    """The request body: JSON text, `-` for standard input, or `@path` for a file.

    Raises:
        CliError: the file cannot be read or the body is not JSON.
    """
    where = "the request body"
    if text == "-":
        where = "standard input"
        text = sys.stdin.read()
    elif text.startswith("@"):
        where = text[1:]
        try:
            text = Path(where).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CliError(f"cannot read the request body from {where}: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"{where} is not JSON: {exc}") from None


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from dataclasses import replace

    from workers.service.stack import default_workers, run_up

    port = DEFAULT_PORT if args.port is None else args.port
    workers = default_workers() if args.workers is None else args.workers
    if workers < 1:
        raise CliError(f"--workers must be at least 1, not {workers}")
    metrics_port = args.metrics_port
    if args.join:
        if settings.offline:
            raise CliError("--join needs the network, and LUKHAS_OFFLINE=true forbids it")
        if settings.nats_url is None:
            settings = replace(settings, nats_url=f"nats://127.0.0.1:{port}")
        # The joined stack already aggregates MATRIZ (one durable consumer) and serves
        # /metrics: a joiner adds slice capacity only.
    anyio.run(
        lambda: run_up(
            settings, ready=_print, port=port, data_dir=args.data_dir,
            metrics_port=metrics_port, observability=not args.join, workers=workers,
            gateway_port=args.gateway_port,
        ),
        backend="asyncio",
    )
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from workers.service.stack import run_worker

    if settings.nats_url is None and not settings.uses_memory_bus:
        raise ConfigError("NATS_URL", "", "the URL of the NATS server this worker joins")
    anyio.run(lambda: run_worker(settings, args.name, ready=_print), backend="asyncio")
    return 0


def cmd_request(args: argparse.Namespace, settings: Settings) -> int:
    from workers.cli.client import request_json

    body = _read_body(args.body)
    client = _client_settings(args, settings)
    reply = anyio.run(
        lambda: request_json(client, args.subject, body, args.timeout), backend="asyncio",
    )
    _print(json.dumps(reply, indent=2 if args.pretty else None))
    return 0 if reply.get("ok", True) is not False else EXIT_FAILED_REPLY


def cmd_matriz(args: argparse.Namespace, settings: Settings) -> int:
    from workers.cli import client

    client_settings = _client_settings(args, settings)
    if args.matriz_command == "tail":
        anyio.run(
            lambda: client.tail_matriz(client_settings, args.filter, args.count, _print),
            backend="asyncio",
        )
        return 0
    snapshot = anyio.run(
        lambda: client.request_json(client_settings, OBSERVABILITY_STATS, {}, args.timeout),
        backend="asyncio",
    )
    if args.json:
        _print(json.dumps(snapshot, indent=2))
    else:
        client.print_stats_table(snapshot)
    return 0


def cmd_health(args: argparse.Namespace, settings: Settings) -> int:
    from workers.cli.client import ping_service

    client = _client_settings(args, settings)
    answer = anyio.run(lambda: ping_service(client, args.timeout), backend="asyncio")
    if answer is None:
        print(f"lukhas: no slice service answered at {client.nats_url} within "
              f"{args.timeout:g} s", file=sys.stderr)
        return EXIT_FAILED_REPLY
    _print(f"slice service {answer.name} {answer.version} (instance {answer.id}) answered "
           f"in {answer.elapsed_ms:.1f} ms")
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from workers.cli.demo import run_demo

    ok = anyio.run(
        lambda: run_demo(settings, nats_url=args.nats_url, default_url=DEFAULT_NATS_URL,
                         out=_print),
        backend="asyncio",
    )
    return 0 if ok else EXIT_FAILED_REPLY


def cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    from pathlib import Path

    from workers.tools.verify import run_verify

    repo = Path(args.repo) if args.repo else Path(__file__).resolve().parents[2]
    junit = Path(args.junit) if args.junit else None
    passed, _ = anyio.run(
        lambda: run_verify(repo=repo, out=_print, rate=args.rate, duration_s=args.duration,
                           skip_tests=args.skip_tests, junit=junit),
        backend="asyncio",
    )
    return 0 if passed else 1


def cmd_asyncapi(args: argparse.Namespace, settings: Settings) -> int:
    from pathlib import Path

    from workers.tools.asyncapi import build_document, render

    text = render(build_document())  # default settings: the published contract, not this env
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    from workers.tools.bench import run_bench

    anyio.run(
        lambda: run_bench(settings, out=_print, json_output=args.json,
                          duration_s=args.duration, quick=args.quick),
        backend="asyncio",
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lukhas",
        description="LUKHAS slices (consent ledger, passkey verify, context handoff) over NATS.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"lukhas {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser(
        "up", help="run the whole stack: embedded nats-server (unless NATS_URL), slices, "
        "observability; prints 'ready' when serving",
    )
    up.add_argument("--port", type=int, default=None,
                    help=f"embedded nats-server port (default {DEFAULT_PORT}; 0 = any free port)")
    up.add_argument("--data-dir", default=None,
                    help="where the embedded server keeps JetStream data (default LUKHAS_DATA_DIR "
                    "or ./.lukhas)")
    up.add_argument("--metrics-port", type=int, default=None,
                    help="Prometheus /metrics port (default LUKHAS_METRICS_PORT or 9464; 0 = free)")
    up.add_argument("--gateway-port", type=int, default=None,
                    help="passkey page and dashboard port (default LUKHAS_GATEWAY_PORT or 8000; "
                    "0 = free)")
    up.add_argument("--join", action="store_true",
                    help="when a stack already runs on the port (or NATS_URL), add a slice "
                    "worker to its queue group instead of refusing")
    up.add_argument("--workers", type=int, default=None, metavar="N",
                    help="slice worker processes in the queue group (default: the number of "
                    "CPUs; one on the in-memory bus); the observability worker runs once")
    up.set_defaults(func=cmd_up)

    worker = commands.add_parser("worker", help="run one worker against NATS_URL (containers)")
    worker.add_argument("name", choices=["slices", "observability", "gateway"])
    worker.set_defaults(func=cmd_worker)

    def client_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--nats-url", default=None,
                       help=f"NATS server (default NATS_URL or {DEFAULT_NATS_URL})")
        p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait (default 5)")

    request = commands.add_parser(
        "request", help="send one JSON request, print the reply; exit 1 on an error reply"
    )
    request.add_argument("subject", help="e.g. lukhas.governance.consent.record")
    request.add_argument("body", nargs="?", default="{}",
                         help="the JSON request body; '-' reads standard input, '@FILE' a file "
                         "(default {})")
    request.add_argument("--pretty", action="store_true", help="indent the reply")
    client_options(request)
    request.set_defaults(func=cmd_request)

    matriz = commands.add_parser("matriz", help="watch the MATRIZ stream")
    matriz_commands = matriz.add_subparsers(dest="matriz_command", required=True, metavar="WHAT")
    tail = matriz_commands.add_parser("tail", help="print nodes as they are emitted")
    tail.add_argument("filter", nargs="?", default="matriz.>",
                      help="subject filter (default matriz.>)")
    tail.add_argument("--count", type=int, default=None, help="stop after this many nodes")
    client_options(tail)
    stats = matriz_commands.add_parser("stats", help="table of the observability snapshot")
    stats.add_argument("--json", action="store_true", help="print the raw JSON snapshot")
    client_options(stats)
    matriz.set_defaults(func=cmd_matriz)

    health = commands.add_parser("health", help="exit 0 when the slice service answers pings")
    client_options(health)
    health.set_defaults(func=cmd_health)

    demo = commands.add_parser(
        "demo", help="exercise every slice against a running stack (or an embedded one), "
        "then print the MATRIZ stats",
    )
    demo.add_argument("--nats-url", default=None,
                      help=f"a running stack (default NATS_URL, else {DEFAULT_NATS_URL} if it "
                      "answers, else an embedded stack; in memory under LUKHAS_OFFLINE)")
    demo.set_defaults(func=cmd_demo)

    verify = commands.add_parser(
        "verify", help="acceptance gate: ruff, lane contract, manifests, tests, SLA; writes "
        "artifacts/<git sha>/verify.json and STATUS.md and LUKHAS_SYSTEM_STATUS.md; exit 1 if "
        "any gate fails",
    )
    verify.add_argument("--rate", type=float, default=200.0,
                        help="open-loop requests per second per slice for the SLA check")
    verify.add_argument("--duration", type=float, default=5.0,
                        help="seconds of open-loop load per slice (default 5)")
    verify.add_argument("--skip-tests", action="store_true", help="do not run the test suite")
    verify.add_argument("--junit", default=None,
                        help="take the test gate from this pytest JUnit XML (as `make test` "
                        "wrote it for this commit) instead of running the suite again")
    verify.add_argument("--repo", default=None, help="checkout to check (default: this one)")
    verify.set_defaults(func=cmd_verify)

    bench = commands.add_parser(
        "bench", help="benchmark the slices, MATRIZ emitter, limiter and ledger against raw "
        "nats-py on a nats-server it starts itself",
    )
    bench.add_argument("--json", action="store_true", help="print only the JSON results")
    bench.add_argument("--duration", type=float, default=5.0,
                       help="seconds per measurement (default 5)")
    bench.add_argument("--quick", action="store_true", help="short runs, for smoke tests")
    bench.set_defaults(func=cmd_bench)

    asyncapi = commands.add_parser(
        "asyncapi", help="print the AsyncAPI 3.0 document of every subject (JSON), generated "
        "from the endpoint declarations",
    )
    asyncapi.add_argument("--output", default=None,
                          help="write it to this file (e.g. asyncapi.json) instead of stdout")
    asyncapi.set_defaults(func=cmd_asyncapi)

    consent_cli.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; see EPILOG for the exit statuses."""
    try:
        code = _main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not as noise at interpreter exit
    except BrokenPipeError:
        return _stdout_gone()
    return code


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"lukhas: configuration error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args, settings))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:  # the command-line boundary: one clear line, no traceback
        from bus import BusError
        from lukhas.errors import LukhasError

        cause = _single_cause(exc)
        if isinstance(cause, BrokenPipeError) or (
            isinstance(cause, OSError) and cause.errno == errno.EPIPE
        ):
            return _stdout_gone()
        if isinstance(cause, CliError | BusError | LukhasError | OSError | TimeoutError):
            print(f"lukhas: {cause}", file=sys.stderr)
            return EXIT_ERROR
        raise


def _stdout_gone() -> int:
    """The reader of our output went away (`| head`): stop quietly, as `yes | head` does."""
    # Point stdout at /dev/null so the interpreter's final flush has nowhere to fail.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_BROKEN_PIPE


def _single_cause(exc: BaseException) -> BaseException:
    """The one real error inside (possibly nested) single-member exception groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

