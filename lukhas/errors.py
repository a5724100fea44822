"""The base error of the accepted lane; every slice error derives from it."""

from __future__ import annotations


class LukhasError(Exception):
    """A failure a caller can act on; `code` is the wire error code."""

    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(LukhasError):
    """The input does not match the slice's contract (types, lengths, sizes)."""

    code = "invalid_request"


class PayloadTooLarge(LukhasError):
    """The input is larger than the slice accepts."""

    code = "payload_too_large"

    def __init__(self, size: int, limit: int, what: str = "payload") -> None:
        super().__init__(f"{what} is {size} bytes, over the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class ConfigError(LukhasError):
    """An environment variable holds a value the service cannot use."""

    code = "config"

    def __init__(self, variable: str, value: str, expected: str) -> None:
        super().__init__(f"{variable}={value!r} is invalid: expected {expected}")
        self.variable = variable
        self.value = value


class RuntimeNotBound(LukhasError):
    """A public API was called outside `open_runtime()` (no bus or emitter to use)."""

    code = "internal"


class Unavailable(LukhasError):
    """The bus could not confirm the operation (disconnected, closed, or timed out)."""

    code = "unavailable"
