"""Sign-in sessions of the gateway: who proved themselves with a passkey, in this process.

A session exists only after a successful `lukhas.identity.passkey.verify`. Its id is a
random 256-bit token kept in an HttpOnly, SameSite=Strict cookie; the service's enrolment
grant stays here and never reaches the page. Sessions live in memory, bounded in number and
age: a gateway restart signs everybody out, which is the safe failure.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class Session:
    """One signed-in browser."""

    user_handle: str
    credential_id: str
    #: The account, when the gateway knows it (a sign-in by user name, or a handle it saw
    #: registered); None after a usernameless sign-in with an unknown handle.
    user_id: str | None
    #: The service's enrolment grant from this sign-in (single use), for a further passkey.
    enrolment_grant: str | None
    expires_at: float


class SessionStore:
    """Sessions by token, and the user handles this gateway saw registered.

    Args:
        ttl_s: how long a session lasts after sign-in.
        max_sessions: most sessions kept (the oldest go first).
        max_handles: most handle → account entries kept (the oldest go first).
        clock: monotonic seconds (tests inject their own).
    """

    def __init__(
        self,
        *,
        ttl_s: float = 3600.0,
        max_sessions: int = 10_000,
        max_handles: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl_s = ttl_s
        self._max_sessions = max_sessions
        self._max_handles = max_handles
        self._clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._handles: OrderedDict[str, str] = OrderedDict()

    def remember_handle(self, user_handle: str, user_id: str) -> None:
        """Record that `user_handle` (from a register.verify reply) is `user_id`'s."""
        self._handles[user_handle] = user_id
        self._handles.move_to_end(user_handle)
        while len(self._handles) > self._max_handles:
            self._handles.popitem(last=False)

    def account_of(self, user_handle: str) -> str | None:
        return self._handles.get(user_handle)

    def open(
        self, *, user_handle: str, credential_id: str, user_id: str | None,
        enrolment_grant: str | None,
    ) -> str:
        """A new session; returns its token."""
        token = secrets.token_urlsafe(32)
        if user_id is None:
            user_id = self.account_of(user_handle)
        elif user_handle:
            self.remember_handle(user_handle, user_id)
        self._sessions[token] = Session(
            user_handle=user_handle, credential_id=credential_id, user_id=user_id,
            enrolment_grant=enrolment_grant, expires_at=self._clock() + self._ttl_s,
        )
        while len(self._sessions) > self._max_sessions:
            self._sessions.popitem(last=False)
        return token

    def get(self, token: str | None) -> Session | None:
        """The live session of `token`, or None (unknown, or expired and forgotten)."""
        if not token:
            return None
        session = self._sessions.get(token)
        if session is None:
            return None
        if session.expires_at <= self._clock():
            del self._sessions[token]
            return None
        return session

    def close(self, token: str | None) -> None:
        if token:
            self._sessions.pop(token, None)

    def __len__(self) -> int:
        return len(self._sessions)
