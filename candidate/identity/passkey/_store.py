"""Passkey state in JetStream KV: credentials (and a per-user index) and single-use challenges."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from typing import Literal

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from candidate.identity.passkey._ceremony import Refused, b64url

CeremonyKind = Literal["registration", "authentication"]

#: Bytes of randomness in every challenge we issue; anything else was not issued here.
CHALLENGE_BYTES = 32
#: Longest base64url credential id used verbatim as a KV key; longer ones are hashed.
_MAX_VERBATIM_KEY = 200
#: Compare-and-set retries before giving up on a contended KV key.
_CAS_ATTEMPTS = 64


class StoredCredential(msgspec.Struct, frozen=True, kw_only=True):
    """One registered passkey: what verification needs, plus what an operator audits."""

    credential_id: str  # base64url
    public_key: str  # base64url COSE_Key
    alg: int  # COSE algorithm
    sign_count: int
    user_handle: str  # base64url, derived from the pseudonym
    pseudonym: str
    transports: list[str] = []
    backup_eligible: bool = False
    backed_up: bool = False
    device_type: str = "single_device"
    aaguid: str = ""
    attestation_format: str = "none"
    created_at: int = 0
    last_used_at: int | None = None


class CredentialRef(msgspec.Struct, frozen=True):
    id: str
    transports: list[str] = []


class UserIndex(msgspec.Struct, frozen=True):
    credentials: list[CredentialRef] = []


class ChallengeRecord(msgspec.Struct, frozen=True, kw_only=True):
    kind: str
    expires_at: int  # ms since the epoch
    pseudonym: str | None = None
    used: bool = False


def credential_key(credential_id: bytes) -> str:
    """KV key of a credential: `cred.<base64url id>` (base64url is within the KV key
    alphabet and has no `.`), or `cred.h.<sha256 hex>` for ids too long to be a key."""
    token = b64url(credential_id)
    if len(token) <= _MAX_VERBATIM_KEY:
        return f"cred.{token}"
    return f"cred.h.{hashlib.sha256(credential_id).hexdigest()}"


def user_key(pseudonym: str) -> str:
    return f"user.{pseudonym}"


class CredentialStore:
    """Credentials by id, and each user's credential ids, in one KV bucket."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    async def get(self, credential_id: bytes) -> tuple[StoredCredential, int] | None:
        """The credential and its KV revision, or None if unknown."""
        try:
            entry = await self._kv.get(credential_key(credential_id))
        except KeyNotFoundError:
            return None
        return msgspec.json.decode(entry.value or b"", type=StoredCredential), entry.revision

    async def add(self, credential: StoredCredential, credential_id: bytes) -> bool:
        """Store a new credential and index it under its user; False if the id is taken."""
        try:
            await self._kv.create(credential_key(credential_id), msgspec.json.encode(credential))
        except KeyWrongLastSequenceError:
            return False
        ref = CredentialRef(credential.credential_id, credential.transports)
        for _ in range(_CAS_ATTEMPTS):
            key = user_key(credential.pseudonym)
            try:
                entry = await self._kv.get(key)
            except KeyNotFoundError:
                entry = None
            try:
                if entry is None:
                    await self._kv.create(key, msgspec.json.encode(UserIndex([ref])))
                else:
                    index = msgspec.json.decode(entry.value or b"", type=UserIndex)
                    updated = UserIndex([*index.credentials, ref])
                    await self._kv.update(key, msgspec.json.encode(updated), last=entry.revision)
                return True
            except KeyWrongLastSequenceError:
                continue
        raise RuntimeError(f"could not index a credential under {credential.pseudonym}")

    async def replace(
        self, credential_id: bytes, credential: StoredCredential, *, revision: int
    ) -> bool:
        """Compare-and-set: write `credential` if the stored revision is still `revision`."""
        try:
            await self._kv.update(
                credential_key(credential_id), msgspec.json.encode(credential), last=revision
            )
        except KeyWrongLastSequenceError:
            return False
        return True

    async def refs_of(self, pseudonym: str) -> list[CredentialRef]:
        try:
            entry = await self._kv.get(user_key(pseudonym))
        except KeyNotFoundError:
            return []
        return msgspec.json.decode(entry.value or b"", type=UserIndex).credentials


class ChallengeStore:
    """Single-use, expiring challenges; the KV key is the challenge itself (base64url).

    The bucket's TTL removes entries once they have expired; until then a consumed
    challenge stays as a `used` marker, so a replay is told `challenge_reused`.
    """

    def __init__(self, kv: KeyValue, *, clock: Callable[[], float]) -> None:
        self._kv = kv
        self._clock = clock

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    async def issue(self, kind: CeremonyKind, *, ttl_s: float, pseudonym: str | None) -> bytes:
        challenge = secrets.token_bytes(CHALLENGE_BYTES)
        record = ChallengeRecord(
            kind=kind, expires_at=self.now_ms() + int(ttl_s * 1000), pseudonym=pseudonym
        )
        await self._kv.create(b64url(challenge), msgspec.json.encode(record))
        return challenge

    async def lookup(self, challenge: bytes, kind: CeremonyKind) -> tuple[ChallengeRecord, int]:
        """The live challenge record and its revision.

        Raises:
            Refused: challenge_expired (never issued here, expired, or already removed),
                challenge_reused (consumed before), invalid_assertion (other ceremony).
        """
        if len(challenge) != CHALLENGE_BYTES:
            raise Refused("challenge_expired", "no live challenge matches the response")
        try:
            entry = await self._kv.get(b64url(challenge))
        except KeyNotFoundError:
            raise Refused(
                "challenge_expired", "no live challenge matches (expired or never issued)"
            ) from None
        try:
            record = msgspec.json.decode(entry.value or b"", type=ChallengeRecord)
        except msgspec.DecodeError:
            raise Refused("invalid_assertion", "the stored challenge is unreadable") from None
        if record.used:
            raise Refused("challenge_reused", "the challenge was already used")
        if self.now_ms() >= record.expires_at:
            raise Refused("challenge_expired", "the challenge has expired")
        if record.kind != kind:
            raise Refused("invalid_assertion", f"the challenge was issued for {record.kind}")
        return record, entry.revision

    async def consume(self, challenge: bytes, record: ChallengeRecord, *, revision: int) -> None:
        """Mark the challenge used, atomically: of concurrent consumers exactly one wins.

        Raises:
            Refused: challenge_reused, another response consumed it first.
        """
        used = msgspec.structs.replace(record, used=True)
        try:
            await self._kv.update(b64url(challenge), msgspec.json.encode(used), last=revision)
        except KeyWrongLastSequenceError:
            raise Refused("challenge_reused", "the challenge was already used") from None
