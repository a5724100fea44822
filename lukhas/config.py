"""All settings, read once from the environment.

Every variable is documented in the README. A bad value raises `ConfigError` naming it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from lukhas.errors import ConfigError
from lukhas.observability.pseudonym import key_problem

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _flag(env: Mapping[str, str], name: str, default: bool = False) -> bool:
    raw = env.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(name, raw, "true or false")


def _number(
    env: Mapping[str, str], name: str, default: T, parse: Callable[[str], T], *, minimum: float
) -> T:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = parse(raw.strip())
    except ValueError:
        raise ConfigError(name, raw, f"a {parse.__name__} >= {minimum:g}") from None
    if value < minimum:  # type: ignore[operator]
        raise ConfigError(name, raw, f"a {parse.__name__} >= {minimum:g}")
    return value


def _text(env: Mapping[str, str], name: str) -> str | None:
    raw = env.get(name)
    return raw.strip() or None if raw is not None else None


def _pseudonym_keys(env: Mapping[str, str], *, dry_run: bool) -> tuple[str, ...]:
    """LUKHAS_PSEUDONYM_KEYS (current first, comma-separated) or the single LUKHAS_PSEUDONYM_KEY.

    Outside DRY_RUN a short or published key is refused: pseudonyms are only as private as
    the key, and anyone holding a public one can map user ids to them.
    """
    many, one = _text(env, "LUKHAS_PSEUDONYM_KEYS"), _text(env, "LUKHAS_PSEUDONYM_KEY")
    if many is not None and one is not None:
        raise ConfigError(
            "LUKHAS_PSEUDONYM_KEY", "<hidden>",
            "unset while LUKHAS_PSEUDONYM_KEYS is set (list the current key first there)",
        )
    name = "LUKHAS_PSEUDONYM_KEYS" if many is not None else "LUKHAS_PSEUDONYM_KEY"
    keys = tuple(k.strip() for k in (many or one or "").split(",") if k.strip())
    if many is not None and len(set(keys)) != len(keys):
        raise ConfigError(name, "<hidden>", "distinct keys, the current one first")
    if not dry_run:
        for key in keys:
            problem = key_problem(key)
            if problem is not None:
                raise ConfigError(name, "<hidden>", problem)
    return keys


def _bounded(
    env: Mapping[str, str], name: str, default: float, *, low: float, high: float,
    low_open: bool = False,
) -> float:
    """A float in [low, high] (or (low, high] with `low_open`)."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    what = (f"a number above {low:g} and at most {high:g}" if low_open
            else f"a number from {low:g} to {high:g}")
    try:
        value = float(raw.strip())
    except ValueError:
        raise ConfigError(name, raw, what) from None
    if not (low < value <= high if low_open else low <= value <= high):
        raise ConfigError(name, raw, what)
    return value


def _canaries(env: Mapping[str, str]) -> dict[str, Any]:
    """The canary shares (percent of calls, 0 = off) and the rollback policy."""
    return {
        **{
            variable.removeprefix("LUKHAS_").lower(): _bounded(
                env, variable, 0.0, low=0.0, high=100.0
            )
            for variable in CANARY_VARIABLES.values()
        },
        "canary_min_samples": _number(env, "LUKHAS_CANARY_MIN_SAMPLES", 50, int, minimum=1),
        "canary_error_margin": _bounded(env, "LUKHAS_CANARY_ERROR_MARGIN", 0.05,
                                        low=0.0, high=1.0),
        "canary_latency_ratio": _number(env, "LUKHAS_CANARY_LATENCY_RATIO", 1.5, float,
                                        minimum=1.0),
        "canary_window_s": _bounded(env, "LUKHAS_CANARY_WINDOW_S", 300.0, low=0.0,
                                    high=86400.0, low_open=True),
    }


def _slo_windows(env: Mapping[str, str]) -> dict[str, Any]:
    """The SLO alert windows; each short window must be shorter than its long one."""
    windows = {
        f"slo_{name}_s": _number(env, f"LUKHAS_SLO_{name.upper()}_S", default, float,
                                 minimum=0.001)
        for name, default in (
            ("page_long", 3600.0), ("page_short", 300.0), ("ticket_long", 21600.0),
            ("ticket_short", 1800.0), ("period", 30 * 86400.0),
        )
    }
    for kind in ("page", "ticket"):
        short, long = windows[f"slo_{kind}_short_s"], windows[f"slo_{kind}_long_s"]
        if short >= long:
            raise ConfigError(
                f"LUKHAS_SLO_{kind.upper()}_SHORT_S", f"{short:g}",
                f"a float below LUKHAS_SLO_{kind.upper()}_LONG_S ({long:g})",
            )
    return windows


