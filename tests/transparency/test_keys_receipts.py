"""Ledger key configuration, the consent CLI commands, receipts and sealed personal data."""

from __future__ import annotations

import pytest

from lukhas.config import Settings
from lukhas.errors import ConfigError
from lukhas.transparency.errors import InvalidSignature, MalformedRecord, UnverifiedNote
from lukhas.transparency.keys import ledger_signer
from lukhas.transparency.note import Signer
from lukhas.transparency.receipt import (
    ConsentReceipt,
    ReceiptPurpose,
    open_receipt,
    receipt_leaf_hash,
    sign_receipt,
)
from lukhas.transparency.record import RecordKey, make_leaf
from lukhas.transparency.sealed import (
    SealError,
    new_data_key,
    seal,
    unseal,
    unwrap_data_key,
    wrap_data_key,
)
from workers.cli.main import build_parser

from ._log import Log

ORIGIN = "consent.example.com/ledger"
PETER_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"


def test_settings_read_and_hide_the_key() -> None:
    skey = Signer.generate(ORIGIN).private_key_string()
    settings = Settings.from_env({"LUKHAS_LEDGER_SIGNING_KEY": skey})
    assert settings.ledger_signing_key == skey
    # PRIVATE+KEY+<origin>+<key hash>+<base64 key>: the base64 may itself hold a "+".
    key_material = skey.split("+", 4)[4]
    assert key_material and key_material not in repr(settings)
    assert Settings.from_env({}).ledger_signing_key is None


@pytest.mark.parametrize("value", [
    "nonsense",
    "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",  # a verifier key
    PETER_SKEY[:-2] + "AA",  # key id no longer matches
    PETER_SKEY,  # published in golang.org/x/mod's tests
    "PRIVATE+KEY+lukhas/x+00000000+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz",
])
def test_bad_keys_are_config_errors_that_hide_the_value(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"LUKHAS_LEDGER_SIGNING_KEY": value})
    assert info.value.variable == "LUKHAS_LEDGER_SIGNING_KEY"
    assert "AYEK" not in str(info.value) and "Rpc2" not in str(info.value)


def test_published_key_only_in_dry_run() -> None:
    env = {"LUKHAS_LEDGER_SIGNING_KEY": PETER_SKEY, "LUKHAS_DRY_RUN_MODE": "true"}
    assert Settings.from_env(env).ledger_signing_key == PETER_SKEY


def test_missing_key_with_the_ledger_on() -> None:
    with pytest.raises(ConfigError, match="LUKHAS_LEDGER_SIGNING_KEY"):
        ledger_signer(None, dry_run=False, ledger_enabled=True)
    assert ledger_signer(None, dry_run=True, ledger_enabled=True).name.endswith(".invalid/consent")
    skey = Signer.generate(ORIGIN).private_key_string()
    assert ledger_signer(skey, dry_run=False, ledger_enabled=True).name == ORIGIN


def _parser():
    return build_parser()  # `lukhas consent ...` is part of the command line


def test_cli_vkey_keygen_and_verify_proof(tmp_path, capsys) -> None:
    parser = _parser()
    args = parser.parse_args(["consent", "keygen", ORIGIN])
    assert args.func(args, Settings()) == 0
    out, err = capsys.readouterr()
    skey = out.strip().split("=", 1)[1]
    signer = Signer.parse(skey)
    assert str(signer.verifier) in err

    settings = Settings.from_env({"LUKHAS_LEDGER_SIGNING_KEY": skey})
    args = parser.parse_args(["consent", "vkey"])
    assert args.func(args, settings) == 0
    vkey = capsys.readouterr().out.strip()
    assert vkey == str(signer.verifier)

    log = Log(signer)
    for i in range(20):
        log.append({"event": "given", "subject": f"p{i % 3}"})
    (tmp_path / "held.checkpoint").write_bytes(log.checkpoint(11))
    (tmp_path / "bundle.json").write_bytes(log.bundle([0, 3, 6], from_size=11))
    (tmp_path / "vkey").write_text(vkey + "\n")
    args = parser.parse_args(["consent", "verify-proof", str(tmp_path / "bundle.json"),
                              "--key", str(tmp_path / "vkey"),
                              "--from", str(tmp_path / "held.checkpoint")])
    assert args.func(args, settings) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK") and "consistency with your earlier checkpoint: ok" in out

    forged = Log(signer)
    for i in range(20):
        forged.append({"event": "refused" if i == 4 else "given", "subject": f"p{i % 3}"})
    (tmp_path / "forged.json").write_bytes(forged.bundle([0], from_size=11))
    args = parser.parse_args(["consent", "verify-proof", str(tmp_path / "forged.json"),
                              "--key", vkey, "--from", str(tmp_path / "held.checkpoint"),
                              "--json"])
    assert args.func(args, settings) == 1
    assert '"consistency": "failed"' in capsys.readouterr().out

    args = parser.parse_args(["consent", "verify-proof", str(tmp_path / "missing"), "--key", vkey])
    assert args.func(args, settings) == 2


def test_vkey_without_a_key_is_a_config_error() -> None:
    args = _parser().parse_args(["consent", "vkey"])
    with pytest.raises(ConfigError):
        args.func(args, Settings())


def test_receipt_round_trip_and_tampering() -> None:
    signer = Signer.generate(ORIGIN)
    leaf = make_leaf(RecordKey.of(signer), 0, {"event": "given"})
    receipt = ConsentReceipt(
        receipt_id="r-1", issued_at="2025-01-01T00:00:00Z", pii_principal="pseudonym",
        controller="Example Ltd", purposes=(ReceiptPurpose("gmail.read"),),
        status="dpv:ConsentGiven", event_time="2025-01-01T00:00:00Z", log_origin=ORIGIN,
        leaf_index=0, leaf_hash=receipt_leaf_hash(leaf), jurisdiction="EU",
    )
    note = sign_receipt(signer, receipt)
    assert note.startswith(b"lukhas/consent-receipt/v1\n{")
    assert open_receipt(note, signer.verifier, leaf=leaf) == receipt
    with pytest.raises(InvalidSignature):
        open_receipt(note.replace(b"gmail.read", b"gmail.send"), signer.verifier)
    with pytest.raises(MalformedRecord):
        open_receipt(note, signer.verifier,
                     leaf=make_leaf(RecordKey.of(signer), 1, {"event": "given"}))
    with pytest.raises(UnverifiedNote):  # a record (tagged, not signed) is not a receipt
        open_receipt(leaf, signer.verifier)


def test_sealed_data_and_shredding() -> None:
    wrapping, key = new_data_key(), new_data_key()
    wrapped = wrap_data_key(wrapping, key)
    sealed = seal(key, "dk-1", b'{"email":"a@example.com"}', aad=b"subject")
    assert b"example" not in sealed.ct.encode()
    assert unseal(unwrap_data_key(wrapping, wrapped), sealed, aad=b"subject").startswith(b"{")
    with pytest.raises(SealError):
        unseal(new_data_key(), sealed, aad=b"subject")  # the key was destroyed and replaced
    with pytest.raises(SealError):
        unseal(key, sealed, aad=b"other subject")
    with pytest.raises(SealError):
        unwrap_data_key(new_data_key(), wrapped)
