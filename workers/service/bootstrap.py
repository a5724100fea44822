"""Runtime wiring: register the real providers from `candidate/` when their flags allow.

Only here, at startup and only outside DRY_RUN, does anything import `candidate` (by module
path, with importlib; the lane rule binds `lukhas/`, which never does). A slice whose
feature flag is off keeps its builtin null provider, and in DRY_RUN the registries answer
with the null providers whatever is registered. A slice with a canary share
(`LUKHAS_CANARY_<SLICE>` > 0) has its real provider wired although its flag is off: the
registry sends that share of calls to it (see `lukhas/registry.py`).
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Mapping
from typing import Any, Literal

import nats.errors

from bus.nats import jetstream
from candidate._jetstream import jetstream_of
from lukhas.errors import ConfigError
from lukhas.governance.consent_ledger import registry as consent_registry
from lukhas.identity.passkey import registry as passkey_registry
from lukhas.orchestration.context import registry as context_registry
from lukhas.ratelimit import use_lease_store
from lukhas.registry import ProviderRegistry
from lukhas.runtime import Runtime
from workers.service.leases import BUCKET as LEASE_BUCKET
from workers.service.leases import open_lease_store
from workers.service.streams import HANDOFF_STREAM, DurableHandoffPublisher, ensure_handoff_stream

logger = logging.getLogger(__name__)

LEDGER_MODULE = "candidate.governance.consent_ledger.jetstream_ledger"
WEBAUTHN_MODULE = "candidate.identity.passkey.webauthn_provider"

PasskeyProviderName = Literal["webauthn", "fido2_mock"]

#: Every slice's registry (the slice workers stop their canaries on a rollback).
SLICE_REGISTRIES: tuple[ProviderRegistry[Any], ...] = (
    consent_registry.REGISTRY, passkey_registry.REGISTRY, context_registry.REGISTRY,
)


def wanted(registry: ProviderRegistry[Any], settings: Any) -> bool:
    """Whether `registry`'s real provider should be wired: its flag is on, or a canary share
    of its calls is configured (outside DRY_RUN, which `wire_providers` checks first)."""
    return bool(getattr(settings, registry.flag)) or registry.canary_percent(
        settings, configured=True
    ) > 0


async def wire_providers(
    runtime: Runtime,
    *,
    passkey_provider: PasskeyProviderName = "webauthn",
    ledger_options: Mapping[str, Any] | None = None,
    passkey_options: Mapping[str, Any] | None = None,
) -> None:
    """Run the `_wire()` of every slice whose flag is on: each builds, `ensure()`s and
    registers its real provider with the slice's registry.

    Nothing happens in DRY_RUN or for a slice whose flag is off. Wiring is all or nothing:
    if one provider fails, none stays registered.

    Args:
        passkey_provider: "webauthn" (py_webauthn on JetStream KV). "fido2_mock" is a test
            double whose signatures anyone can forge: naming it here (never in DRY_RUN,
            where nothing is wired) is a ConfigError; tests register it explicitly.
        ledger_options: `LedgerOptions` fields to override (stream, bucket, subject prefix,
            consent TTL...); the rest come from the settings.
        passkey_options: `WebAuthnOptions` fields to override.

    Raises:
        ConfigError: a flag is on but what its provider needs is missing (a NATS bus with
            JetStream, a stable LUKHAS_PSEUDONYM_KEYS), or fido2_mock was chosen.
        LedgerStreamWeakened: the consent ledger's existing stream lost a protection
            (a record-dropping limit, deletes or purges allowed...); the ledger is not served.
        ValueError: `passkey_provider` is not a known provider.
    """
    settings = runtime.settings
    if settings.dry_run:
        logger.info("DRY_RUN: real providers stay unwired; the null providers answer")
        if any(r.canary_percent(settings, configured=True) > 0 for r in SLICE_REGISTRIES):
            logger.info("DRY_RUN: the LUKHAS_CANARY_* shares are ignored (no canary runs)")
        return
    await share_rate_limits(runtime)
    _log_canaries(settings)
    try:
        if wanted(consent_registry.REGISTRY, settings):
            _require_stable_pseudonyms(runtime, "FEATURE_GOVERNANCE_LEDGER")
            await wire_module(LEDGER_MODULE, runtime, **dict(ledger_options or {}))
        if wanted(passkey_registry.REGISTRY, settings):
            _refuse_test_doubles(passkey_provider)
            _require_stable_pseudonyms(runtime, "FEATURE_IDENTITY_PASSKEY")
            await wire_module(WEBAUTHN_MODULE, runtime, **dict(passkey_options or {}))
        if wanted(context_registry.REGISTRY, settings):
            await _wire_handoff(runtime)
    except BaseException:
        unwire_providers()
        raise


def _log_canaries(settings: Any) -> None:
    for registry in SLICE_REGISTRIES:
        percent = registry.canary_percent(settings, configured=True)
        if percent <= 0:
            continue
        if getattr(settings, registry.flag):
            logger.info("%s=%g is moot: %s=true sends every call to the real provider",
                        registry.canary_variable, percent, registry.flag_variable)
        else:
            logger.info(
                "canary %s=%g: that share of calls goes to the real provider (%s)",
                registry.canary_variable, percent,
                "sticky by data subject" if registry.sticky else "drawn per call",
            )


async def share_rate_limits(runtime: Runtime) -> bool:
    """Keep the rate-limit buckets in NATS KV so the limits hold for the whole queue group.

    Outside DRY_RUN on a NATS bus with JetStream; otherwise (or if the bucket cannot be
    opened, which is logged) each process keeps its own buckets. Returns whether shared.
    """
    if runtime.settings.dry_run or runtime.bus.backend != "nats":
        return False
    try:
        store = await open_lease_store(jetstream(runtime.bus), runtime.settings)
    except nats.errors.Error as exc:
        logger.warning(
            "rate limits stay per process: KV bucket %s unavailable (%s: %s)",
            LEASE_BUCKET, type(exc).__name__, exc,
        )
        return False
    use_lease_store(runtime, store)
    logger.info("rate limits shared by the queue group through KV bucket %s", LEASE_BUCKET)
    return True


async def wire_module(name: str, runtime: Runtime, **options: Any) -> None:
    """Import `name` and run its `_wire`: the plan's extension point for real providers.

    `_wire()` may take no arguments (the plan's example, registering a provider that needs
    nothing) or the runtime and keyword options; it may be a coroutine function.
    """
    module = importlib.import_module(name)
    wire = getattr(module, "_wire", None)
    if not callable(wire):
        raise TypeError(f"{name} has no _wire() to register its provider with")
    result = wire(runtime, **options) if inspect.signature(wire).parameters else wire()
    if inspect.isawaitable(result):
        await result


def unwire_providers() -> None:
    """Forget every registered real provider (shutdown, tests)."""
    for registry in SLICE_REGISTRIES:
        registry.reset()


async def close_providers() -> None:
    """Close every registered real provider, then forget it (graceful shutdown: while the
    bus is still open)."""
    for registry in SLICE_REGISTRIES:
        await registry.aclose()


#: Short alias.
unwire = unwire_providers


async def _wire_handoff(runtime: Runtime) -> None:
    flag = "FEATURE_ORCHESTRATION_HANDOFF"
    js = jetstream_of(runtime, flag, "durable handoffs")
    await ensure_handoff_stream(js, replicas=runtime.settings.ledger_replicas)
    context_registry.register(DurableHandoffPublisher(js))
    logger.info("%s: handoffs go through JetStream stream %s", flag, HANDOFF_STREAM)


def _refuse_test_doubles(passkey_provider: str) -> None:
    if passkey_provider == "fido2_mock":
        raise ConfigError(
            "LUKHAS_PASSKEY_PROVIDER", passkey_provider,
            "webauthn outside DRY_RUN (fido2_mock is a test double whose signatures anyone "
            "can forge)",
        )
    if passkey_provider != "webauthn":
        raise ValueError(f"unknown passkey provider {passkey_provider!r}: expected webauthn")


def _require_stable_pseudonyms(runtime: Runtime, flag: str) -> None:
    if getattr(runtime.pseudonymize, "ephemeral", False):
        raise ConfigError(
            "LUKHAS_PSEUDONYM_KEYS",
            "",
            f"a secret key while {flag}=true: durable state is keyed by pseudonym, which "
            "must be the same in every worker and across restarts",
        )
