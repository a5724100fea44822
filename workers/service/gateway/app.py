"""The gateway's HTTP routes (Starlette): two pages, a JSON API over the bus, and SSE.

Every API route maps to one bus request and passes the service's reply through (refusals
such as `challenge_reused` reach the page as they are), except where the gateway is the
calling app the passkey slice trusts:

* it names the account: list and delete act on the signed-in account only, never on a
  `user_id` from the page;
* it keeps the enrolment grant of a sign-in server-side and spends it on "add a passkey";
* it passes the client's address as the usernameless challenge `source` (per-client rate
  limiting);
* it refuses cross-site requests (an `Origin` other than its own) before they reach the bus.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from bus import Bus, BusError, NoResponders, PermissionDenied, RequestTimeout
from lukhas.subjects import (
    PASSKEY_CHALLENGE,
    PASSKEY_DELETE,
    PASSKEY_LIST,
    PASSKEY_REGISTER_OPTIONS,
    PASSKEY_REGISTER_VERIFY,
    PASSKEY_VERIFY,
)
from workers.service.gateway._feed import Feed
from workers.service.gateway._sessions import Session, SessionStore

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
COOKIE = "lukhas_session"
#: Largest request body the API reads (a WebAuthn response is a few KiB).
MAX_BODY = 64 * 1024
MAX_USER_NAME = 64

_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class ApiError(Exception):
    """A request the gateway refuses itself; becomes `{"ok": false, ...}` with `status`."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(body)
        self.status = status
        self.body = body


def _error(status: int, code: str, message: str) -> ApiError:
    return ApiError(status, {"ok": False, "error": {"code": code, "message": message}})


def _refusal(status: int, reason: str, message: str) -> ApiError:
    return ApiError(status, {"ok": False, "reason": reason, "message": message})


