"""Connection options: what `open_nats_bus` hands nats-py, TLS, and URLs safe to log."""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = ["DEFAULT_INBOX_PREFIX", "client_options", "redact", "tls_context"]

#: nats-py's own inbox prefix, used unless `inbox_prefix` is given.
DEFAULT_INBOX_PREFIX = "_INBOX"


def client_options(
    *,
    name: str | None,
    user: str | None,
    password: str | None,
    token: str | None,
    creds: str | None,
    nkey_seed: str | None,
    tls: ssl.SSLContext | None,
    inbox_prefix: str | None,
    connect_timeout: float,
    drain_timeout: float,
) -> dict[str, Any]:
    """The keyword arguments of nats-py's `Client.connect` for these settings."""
    options: dict[str, Any] = {
        "name": name,
        "user": user,
        "password": password,
        "token": token,
        "connect_timeout": connect_timeout,
        "drain_timeout": drain_timeout,
    }
    if tls is not None:
        options["tls"] = tls
    if inbox_prefix:
        options["inbox_prefix"] = inbox_prefix
    if creds:
        options["user_credentials"] = creds
    if nkey_seed:
        is_seed = nkey_seed.strip().startswith("SU")
        options["nkeys_seed_str" if is_seed else "nkeys_seed"] = nkey_seed.strip()
    return options


def tls_context(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """A client TLS context from PEM files, or None when none is given.

    Raises:
        OSError, ssl.SSLError: a file is missing or unreadable.
        ValueError: a key without a certificate.
    """
    if not (ca or cert or key):
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    if cert:
        context.load_cert_chain(cert, key)
    elif key:
        raise ValueError("NATS_TLS_KEY is set without NATS_TLS_CERT")
    return context


def redact(url: str) -> str:
    """Hide passwords and tokens in a URL (or comma-separated URLs) before logging it."""
    out = []
    for part in url.split(","):
        parts = urlsplit(part.strip())
        if parts.username or parts.password:
            host = parts.hostname or ""
            if parts.port:
                host = f"{host}:{parts.port}"
            user = parts.username if parts.password else "***"
            auth = f"{user}:***" if parts.password else user
            parts = parts._replace(netloc=f"{auth}@{host}")
        out.append(urlunsplit(parts))
    return ",".join(out)
