"""Errors of the transparency-log library: one base, one subclass per condition."""

from __future__ import annotations

from lukhas.errors import LukhasError


class TransparencyError(LukhasError):
    """Something the verifier refuses: a malformed format, a bad key, signature or proof."""

    code = "verification_failed"


class MalformedKey(TransparencyError):
    """A note signer or verifier key string is not of the signed-note key format."""

    code = "invalid_key"


class MalformedNote(TransparencyError):
    """The bytes are not a signed note (C2SP signed-note syntax)."""


class UnverifiedNote(TransparencyError):
    """No signature on the note is from a key the verifier knows."""

    def __init__(self, message: str, signers: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.signers = signers


class InvalidSignature(TransparencyError):
    """A signature from a known key does not verify: the text or signature was altered."""


class MalformedCheckpoint(TransparencyError):
    """The note text is not a C2SP tlog-checkpoint."""


class ProofError(TransparencyError):
    """An inclusion or consistency proof does not verify, or is malformed."""


class MalformedProof(TransparencyError):
    """A tlog-proof text or a proof bundle does not follow its format."""


class MalformedRecord(TransparencyError):
    """A leaf is not a ledger record note, or its record is not for this log and index."""


class UnauthenticatedRecord(TransparencyError):
    """A leaf's record tag is missing or is not the ledger's: forged, altered or foreign."""
