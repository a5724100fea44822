"""`lukhas consent verify-proof | vkey | keygen`: the offline side of the verifiable ledger.

`workers/cli/main.py` wires these in with `add_parser(commands)` (or, when it already has a
`consent` command, `add_commands(consent_subcommands)`). Every command here works with no server.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lukhas.config import Settings
from lukhas.errors import ConfigError


def _out(line: str) -> None:
    print(line, flush=True)


def _read(path: str) -> bytes:
    return sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()


def _key_text(value: str) -> str:
    """A vkey given inline, or the path of a file holding one."""
    if "+" not in value and Path(value).is_file():
        return Path(value).read_text().strip()
    return value.strip()


def cmd_verify_proof(args: argparse.Namespace, settings: Settings) -> int:
    from lukhas.transparency.bundle import verify_bundle

    try:
        data = _read(args.file)
        earlier = _read(getattr(args, "from")) if getattr(args, "from") else None
        vkey = _key_text(args.key)
    except OSError as exc:
        print(f"lukhas: {exc}", file=sys.stderr)
        return 2
    report = verify_bundle(data, vkey, earlier)
    if args.json:
        _out(json.dumps(report.to_dict(), indent=2))
    else:
        for line in report.lines():
            _out(line)
    return 0 if report.ok else 1


def cmd_vkey(args: argparse.Namespace, settings: Settings) -> int:
    from lukhas.transparency.keys import VARIABLE, ledger_signer

    if settings.ledger_signing_key is None:
        raise ConfigError(VARIABLE, "", "the ledger's signer key, to print its verifier key")
    signer = ledger_signer(settings.ledger_signing_key, dry_run=settings.dry_run,
                           ledger_enabled=True)
    _out(str(signer.verifier))
    return 0


def cmd_keygen(args: argparse.Namespace, settings: Settings) -> int:
    from lukhas.transparency.errors import MalformedKey
    from lukhas.transparency.keys import RESERVED_PREFIX, VARIABLE
    from lukhas.transparency.note import Signer

    if args.origin.startswith(RESERVED_PREFIX):
        print(f"lukhas: an origin must not start with {RESERVED_PREFIX}", file=sys.stderr)
        return 2
    try:
        signer = Signer.generate(args.origin)
    except MalformedKey as exc:
        print(f"lukhas: {exc}", file=sys.stderr)
        return 2
    _out(f"{VARIABLE}={signer.private_key_string()}")
    print(f"verifier key (publish this): {signer.verifier}", file=sys.stderr)
    return 0


def add_commands(consent: Any) -> None:
    """Add verify-proof, vkey and keygen to an existing `consent` subparsers object."""
    verify = consent.add_parser(
        "verify-proof", help="check a proof bundle or tlog-proof offline: checkpoint signature, "
        "inclusion and authenticity of each record, consistency with --from; exit 1 if not",
    )
    verify.add_argument("file", help="the bundle (JSON) or .tlog-proof file; - for stdin")
    verify.add_argument("--key", required=True,
                        help="the ledger's verifier key (name+id+key), or a file holding it")
    verify.add_argument("--from", default=None, metavar="CHECKPOINT_FILE",
                        help="an earlier signed checkpoint you hold: also prove the log only grew")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    verify.set_defaults(func=cmd_verify_proof)

    vkey = consent.add_parser(
        "vkey", help="print the verifier key of LUKHAS_LEDGER_SIGNING_KEY (publish it)"
    )
    vkey.set_defaults(func=cmd_vkey)

    keygen = consent.add_parser(
        "keygen", help="make a new ledger signing key; prints the LUKHAS_LEDGER_SIGNING_KEY line "
        "on stdout and the verifier key on stderr",
    )
    keygen.add_argument("origin", help="the log's name, e.g. consent.example.com/ledger")
    keygen.set_defaults(func=cmd_keygen)


def add_parser(commands: Any) -> Any:
    """Add the `consent` command to the top-level subparsers; return its subcommands."""
    consent = commands.add_parser("consent", help="verifiable consent ledger: offline proofs, keys")
    sub = consent.add_subparsers(dest="consent_command", required=True, metavar="WHAT")
    add_commands(sub)
    return sub
