"""Turning untrusted input into typed messages, with one error type for every failure."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from lukhas.errors import InvalidRequest, PayloadTooLarge

T = TypeVar("T")

_json_encoder = msgspec.json.Encoder()
_TOO_DEEP = "input is nested too deeply"


def convert(message_type: type[T], fields: dict[str, Any]) -> T:
    """Validate `fields` (from a Python call) into `message_type`.

    Raises:
        InvalidRequest: a field has the wrong type, length or value.
    """
    try:
        return msgspec.convert(fields, type=message_type)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(str(exc)) from None
    except RecursionError:
        raise InvalidRequest(_TOO_DEEP) from None


def decode(message_type: type[T], data: bytes, *, max_bytes: int) -> T:
    """Decode a JSON request body into `message_type`, checking its size first.

    Raises:
        PayloadTooLarge: the body is over `max_bytes`.
        InvalidRequest: the body is not JSON or does not match the message.
    """
    if len(data) > max_bytes:
        raise PayloadTooLarge(len(data), max_bytes, "request body")
    try:
        return msgspec.json.decode(data, type=message_type)
    except msgspec.DecodeError as exc:  # also covers ValidationError
        raise InvalidRequest(str(exc)) from None
    except UnicodeDecodeError:  # msgspec raises it, not DecodeError, for invalid UTF-8
        raise InvalidRequest("request body is not valid UTF-8") from None
    except RecursionError:
        raise InvalidRequest(_TOO_DEEP) from None


def encoded_size(value: Any) -> int:
    """Bytes `value` takes as compact JSON (the measure of every size limit).

    Raises:
        InvalidRequest: `value` cannot be JSON (e.g. nested too deep, or not JSON types).
    """
    try:
        return len(_json_encoder.encode(value))
    except RecursionError:
        raise InvalidRequest(_TOO_DEEP) from None
    except (msgspec.EncodeError, TypeError, UnicodeEncodeError) as exc:
        raise InvalidRequest(f"not encodable as JSON: {exc}") from None


def check_size(value: Any, limit: int, what: str) -> int:
    """Return the encoded size of `value`.

    Raises:
        PayloadTooLarge: it is over `limit` bytes.
    """
    size = encoded_size(value)
    if size > limit:
        raise PayloadTooLarge(size, limit, what)
    return size
