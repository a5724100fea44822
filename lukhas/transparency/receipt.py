"""Consent receipts: one record's consent, shaped after ISO/IEC TS 27560 and the Kantara Consent
Receipt, signed by the ledger key as a C2SP signed note so anyone with the vkey can check it.

Why a signed note and not a JWS: checkpoints and records already use signed notes, so one key
string (`lukhas consent vkey`) verifies all three, with no JOSE library, no algorithm header to
negotiate (no `alg: none` or HMAC/RSA confusion) and no JSON canonicalisation: the JSON is
carried verbatim as the signed text. Note text:

```
lukhas/consent-receipt/v1
<compact JSON receipt>
```
"""

from __future__ import annotations

import msgspec

from lukhas.transparency.errors import MalformedRecord
from lukhas.transparency.merkle import leaf_hash
from lukhas.transparency.note import Signer, Verifier, b64encode, open_note, sign_note

RECEIPT_HEADER = "lukhas/consent-receipt/v1"


class ReceiptPurpose(msgspec.Struct, frozen=True, omit_defaults=True):
    """One purpose consented to (27560 "purpose"; Kantara `services[].purposes[]`)."""

    purpose: str
    lawful_basis: str = "dpv:Consent"
    consent_type: str = "explicit"


class ConsentReceipt(msgspec.Struct, frozen=True, omit_defaults=True):
    """A consent receipt (27560 consent record fields; Kantara CR v1.1 names in comments).

    `pii_principal` is the keyed pseudonym, never the raw user id. `log_origin`, `leaf_index` and
    `leaf_hash` tie the receipt to the record's leaf in the verifiable ledger.
    """

    receipt_id: str  # consentReceiptID
    issued_at: str  # RFC 3339
    pii_principal: str  # piiPrincipalId (pseudonym)
    controller: str  # piiControllers[].piiController
    purposes: tuple[ReceiptPurpose, ...]  # services[].purposes[]
    status: str  # DPV: dpv:ConsentGiven | ConsentRefused | ConsentWithdrawn | ... (27560 state)
    event_time: str  # consentTimestamp
    log_origin: str
    leaf_index: int
    leaf_hash: str  # base64 SHA-256(0x00 || leaf)
    schema: str = "lukhas.consent-receipt/1 (ISO/IEC TS 27560)"  # version
    collection_method: str | None = None  # collectionMethod
    notice: str | None = None  # policyUrl / notice version
    jurisdiction: str | None = None  # jurisdiction
    expires_at: str | None = None  # purposes[].termination / validity
    language: str | None = None  # language


_encoder = msgspec.json.Encoder(order="sorted")
_decoder = msgspec.json.Decoder(ConsentReceipt)


def receipt_leaf_hash(leaf: bytes) -> str:
    """The `leaf_hash` value for a receipt of the record with leaf data `leaf`."""
    return b64encode(leaf_hash(leaf))


def sign_receipt(signer: Signer, receipt: ConsentReceipt) -> bytes:
    """The receipt as a signed note."""
    return sign_note(f"{RECEIPT_HEADER}\n{_encoder.encode(receipt).decode()}\n", signer)


def open_receipt(note: bytes, verifier: Verifier, *, leaf: bytes | None = None) -> ConsentReceipt:
    """Verify a signed receipt and return it; with `leaf`, also check it is that record's.

    Raises:
        MalformedNote, InvalidSignature, UnverifiedNote: not signed by the ledger key.
        MalformedRecord: not a receipt of this log, or not for `leaf`.
    """
    text = open_note(note, [verifier]).text
    lines = text[:-1].split("\n")
    if len(lines) != 2 or lines[0] != RECEIPT_HEADER:
        raise MalformedRecord("the note is not a lukhas consent receipt")
    try:
        receipt = _decoder.decode(lines[1])
    except msgspec.DecodeError as exc:
        raise MalformedRecord(f"the receipt does not match its schema: {exc}") from None
    if receipt.log_origin != verifier.name:
        raise MalformedRecord(f"the receipt is from log {receipt.log_origin!r}")
    if leaf is not None and receipt.leaf_hash != receipt_leaf_hash(leaf):
        raise MalformedRecord("the receipt is not for this record")
    return receipt
