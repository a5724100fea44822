"""Passkey state in JetStream KV: credentials (and a per-user index) and single-use challenges."""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable, Sequence
from typing import Literal

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import (
    APIError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
)
from nats.js.kv import KeyValue

from candidate._jetstream import WRONG_LAST_SEQUENCE, ensure_kv
from candidate.identity.passkey._ceremony import Refused, b64url

logger = logging.getLogger(__name__)

CeremonyKind = Literal["registration", "authentication"]

#: Bytes of randomness in every challenge we issue; anything else was not issued here.
CHALLENGE_BYTES = 32
#: Longest base64url credential id used verbatim as a KV key; longer ones are hashed.
_MAX_VERBATIM_KEY = 200
#: Compare-and-set retries before giving up on a contended KV key.
_CAS_ATTEMPTS = 64
#: Largest value a challenge or grant record may take (they are about 300 bytes).
MAX_RECORD_BYTES = 2048


async def ensure_bounded_kv(
    js: JetStreamContext, bucket: str, *, replicas: int, ttl_s: float, max_bytes: int
) -> KeyValue:
    """Open (creating if missing) a KV bucket whose storage is bounded: entries expire after
    `ttl_s`, the bucket holds at most `max_bytes` and each value at most MAX_RECORD_BYTES.
    JetStream's KV streams discard new writes when full, so a flood is refused, never stored.
    A bucket made before these bounds existed gets them (its stream config is updated)."""
    kv = await ensure_kv(
        js, bucket, replicas=replicas, ttl_s=ttl_s, max_bytes=max_bytes,
        max_value_size=MAX_RECORD_BYTES,
    )
    info = await js.stream_info(f"KV_{bucket}")
    current = info.config
    if current.max_bytes != max_bytes or current.max_msg_size != MAX_RECORD_BYTES:
        logger.warning("KV bucket %s: applying bounds (max %s bytes)", bucket, max_bytes)
        await js.update_stream(
            current.evolve(max_bytes=max_bytes, max_msg_size=MAX_RECORD_BYTES)
        )
    return kv


def is_storage_full(exc: APIError) -> bool:
    """A write refused because the bucket reached its byte bound (discard new)."""
    return "maximum" in (exc.description or "").lower()


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
    #: The user's pseudonym under the current key (None: usernameless).
    pseudonym: str | None = None
    used: bool = False
    #: The same user's pseudonyms under earlier keys (credentials made before a rotation).
    previous: list[str] = []
    #: The raw user id sealed (AES-GCM) under a key derived from the pseudonym key, so the
    #: verify reply can name the account without any raw id being stored.
    sealed_user: str | None = None
    #: Registration only: an enrolment grant was presented for it (a later credential).
    granted: bool = False

    @property
    def owners(self) -> frozenset[str]:
        """Every pseudonym of the user the challenge was issued to (empty: anyone)."""
        if self.pseudonym is None:
            return frozenset()
        return frozenset([self.pseudonym, *self.previous])


class GrantRecord(msgspec.Struct, frozen=True, kw_only=True):
    """An enrolment grant: the right to add one passkey to the account that just proved itself."""

    pseudonym: str
    expires_at: int  # ms since the epoch


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

    async def add(
        self,
        credential: StoredCredential,
        credential_id: bytes,
        *,
        first_for: Sequence[str] | None = None,
    ) -> bool:
        """Store a new credential and index it under its user; False if the id is taken.

        With `first_for` (the user's pseudonyms) the credential must be the user's first:
        if any of those indexes holds a credential, nothing is stored.

        Raises:
            Refused: enrolment_grant_required, `first_for` was given and the user has one.
        """
        key = credential_key(credential_id)
        try:
            await self._kv.create(key, msgspec.json.encode(credential))
        except KeyWrongLastSequenceError:
            return False
        if first_for is not None:
            for pseudonym in first_for:
                if pseudonym != credential.pseudonym and await self._index(pseudonym):
                    await self._kv.delete(key)
                    raise Refused(
                        "enrolment_grant_required",
                        "the account already has a passkey: adding one needs an enrolment grant",
                    )
        ref = CredentialRef(credential.credential_id, credential.transports)
        for _ in range(_CAS_ATTEMPTS):
            index_key = user_key(credential.pseudonym)
            try:
                entry = await self._kv.get(index_key)
            except KeyNotFoundError:
                entry = None
            index = UserIndex() if entry is None else _decode_index(entry.value)
            if first_for is not None and index.credentials:
                await self._kv.delete(key)
                raise Refused(
                    "enrolment_grant_required",
                    "the account already has a passkey: adding one needs an enrolment grant",
                )
            updated = msgspec.json.encode(UserIndex([*index.credentials, ref]))
            try:
                if entry is None:
                    await self._kv.create(index_key, updated)
                else:
                    await self._kv.update(index_key, updated, last=entry.revision)
                return True
            except KeyWrongLastSequenceError:
                continue
        raise RuntimeError(f"could not index a credential under {credential.pseudonym}")

    async def delete(self, credential_id: bytes, owners: Sequence[str]) -> bool:
        """Delete a credential of one of `owners` and drop it from their index.

        The credential goes first, so once this returns it can never verify again even if
        the index update is interrupted (a later delete finishes that). False if no such
        credential belongs to `owners`.
        """
        token = b64url(credential_id)
        found = await self.get(credential_id)
        deleted = False
        if found is not None:
            stored, _ = found
            if stored.pseudonym not in owners:
                return False
            await self._kv.delete(credential_key(credential_id))
            deleted = True
        for pseudonym in owners:
            deleted = await self._unindex(pseudonym, token) or deleted
        return deleted

    async def _unindex(self, pseudonym: str, token: str) -> bool:
        key = user_key(pseudonym)
        for _ in range(_CAS_ATTEMPTS):
            try:
                entry = await self._kv.get(key)
            except KeyNotFoundError:
                return False
            index = _decode_index(entry.value)
            kept = [ref for ref in index.credentials if ref.id != token]
            if len(kept) == len(index.credentials):
                return False
            try:
                if kept:
                    await self._kv.update(
                        key, msgspec.json.encode(UserIndex(kept)), last=entry.revision
                    )
                else:
                    await self._kv.delete(key, last=entry.revision)
                return True
            except KeyWrongLastSequenceError:
                continue
            except APIError as exc:  # nats-py raises a plain APIError for a CAS delete
                if not _wrong_last(exc):
                    raise
                continue
        raise RuntimeError(f"could not unindex a credential under {pseudonym}")

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

    async def refs_of(self, pseudonyms: Sequence[str]) -> list[CredentialRef]:
        """The credentials indexed under any of a user's pseudonyms (every key version)."""
        refs: list[CredentialRef] = []
        for pseudonym in pseudonyms:
            refs.extend(await self._index(pseudonym))
        return refs

    async def _index(self, pseudonym: str) -> list[CredentialRef]:
        try:
            entry = await self._kv.get(user_key(pseudonym))
        except KeyNotFoundError:
            return []
        return _decode_index(entry.value).credentials