class Api:
    """The route handlers, sharing the bus, the sessions and the feed."""

    def __init__(
        self, bus: Bus, sessions: SessionStore, feed: Feed, *, request_timeout_s: float,
        secure_cookies: bool,
    ) -> None:
        self._bus = bus
        self._sessions = sessions
        self._feed = feed
        self._timeout_s = request_timeout_s
        self._secure = secure_cookies

    # -- plumbing ------------------------------------------------------------------------

    async def _call(self, subject: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            env = await self._bus.request(
                subject, json.dumps(body).encode(), timeout=self._timeout_s
            )
        except (NoResponders, RequestTimeout) as exc:
            raise _error(503, "unavailable", f"the passkey service did not answer: {exc}") from None
        except PermissionDenied as exc:
            logger.error("the gateway's NATS user may not call %s: %s", subject, exc)
            raise _error(503, "unavailable", "the gateway may not call the service") from None
        except BusError as exc:
            raise _error(503, "unavailable", str(exc)) from None
        try:
            reply = json.loads(env.data)
        except ValueError:
            raise _error(502, "bad_gateway", "the service sent a reply that is not JSON") from None
        if not isinstance(reply, dict):
            raise _error(502, "bad_gateway", "the service sent a reply that is not an object")
        return reply

    @staticmethod
    async def _json(request: Request) -> dict[str, Any]:
        _check_origin(request)
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise _error(415, "invalid_request", "send the body as application/json")
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
            raise _error(413, "payload_too_large", f"the body is over {MAX_BODY} bytes")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY:
                raise _error(413, "payload_too_large", f"the body is over {MAX_BODY} bytes")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks) or b"{}")
        except ValueError:
            raise _error(400, "invalid_request", "the body is not JSON") from None
        if not isinstance(body, dict):
            raise _error(400, "invalid_request", "the body must be a JSON object")
        return body

    def _session(self, request: Request) -> tuple[str | None, Session | None]:
        token = request.cookies.get(COOKIE)
        return token, self._sessions.get(token)

    def _signed_in(self, request: Request) -> Session:
        _, session = self._session(request)
        if session is None:
            raise _refusal(401, "not_signed_in", "sign in with a passkey first")
        if session.user_id is None:
            raise _refusal(
                403, "account_unknown",
                "this gateway does not know the account of that passkey: sign in with your "
                "user name to manage passkeys",
            )
        return session

    # -- pages and events ----------------------------------------------------------------

    async def passkeys_page(self, request: Request) -> Response:
        return FileResponse(STATIC / "passkeys.html", headers=_SECURITY_HEADERS)

    async def dashboard_page(self, request: Request) -> Response:
        return FileResponse(STATIC / "dashboard.html", headers=_SECURITY_HEADERS)

    async def events(self, request: Request) -> Response:
        return StreamingResponse(
            self._feed.stream(), media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    # -- passkeys ------------------------------------------------------------------------

    async def register_options(self, request: Request) -> Response:
        body = await self._json(request)
        user_name = _user_name(body.get("user_name"))
        call: dict[str, Any] = {"user_id": user_name, "user_name": user_name}
        _, session = self._session(request)
        if session is not None and session.user_id == user_name and session.enrolment_grant:
            # A further passkey for the signed-in account: spend this sign-in's grant.
            call["enrolment_grant"] = session.enrolment_grant
            session.enrolment_grant = None
        return _reply(await self._call(PASSKEY_REGISTER_OPTIONS, call))

    async def register_verify(self, request: Request) -> Response:
        body = await self._json(request)
        user_name = _user_name(body.get("user_name"))
        credential = body.get("credential")
        if not isinstance(credential, dict):
            raise _error(400, "invalid_request", "credential must be a RegistrationResponseJSON")
        reply = await self._call(
            PASSKEY_REGISTER_VERIFY, {"user_id": user_name, "credential": credential}
        )
        if reply.get("ok") is True and isinstance(reply.get("user_handle"), str):
            self._sessions.remember_handle(reply["user_handle"], user_name)
        return _reply(reply)

    async def challenge(self, request: Request) -> Response:
        body = await self._json(request)
        call: dict[str, Any] = {}
        if body.get("user_name") not in (None, ""):
            call["user_id"] = _user_name(body["user_name"])
        else:
            # Usernameless challenges are rate limited per source: the client's address.
            call["source"] = request.client.host if request.client else "unknown"
        return _reply(await self._call(PASSKEY_CHALLENGE, call))

    async def verify(self, request: Request) -> Response:
        body = await self._json(request)
        credential = body.get("credential")
        if not isinstance(credential, dict):
            raise _error(400, "invalid_request", "credential must be an AuthenticationResponseJSON")
        reply = await self._call(PASSKEY_VERIFY, credential)
        if reply.get("ok") is not True:
            return _reply(reply)
        old, _ = self._session(request)
        self._sessions.close(old)
        user_id = reply.get("user_id") if isinstance(reply.get("user_id"), str) else None
        token = self._sessions.open(
            user_handle=str(reply.get("user_handle", "")),
            credential_id=str(reply.get("credential_id", "")),
            user_id=user_id,
            enrolment_grant=reply.get("enrolment_grant"),
        )
        session = self._sessions.get(token)
        assert session is not None
        page = {k: v for k, v in reply.items() if not k.startswith("enrolment_grant")}
        page["user_id"] = session.user_id
        response = _reply(page)
        response.set_cookie(
            COOKIE, token, httponly=True, samesite="strict", secure=self._secure, path="/"
        )
        return response

    async def session(self, request: Request) -> Response:
        _, session = self._session(request)
        if session is None:
            return _reply({"ok": True, "signed_in": False})
        return _reply({
            "ok": True, "signed_in": True, "user_id": session.user_id,
            "user_handle": session.user_handle, "credential_id": session.credential_id,
            "can_add_passkey": session.enrolment_grant is not None,
        })

    async def sign_out(self, request: Request) -> Response:
        _check_origin(request)
        token, _ = self._session(request)
        self._sessions.close(token)
        response = _reply({"ok": True, "signed_in": False})
        response.delete_cookie(COOKIE, path="/")
        return response

    async def list_passkeys(self, request: Request) -> Response:
        session = self._signed_in(request)
        return _reply(await self._call(PASSKEY_LIST, {"user_id": session.user_id}))

    async def delete_passkey(self, request: Request) -> Response:
        body = await self._json(request)
        session = self._signed_in(request)
        credential_id = body.get("credential_id")
        if not isinstance(credential_id, str) or not credential_id:
            raise _error(400, "invalid_request", "credential_id must be a non-empty string")
        return _reply(await self._call(
            PASSKEY_DELETE, {"user_id": session.user_id, "credential_id": credential_id}
        ))


def _user_name(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _error(400, "invalid_request", "user_name must be a non-empty string")
    value = value.strip()
    if len(value) > MAX_USER_NAME or not value.isprintable():
        raise _error(
            400, "invalid_request", f"user_name must be printable, at most {MAX_USER_NAME} chars"
        )
    return value


def _check_origin(request: Request) -> None:
    """Refuse a browser request sent from another site (CSRF): its `Origin` must be ours."""
    origin = request.headers.get("origin")
    if origin is None:
        return  # not a cross-site browser request (browsers send Origin on every POST)
    own = f"{request.url.scheme}://{request.headers.get('host', '')}"
    if origin != own:
        raise _refusal(
            403, "cross_origin", f"requests from {origin} are refused; open the page at {own}"
        )


def _reply(body: dict[str, Any], status: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers={"Cache-Control": "no-store"})


def _guarded(handler: Callable[[Request], Awaitable[Response]]) -> Callable[..., Any]:
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            return _reply(exc.body, exc.status)

    endpoint.__name__ = handler.__name__
    return endpoint


def build_app(api: Api) -> Starlette:
    """The ASGI application of the gateway."""
    return Starlette(routes=[
        Route("/", _guarded(api.passkeys_page)),
        Route("/dashboard", _guarded(api.dashboard_page)),
        Route("/api/events", _guarded(api.events)),
        Route("/api/session", _guarded(api.session)),
        Route("/api/signout", _guarded(api.sign_out), methods=["POST"]),
        Route("/api/register/options", _guarded(api.register_options), methods=["POST"]),
        Route("/api/register/verify", _guarded(api.register_verify), methods=["POST"]),
        Route("/api/challenge", _guarded(api.challenge), methods=["POST"]),
        Route("/api/verify", _guarded(api.verify), methods=["POST"]),
        Route("/api/passkeys", _guarded(api.list_passkeys)),
        Route("/api/passkeys/delete", _guarded(api.delete_passkey), methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ])
