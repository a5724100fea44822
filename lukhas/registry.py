"""One provider registry for every slice: real providers plug in at runtime.

A slice makes one `ProviderRegistry` with its builtin (null) provider and its feature flag.
`candidate/` modules call `registry.register(provider)` from their `_wire()`, which the
bootstrap runs only under the flag outside DRY_RUN; the accepted lane never imports them.

A provider needs only the operations it has: the plan's extension point is a class with a
single `record` method, and that registers fine. An operation the provider lacks answers
`{"ok": false, "reason": "not_supported"}` (see `ProviderRegistry.call`).

Canary runs (plan §10.1). With the flag off and `LUKHAS_CANARY_<SLICE>` = N > 0 (outside
DRY_RUN, with the real provider wired), N percent of calls go to the real provider (the
`canary` arm) and the rest to the builtin (the `baseline` arm); every MATRIZ node of such a
call carries `arm:canary` or `arm:baseline`. A stateless slice draws the arm per call; a
stateful one (`sticky=True`) by a hash of the data subject's pseudonym, so all of one user's
calls land on one arm. `stop_canary()` (the observability worker's rollback) sends every call
to the baseline at once. The README's "Canary runs" section has the semantics.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import random
import time
from collections.abc import Callable
from typing import Any, Generic, Literal, TypeVar

from lukhas.config import CANARY_VARIABLES, Settings
from lukhas.observability.matriz_decorators import annotate, pin_arm
from lukhas.runtime import bound_runtime

logger = logging.getLogger(__name__)

P = TypeVar("P")

Arm = Literal["baseline", "canary"]
#: Node labels: the arm that served a call, and that its canary was rolled back.
ARM_LABEL = "arm:{arm}"
ROLLED_BACK_LABEL = "canary:rolled_back"


def not_supported(provider: object, operation: str) -> dict[str, Any]:
    """The refusal for an operation the serving provider does not implement."""
    name = getattr(provider, "name", type(provider).__name__)
    return {
        "ok": False,
        "provider": name,
        "reason": "not_supported",
        "message": f"provider {name!r} does not support {operation}",
    }


class ProviderRegistry(Generic[P]):
    """The provider of one slice: the registered one while its flag is on, else the builtin.

    Args:
        flag: the Settings attribute of the slice's feature flag, e.g.
            `feature_governance_ledger`.
        builtin: the safe provider used in DRY_RUN, with the flag off, or when nothing is
            registered; a function of the settings when it depends on them.
    """

    def __init__(
        self,
        flag: str,
        builtin: Callable[[Settings], P],
        *,
        sticky: bool = False,
        draw: Callable[[], float] = random.random,
    ) -> None:
        if flag not in Settings.__dataclass_fields__:
            raise ValueError(f"{flag!r} is not a setting")
        self.flag = flag
        #: The flag's environment variable, e.g. `FEATURE_GOVERNANCE_LEDGER`.
        self.flag_variable = flag.upper()
        #: The canary's share variable, e.g. `LUKHAS_CANARY_GOVERNANCE_LEDGER` (None: no canary).
        self.canary_variable = CANARY_VARIABLES.get(self.flag_variable)
        self._canary_setting = (
            None if self.canary_variable is None
            else self.canary_variable.removeprefix("LUKHAS_").lower()
        )
        #: Arms by a hash of the data subject (stateful providers), else drawn per call.
        self.sticky = sticky
        self._draw = draw
        self._builtin = builtin
        self._provider: P | None = None
        self._rollback: dict[str, Any] | None = None
        self._served: dict[Arm, int] = {"baseline": 0, "canary": 0}

    def register(self, provider: P) -> None:
        """Install the real provider; it answers while the feature flag is on (or its canary
        share of calls while the flag is off)."""
        if not isinstance(getattr(provider, "name", None), str):
            raise TypeError(f"{provider!r} has no `name`: a provider names itself in replies")
        self._provider = provider

    def reset(self) -> None:
        """Forget the registered provider and any canary rollback (tests, shutdown)."""
        self._provider = None
        self._rollback = None
        self._served = {"baseline": 0, "canary": 0}

    async def aclose(self) -> None:
        """Close the registered provider where it can be closed (it finishes its queued work
        and hands back what it holds, e.g. the consent ledger's writer lease), then `reset`."""
        close = getattr(self._provider, "aclose", None)
        try:
            if close is not None:
                await close()
        finally:
            self.reset()

    def get(self, settings: Settings) -> P:
        """The provider serving this call.

        The registered one when the flag is on outside DRY_RUN; with the flag off and a
        canary share set, the registered one for the calls on the canary arm; else the
        builtin.
        """
        provider = self._provider
        if settings.dry_run or provider is None:
            return self._builtin(settings)
        if getattr(settings, self.flag):
            return provider
        if self.canary_percent(settings, configured=True) <= 0:
            return self._builtin(settings)
        arm = pin_arm(self.flag, functools.partial(self._choose_arm, settings))
        return provider if arm == "canary" else self._builtin(settings)

    # -- canary ------------------------------------------------------------------------------

    def canary_percent(self, settings: Settings, *, configured: bool = False) -> float:
        """The share of calls (percent) the canary arm takes now: 0 once rolled back, or
        without a canary variable. `configured=True`: the configured share, rolled back or not.
        """
        if self._canary_setting is None or (self._rollback is not None and not configured):
            return 0.0
        return float(getattr(settings, self._canary_setting))

    def arm_for(self, settings: Settings, pseudonym: str | None) -> Arm:
        """The arm of a call about the data subject `pseudonym` (or None: no subject).

        Sticky: the first 8 bytes of SHA-256 over the pseudonym, as a fraction of 2**64,
        below the share (`sticky_point`); so raising the share keeps everyone already on the
        canary there. A call naming no subject goes to the canary: on a stateful slice it
        reads state only the real provider holds (a passkey assertion, a checkpoint).
        Stateless: one draw per call.
        """
        percent = self.canary_percent(settings)
        if percent <= 0:
            return "baseline"
        if not self.sticky:
            point = self._draw()
        elif pseudonym is None:
            return "canary"
        else:
            point = sticky_point(pseudonym)
        return "canary" if point * 100.0 < percent else "baseline"

    def stop_canary(self, reason: str, **details: Any) -> bool:
        """Send every call to the baseline from now on; False if it was stopped already."""
        if self._rollback is not None:
            return False
        self._rollback = {"reason": reason, "at": time.time(), **details}
        logger.warning(
            "canary %s rolled back: every call now goes to the baseline (%s)",
            self.canary_variable, reason,
        )
        return True

    def canary_state(self, settings: Settings) -> dict[str, Any]:
        """For `$SRV.STATS`: the canary's state (`off`, `running`, `rolled_back`, `full`
        when the flag is on), its share and the calls each arm served in this process."""
        configured = self.canary_percent(settings, configured=True)
        if settings.dry_run or configured <= 0:
            state = "off"
        elif getattr(settings, self.flag):
            state = "full"
        elif self._rollback is not None:
            state = "rolled_back"
        elif self._provider is None:
            state = "off"  # nothing wired to canary with
        else:
            state = "running"
        out: dict[str, Any] = {
            "variable": self.canary_variable,
            "state": state,
            "configured_percent": configured,
            "percent": self.canary_percent(settings) if state == "running" else 0.0,
            "sticky": self.sticky,
            "served": dict(self._served),
        }
        if self._rollback is not None:
            out["rollback"] = dict(self._rollback)
        return out

    def _choose_arm(self, settings: Settings, subject: str | None) -> Arm:
        arm = self.arm_for(settings, _stable_pseudonym(subject) if self.sticky else None)
        self._served[arm] += 1
        if self._rollback is not None:
            annotate(label=ROLLED_BACK_LABEL)
        return arm

    def waits_on_io(self, settings: Settings) -> bool:
        """Whether the provider serving under `settings` may wait on I/O (default: yes);
        with a canary, whether either arm may."""
        if (
            not settings.dry_run and self._provider is not None
            and not getattr(settings, self.flag)
            and self.canary_percent(settings, configured=True) > 0
        ):
            arms = (self._provider, self._builtin(settings))
            return any(bool(getattr(p, "waits_on_io", True)) for p in arms)
        return bool(getattr(self.get(settings), "waits_on_io", True))

    async def call(
        self, settings: Settings, operation: str, *args: Any, **options: Any
    ) -> dict[str, Any]:
        """Run `operation` on the serving provider; `not_supported` when it has none.

        Keyword `options` the provider's method does not take are left out, and a plain
        (non-async) method is fine: the plan's providers are `def record(self, entry)`.
        """
        provider = self.get(settings)
        method = getattr(provider, operation, None)
        if not callable(method):
            return not_supported(provider, operation)
        accepted = _accepted_options(method)
        if accepted is not None:
            options = {k: v for k, v in options.items() if k in accepted}
        result = method(*args, **options)
        if inspect.isawaitable(result):
            result = await result
        return result  # type: ignore[no-any-return]


def _stable_pseudonym(subject: str | None) -> str | None:
    """The subject's pseudonym under the oldest configured key: a key rotation (a new
    current key) moves nobody to the other arm."""
    runtime = bound_runtime()
    if subject is None or runtime is None:
        return None
    return runtime.pseudonymize.all_versions(subject)[-1]


def sticky_point(pseudonym: str) -> float:
    """Where a pseudonym falls in [0, 1): its arm is the canary below the share."""
    digest = hashlib.sha256(pseudonym.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


@functools.lru_cache(maxsize=256)
def _accepted_options_of(function: Callable[..., Any]) -> frozenset[str] | None:
    params = inspect.signature(function).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params)


def _accepted_options(method: Callable[..., Any]) -> frozenset[str] | None:
    """The keyword names `method` takes, None when it takes any (`**kwargs`)."""
    return _accepted_options_of(getattr(method, "__func__", method))