def _wrong_last(exc: APIError) -> bool:
    return exc.err_code in WRONG_LAST_SEQUENCE


def _decode_index(value: bytes | None) -> UserIndex:
    return msgspec.json.decode(value or b"", type=UserIndex)


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

    async def issue(
        self,
        kind: CeremonyKind,
        *,
        ttl_s: float,
        pseudonyms: Sequence[str] = (),
        seal: Callable[[bytes], str | None] | None = None,
        granted: bool = False,
    ) -> bytes:
        """A fresh challenge bound to the user with `pseudonyms` (current first; none: anyone).

        Raises:
            Refused: rate_limited, the bucket is at its byte bound.
        """
        challenge = secrets.token_bytes(CHALLENGE_BYTES)
        record = ChallengeRecord(
            kind=kind,
            expires_at=self.now_ms() + int(ttl_s * 1000),
            pseudonym=pseudonyms[0] if pseudonyms else None,
            previous=list(pseudonyms[1:]),
            sealed_user=seal(challenge) if seal is not None else None,
            granted=granted,
        )
        try:
            await self._kv.create(b64url(challenge), msgspec.json.encode(record))
        except APIError as exc:
            if not is_storage_full(exc):
                raise
            raise Refused(
                "rate_limited", "too many live challenges: retry once some have expired"
            ) from None
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


class GrantStore:
    """Single-use, short-lived enrolment grants. Only a hash of the grant is a key, so reading
    the bucket (an insider with JetStream access) yields nothing that can be presented."""

    def __init__(self, kv: KeyValue, *, clock: Callable[[], float]) -> None:
        self._kv = kv
        self._clock = clock

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    async def issue(self, pseudonym: str, *, ttl_s: float) -> tuple[str, int]:
        """A new grant for `pseudonym`: (the opaque token, its expiry in ms since the epoch).

        Raises:
            Refused: rate_limited, the bucket is at its byte bound.
        """
        token = b64url(secrets.token_bytes(32))
        expires_at = self.now_ms() + int(ttl_s * 1000)
        record = GrantRecord(pseudonym=pseudonym, expires_at=expires_at)
        try:
            await self._kv.create(_grant_key(token), msgspec.json.encode(record))
        except APIError as exc:
            if not is_storage_full(exc):
                raise
            raise Refused("rate_limited", "too many live enrolment grants") from None
        return token, expires_at

    async def consume(self, token: str, owners: Sequence[str]) -> None:
        """Spend the grant if it is live and was issued to one of `owners`; of concurrent
        spenders exactly one wins (compare-and-set delete on the entry's revision).

        Raises:
            Refused: invalid_enrolment_grant (unknown, used, expired or another user's).
        """
        key = _grant_key(token)
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError:
            raise Refused(
                "invalid_enrolment_grant", "no live enrolment grant matches (used or expired)"
            ) from None
        record = msgspec.json.decode(entry.value or b"", type=GrantRecord)
        if record.pseudonym not in owners:
            raise Refused("invalid_enrolment_grant", "the enrolment grant is another user's")
        if self.now_ms() >= record.expires_at:
            raise Refused("invalid_enrolment_grant", "the enrolment grant has expired")
        try:
            await self._kv.delete(key, last=entry.revision)
        except (KeyWrongLastSequenceError, APIError) as exc:
            if isinstance(exc, APIError) and not _wrong_last(exc):
                raise
            raise Refused(
                "invalid_enrolment_grant", "the enrolment grant was already used"
            ) from None


def _grant_key(token: str) -> str:
    return "grant." + hashlib.sha256(token.encode()).hexdigest()