def _inbox_prefix(env: Mapping[str, str]) -> str | None:
    """NATS_INBOX_PREFIX: a literal subject (dot-separated tokens, no wildcards or spaces)."""
    prefix = _text(env, "NATS_INBOX_PREFIX")
    if prefix is None:
        return None
    tokens = prefix.split(".")
    if any(not t or any(c in t for c in "*> \t\r\n") for t in tokens):
        raise ConfigError(
            "NATS_INBOX_PREFIX", prefix,
            "a literal subject such as _INBOX_client (dot-separated tokens, no wildcards)",
        )
    return prefix


#: Where passkey ceremonies may run unless LUKHAS_WEBAUTHN_ORIGINS says otherwise.
DEFAULT_WEBAUTHN_ORIGINS: tuple[str, ...] = ("http://localhost:8000",)

#: Every variable `Settings.from_env` reads; compose.yaml and the README are checked against it.
KNOWN_VARIABLES: tuple[str, ...] = (
    "LUKHAS_DRY_RUN_MODE",
    "LUKHAS_OFFLINE",
    "NATS_URL",
    "NATS_USER",
    "NATS_PASSWORD",
    "NATS_TOKEN",
    "NATS_CREDS",
    "NATS_NKEY_SEED",
    "NATS_TLS_CA",
    "NATS_TLS_CERT",
    "NATS_TLS_KEY",
    "NATS_INBOX_PREFIX",
    "FEATURE_GOVERNANCE_LEDGER",
    "FEATURE_IDENTITY_PASSKEY",
    "FEATURE_ORCHESTRATION_HANDOFF",
    "LUKHAS_HANDOFF_RATE",
    "LUKHAS_HANDOFF_BURST",
    "LUKHAS_HANDOFF_SOURCE_RATE",
    "LUKHAS_HANDOFF_SOURCE_BURST",
    "LUKHAS_HANDOFF_MAX_INFLIGHT",
    "LUKHAS_HANDOFF_BACKPRESSURE_TIMEOUT_MS",
    "LUKHAS_HANDOFF_MAX_BYTES",
    "LUKHAS_WEBAUTHN_RP_ID",
    "LUKHAS_WEBAUTHN_RP_NAME",
    "LUKHAS_WEBAUTHN_ORIGINS",
    "LUKHAS_WEBAUTHN_REQUIRE_UV",
    "LUKHAS_WEBAUTHN_CHALLENGE_TTL_S",
    "LUKHAS_PASSKEY_PROVIDER",
    "LUKHAS_PASSKEY_ENROLMENT_TTL_S",
    "LUKHAS_PASSKEY_CHALLENGE_RATE",
    "LUKHAS_PASSKEY_CHALLENGE_BURST",
    "LUKHAS_PASSKEY_CHALLENGE_GLOBAL_RATE",
    "LUKHAS_PASSKEY_CHALLENGE_GLOBAL_BURST",
    "LUKHAS_PASSKEY_CHALLENGES_MAX_BYTES",
    "LUKHAS_PSEUDONYM_KEY",
    "LUKHAS_PSEUDONYM_KEYS",
    "LUKHAS_TENANT",
    "LUKHAS_WORKER_CONCURRENCY",
    "LUKHAS_WORKER_MAX_PENDING",
    "LUKHAS_WORKER_QUEUE_BUDGET_MS",
    "LUKHAS_REQUEST_MAX_BYTES",
    "LUKHAS_MATRIZ_BUFFER",
    "LUKHAS_METRICS_PORT",
    "LUKHAS_METRICS_ADDR",
    "LUKHAS_GATEWAY_PORT",
    "LUKHAS_GATEWAY_ADDR",
    "LUKHAS_DATA_DIR",
    "LUKHAS_LEDGER_REPLICAS",
    "LUKHAS_LEDGER_SIGNING_KEY",
    "LUKHAS_LEDGER_WRAPPING_KEY",
    "LUKHAS_LOG_LEVEL",
    # SLO burn-rate alert windows (seconds) and the error-budget period.
    "LUKHAS_SLO_PAGE_LONG_S",
    "LUKHAS_SLO_PAGE_SHORT_S",
    "LUKHAS_SLO_TICKET_LONG_S",
    "LUKHAS_SLO_TICKET_SHORT_S",
    "LUKHAS_SLO_PERIOD_S",
    # Canary runs: the share (percent) of a slice's calls its real provider serves while the
    # feature flag is off, and when the observability worker rolls a canary back.
    "LUKHAS_CANARY_GOVERNANCE_LEDGER",
    "LUKHAS_CANARY_IDENTITY_PASSKEY",
    "LUKHAS_CANARY_ORCHESTRATION_HANDOFF",
    "LUKHAS_CANARY_MIN_SAMPLES",
    "LUKHAS_CANARY_ERROR_MARGIN",
    "LUKHAS_CANARY_LATENCY_RATIO",
    "LUKHAS_CANARY_WINDOW_S",
)

