"""One provider registry for every slice: real providers plug in at runtime.

A slice makes one `ProviderRegistry` with its builtin (null) provider and its feature flag.
`candidate/` modules call `registry.register(provider)` from their `_wire()`, which the
bootstrap runs only under the flag outside DRY_RUN; the accepted lane never imports them.

A provider needs only the operations it has: the plan's extension point is a class with a
single `record` method, and that registers fine. An operation the provider lacks answers
`{"ok": false, "reason": "not_supported"}` (see `ProviderRegistry.operation`).
"""

from __future__ import annotations

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

    def operation(self, settings: Settings, name: str) -> Callable[..., Any] | None:
        """The serving provider's `name` method, or None when it does not implement it."""
        method = getattr(self.get(settings), name, None)
        return method if callable(method) else None
