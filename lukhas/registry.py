"""One provider registry for every slice: real providers plug in at runtime.

A slice makes one `ProviderRegistry` with its builtin (null) provider and its feature flag.
`candidate/` modules call `registry.register(provider)` from their `_wire()`, which the
bootstrap runs only under the flag outside DRY_RUN; the accepted lane never imports them.

A provider needs only the operations it has: the plan's extension point is a class with a
single `record` method, and that registers fine. An operation the provider lacks answers
`{"ok": false, "reason": "not_supported"}` (see `ProviderRegistry.operation`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from lukhas.config import Settings

P = TypeVar("P")


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

    def __init__(self, flag: str, builtin: Callable[[Settings], P]) -> None:
        if flag not in Settings.__dataclass_fields__:
            raise ValueError(f"{flag!r} is not a setting")
        self.flag = flag
        self._builtin = builtin
        self._provider: P | None = None

    def register(self, provider: P) -> None:
        """Install the real provider; it answers only while the feature flag is on."""
        if not isinstance(getattr(provider, "name", None), str):
            raise TypeError(f"{provider!r} has no `name`: a provider names itself in replies")
        self._provider = provider

    def reset(self) -> None:
        """Forget the registered provider (tests, shutdown)."""
        self._provider = None

    def get(self, settings: Settings) -> P:
        """The registered provider when the flag is on outside DRY_RUN, else the builtin."""
        if settings.dry_run or not getattr(settings, self.flag) or self._provider is None:
            return self._builtin(settings)
        return self._provider

    def waits_on_io(self, settings: Settings) -> bool:
        """Whether the provider serving under `settings` may wait on I/O (default: yes)."""
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


@functools.lru_cache(maxsize=256)
def _accepted_options_of(function: Callable[..., Any]) -> frozenset[str] | None:
    params = inspect.signature(function).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params)


def _accepted_options(method: Callable[..., Any]) -> frozenset[str] | None:
    """The keyword names `method` takes, None when it takes any (`**kwargs`)."""
    return _accepted_options_of(getattr(method, "__func__", method))