#: The feature flags that have a canary, and the variable giving its share.
CANARY_VARIABLES: dict[str, str] = {
    "FEATURE_GOVERNANCE_LEDGER": "LUKHAS_CANARY_GOVERNANCE_LEDGER",
    "FEATURE_IDENTITY_PASSKEY": "LUKHAS_CANARY_IDENTITY_PASSKEY",
    "FEATURE_ORCHESTRATION_HANDOFF": "LUKHAS_CANARY_ORCHESTRATION_HANDOFF",
}


@dataclass(frozen=True, slots=True)
class Settings:
    """The service configuration; build it with `Settings.from_env()`."""

    dry_run: bool = False
    offline: bool = False
    nats_url: str | None = None
    nats_user: str | None = None
    nats_password: str | None = None
    nats_token: str | None = None
    nats_creds: str | None = None
    nats_nkey_seed: str | None = None
    nats_tls_ca: str | None = None
    nats_tls_cert: str | None = None
    nats_tls_key: str | None = None
    #: Reply subjects start with this (nats-py `inbox_prefix`); None means `_INBOX_<user>`
    #: with NATS_USER set, else `_INBOX` (see `bus.connect.inbox_prefix`).
    nats_inbox_prefix: str | None = None
    feature_governance_ledger: bool = False
    feature_identity_passkey: bool = False
    feature_orchestration_handoff: bool = False
    handoff_rate: float = 100.0
    handoff_burst: int = 200
    handoff_source_rate: float | None = None
    handoff_source_burst: int | None = None
    handoff_max_inflight: int = 1024
    handoff_backpressure_timeout_ms: int = 250
    handoff_max_bytes: int = 65_536
    webauthn_rp_id: str = "localhost"
    webauthn_rp_name: str = "LUKHAS"
    webauthn_origins: tuple[str, ...] = DEFAULT_WEBAUTHN_ORIGINS
    webauthn_require_uv: bool = True
    webauthn_challenge_ttl_s: int = 120
    passkey_provider: str = "webauthn"
    passkey_enrolment_ttl_s: int = 300
    passkey_challenge_rate: float = 10.0
    passkey_challenge_burst: int = 20
    passkey_challenge_global_rate: float = 200.0
    passkey_challenge_global_burst: int = 400
    passkey_challenges_max_bytes: int = 64 * 1024 * 1024
    #: The current pseudonym key (the first of LUKHAS_PSEUDONYM_KEYS).
    pseudonym_key: str | None = None
    #: Earlier pseudonym keys, newest first: still read, never written with.
    pseudonym_previous_keys: tuple[str, ...] = ()
    tenant: str = "default"
    worker_concurrency: int = 256
    worker_max_pending: int = 65_536
    #: Every endpoint's queue budget (ms) instead of its manifest's p95 SLA; None: the SLA.
    worker_queue_budget_ms: float | None = None
    request_max_bytes: int = 1_048_576
    matriz_buffer: int = 65_536
    metrics_port: int = 9464
    metrics_addr: str = "127.0.0.1"
    #: The HTTP gateway (passkey page, dashboard): port (0 = any free one) and bind address.
    gateway_port: int = 8000
    gateway_addr: str = "127.0.0.1"
    data_dir: str = ".lukhas"
    ledger_replicas: int = 1
    #: The ledger's signed-note signer key (secret; validated, never printed).
    ledger_signing_key: str | None = field(default=None, repr=False)
    #: Wraps the ledger's per-subject data keys (secret; validated, never printed).
    ledger_wrapping_key: str | None = field(default=None, repr=False)
    log_level: str = "INFO"
    slo_page_long_s: float = 3600.0
    slo_page_short_s: float = 300.0
    slo_ticket_long_s: float = 21600.0
    slo_ticket_short_s: float = 1800.0
    slo_period_s: float = 30 * 86400.0
    #: Canary shares, percent of calls (0 = off): see the README's "Canary runs".
    canary_governance_ledger: float = 0.0
    canary_identity_passkey: float = 0.0
    canary_orchestration_handoff: float = 0.0
    #: Rollback policy: samples each arm needs, tolerated error-rate excess, tolerated p95
    #: ratio (canary over baseline) once the canary's p95 is over the SLA, window seconds.
    canary_min_samples: int = 50
    canary_error_margin: float = 0.05
    canary_latency_ratio: float = 1.5
    canary_window_s: float = 300.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read every setting from `env` (default: `os.environ`).

        Raises:
            ConfigError: a variable holds a value that cannot be used.
        """
        env = os.environ if env is None else env
        origins = tuple(
            o.strip() for o in env.get("LUKHAS_WEBAUTHN_ORIGINS", "").split(",") if o.strip()
        ) or DEFAULT_WEBAUTHN_ORIGINS
        log_level = (env.get("LUKHAS_LOG_LEVEL") or "INFO").strip().upper()
        if log_level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ConfigError("LUKHAS_LOG_LEVEL", log_level, "DEBUG, INFO, WARNING or ERROR")
        passkey_provider = (_text(env, "LUKHAS_PASSKEY_PROVIDER") or "webauthn").lower()
        if passkey_provider not in {"webauthn", "fido2_mock"}:
            raise ConfigError("LUKHAS_PASSKEY_PROVIDER", passkey_provider, "webauthn or fido2_mock")
        replicas = _number(env, "LUKHAS_LEDGER_REPLICAS", 1, int, minimum=1)
        if replicas > 5:
            raise ConfigError("LUKHAS_LEDGER_REPLICAS", str(replicas), "an int from 1 to 5")
        dry_run = _flag(env, "LUKHAS_DRY_RUN_MODE")
        if passkey_provider == "fido2_mock" and not dry_run:
            raise ConfigError(
                "LUKHAS_PASSKEY_PROVIDER", passkey_provider,
                "webauthn outside DRY_RUN (fido2_mock is a test double whose signatures "
                "anyone can forge)",
            )
        pseudonym_keys = _pseudonym_keys(env, dry_run=dry_run)
        signing_key = _text(env, "LUKHAS_LEDGER_SIGNING_KEY")
        if signing_key is not None:
            from lukhas.transparency.keys import parse_signing_key  # cryptography only when set

            parse_signing_key(signing_key, dry_run=dry_run)
        wrapping_key = _text(env, "LUKHAS_LEDGER_WRAPPING_KEY")
        if wrapping_key is not None:
            from lukhas.transparency.keys import parse_wrapping_key

            parse_wrapping_key(wrapping_key)
        port = _number(env, "LUKHAS_METRICS_PORT", 9464, int, minimum=0)
        if port > 65535:
            raise ConfigError("LUKHAS_METRICS_PORT", str(port), "a port from 0 to 65535")
        gateway_port = _number(env, "LUKHAS_GATEWAY_PORT", 8000, int, minimum=0)
        if gateway_port > 65535:
            raise ConfigError("LUKHAS_GATEWAY_PORT", str(gateway_port), "a port from 0 to 65535")
        return cls(
            dry_run=dry_run,
            offline=_flag(env, "LUKHAS_OFFLINE"),
            nats_url=_text(env, "NATS_URL"),
            nats_user=_text(env, "NATS_USER"),
            nats_password=_text(env, "NATS_PASSWORD"),
            nats_token=_text(env, "NATS_TOKEN"),
            nats_creds=_text(env, "NATS_CREDS"),
            nats_nkey_seed=_text(env, "NATS_NKEY_SEED"),
            nats_tls_ca=_text(env, "NATS_TLS_CA"),
            nats_tls_cert=_text(env, "NATS_TLS_CERT"),
            nats_tls_key=_text(env, "NATS_TLS_KEY"),
            nats_inbox_prefix=_inbox_prefix(env),
            feature_governance_ledger=_flag(env, "FEATURE_GOVERNANCE_LEDGER"),
            feature_identity_passkey=_flag(env, "FEATURE_IDENTITY_PASSKEY"),
            feature_orchestration_handoff=_flag(env, "FEATURE_ORCHESTRATION_HANDOFF"),
            handoff_rate=_number(env, "LUKHAS_HANDOFF_RATE", 100.0, float, minimum=0.001),
            handoff_burst=_number(env, "LUKHAS_HANDOFF_BURST", 200, int, minimum=1),
            handoff_source_rate=_number(
                env, "LUKHAS_HANDOFF_SOURCE_RATE", None, float, minimum=0.001
            ),
            handoff_source_burst=_number(env, "LUKHAS_HANDOFF_SOURCE_BURST", None, int, minimum=1),
            handoff_max_inflight=_number(env, "LUKHAS_HANDOFF_MAX_INFLIGHT", 1024, int, minimum=1),
            handoff_backpressure_timeout_ms=_number(
                env, "LUKHAS_HANDOFF_BACKPRESSURE_TIMEOUT_MS", 250, int, minimum=0
            ),
            handoff_max_bytes=_number(env, "LUKHAS_HANDOFF_MAX_BYTES", 65_536, int, minimum=2),
            webauthn_rp_id=_text(env, "LUKHAS_WEBAUTHN_RP_ID") or "localhost",
            webauthn_rp_name=_text(env, "LUKHAS_WEBAUTHN_RP_NAME") or "LUKHAS",
            webauthn_origins=origins,
            webauthn_require_uv=_flag(env, "LUKHAS_WEBAUTHN_REQUIRE_UV", default=True),
            webauthn_challenge_ttl_s=_number(
                env, "LUKHAS_WEBAUTHN_CHALLENGE_TTL_S", 120, int, minimum=1
            ),
            passkey_provider=passkey_provider,
            passkey_enrolment_ttl_s=_number(
                env, "LUKHAS_PASSKEY_ENROLMENT_TTL_S", 300, int, minimum=1
            ),
            passkey_challenge_rate=_number(
                env, "LUKHAS_PASSKEY_CHALLENGE_RATE", 10.0, float, minimum=0.001
            ),
            passkey_challenge_burst=_number(
                env, "LUKHAS_PASSKEY_CHALLENGE_BURST", 20, int, minimum=1
            ),
            passkey_challenge_global_rate=_number(
                env, "LUKHAS_PASSKEY_CHALLENGE_GLOBAL_RATE", 200.0, float, minimum=0.001
            ),
            passkey_challenge_global_burst=_number(
                env, "LUKHAS_PASSKEY_CHALLENGE_GLOBAL_BURST", 400, int, minimum=1
            ),
            passkey_challenges_max_bytes=_number(
                env, "LUKHAS_PASSKEY_CHALLENGES_MAX_BYTES", 64 * 1024 * 1024, int, minimum=4096
            ),
            pseudonym_key=pseudonym_keys[0] if pseudonym_keys else None,
            pseudonym_previous_keys=pseudonym_keys[1:],
            tenant=_text(env, "LUKHAS_TENANT") or "default",
            worker_concurrency=_number(env, "LUKHAS_WORKER_CONCURRENCY", 256, int, minimum=1),
            worker_max_pending=_number(env, "LUKHAS_WORKER_MAX_PENDING", 65_536, int, minimum=1),
            worker_queue_budget_ms=_number(
                env, "LUKHAS_WORKER_QUEUE_BUDGET_MS", None, float, minimum=1
            ),
            request_max_bytes=_number(env, "LUKHAS_REQUEST_MAX_BYTES", 1_048_576, int, minimum=64),
            matriz_buffer=_number(env, "LUKHAS_MATRIZ_BUFFER", 65_536, int, minimum=1),
            metrics_port=port,
            metrics_addr=_text(env, "LUKHAS_METRICS_ADDR") or "127.0.0.1",
            gateway_port=gateway_port,
            gateway_addr=_text(env, "LUKHAS_GATEWAY_ADDR") or "127.0.0.1",
            data_dir=_text(env, "LUKHAS_DATA_DIR") or ".lukhas",
            ledger_replicas=replicas,
            ledger_signing_key=signing_key,
            ledger_wrapping_key=wrapping_key,
            log_level=log_level,
            **_slo_windows(env),
            **_canaries(env),
        )

    @property
    def uses_memory_bus(self) -> bool:
        """OFFLINE always, and DRY_RUN unless a NATS_URL is given, run on the in-memory bus."""
        return self.offline or (self.dry_run and self.nats_url is None)
